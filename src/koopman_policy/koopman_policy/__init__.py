"""Diffusion teacher and one-step students behind one policy interface (no ROS imports).

The package itself imports no torch: the serving side (``onnx_policy``, ``loader``, ``catalog``, ``contract``)
runs where torch is not installed. ``BasePolicy``, ``PolicyConfig`` and ``Normalizer`` are imported on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BasePolicy", "Normalizer", "PolicyConfig"]


def __getattr__(name: str) -> Any:
    if name in ("BasePolicy", "PolicyConfig"):
        from koopman_policy import base

        return getattr(base, name)
    if name == "Normalizer":
        from koopman_policy.normalizer import Normalizer

        return Normalizer
    raise AttributeError(f"module 'koopman_policy' has no attribute {name!r}")
