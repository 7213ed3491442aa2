"""Diffusion teacher and one-step students behind one policy interface (no ROS imports)."""

from koopman_policy.base import BasePolicy, PolicyConfig
from koopman_policy.normalizer import Normalizer

__all__ = ["BasePolicy", "Normalizer", "PolicyConfig"]
