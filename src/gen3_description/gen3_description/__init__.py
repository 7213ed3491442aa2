"""Kinova Gen3 7-DoF (no gripper): the facts about the arm that every part of the stack reads.

Joint names, position, speed and effort limits, which joints are continuous, the home pose, Kinova's DH
table and the MuJoCo model. The simulator (``koopman_sim``), the Kortex bridge and its limits, the sim node
and ``config/kinova.yaml`` all take them from here, as ros2_kortex keeps ``kortex_description`` apart from
its driver. Numbers from Kinova's published specifications and user guide; numpy only, no MuJoCo or ROS.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

__all__ = [
    "CONTINUOUS",
    "DH_TABLE",
    "EE_SITE",
    "EE_SITE_FALLBACKS",
    "EFFORT_LIMITS",
    "HOME_Q",
    "JOINT_LOWER",
    "JOINT_NAMES",
    "JOINT_UPPER",
    "VELOCITY_LIMITS",
    "mjcf_path",
]

JOINT_NAMES: tuple[str, ...] = tuple(f"joint_{i}" for i in range(1, 8))
#: Joints 1, 3, 5, 7 have no end stops on the real arm.
CONTINUOUS: tuple[bool, ...] = (True, False, True, False, True, False, True)
EE_SITE = "ee_site"
# Menagerie's kinova_gen3 model names its flange site differently; accepted as a fallback.
EE_SITE_FALLBACKS: tuple[str, ...] = ("pinch_site",)

_TWO_PI = 2.0 * np.pi
# The continuous joints are commanded within one turn either way, so that a policy's action space is bounded
# and a target never asks for several revolutions of cable wind-up; 2, 4 and 6 have Kinova's hard limits.
JOINT_UPPER = np.array([_TWO_PI, 2.24, _TWO_PI, 2.57, _TWO_PI, 2.09, _TWO_PI])
JOINT_LOWER = -JOINT_UPPER
VELOCITY_LIMITS = np.array([1.3963, 1.3963, 1.3963, 1.3963, 1.2218, 1.2218, 1.2218])  # rad/s, rated maxima
EFFORT_LIMITS = np.array([39.0, 39.0, 39.0, 39.0, 9.0, 9.0, 9.0])  # N m
# Ready pose with the tool pointing straight down, flange at about (0.26, 0, 0.20) m: the start pose of the
# reach task. It is not Kinova's factory "Home" (which points the tool forward at 0.43 m height).
HOME_Q = np.array([0.0, 0.4154, np.pi, -2.4349, 0.0, -0.2917, np.pi / 2])

for _arr in (JOINT_UPPER, JOINT_LOWER, VELOCITY_LIMITS, EFFORT_LIMITS, HOME_Q):
    _arr.setflags(write=False)

# (alpha, a, d, theta offset) per joint, classic DH, from Kinova's Gen3 user guide (7 DoF, no gripper).
# The d values are the exact sums of the URDF offsets (the guide prints them rounded to 0.1 mm):
# 0.2848 = 0.15643 + 0.12838, 0.0118 = 0.005375 + 0.006375, 0.4208 = 2 * 0.21038,
# 0.0128 = 2 * 0.006375, 0.3143 = 0.20843 + 0.10593, 0.1674 = 0.10593 + 0.061525.
# The URDF's two 0.17505 mm wrist offsets have no DH counterpart (at most 0.35 mm of disagreement).
DH_TABLE: tuple[tuple[float, float, float, float], ...] = (
    (np.pi / 2, 0.0, -(0.15643 + 0.12838), 0.0),
    (np.pi / 2, 0.0, -(0.005375 + 0.006375), np.pi),
    (np.pi / 2, 0.0, -(0.21038 + 0.21038), np.pi),
    (np.pi / 2, 0.0, -(0.006375 + 0.006375), np.pi),
    (np.pi / 2, 0.0, -(0.20843 + 0.10593), np.pi),
    (np.pi / 2, 0.0, 0.0, np.pi),
    (np.pi, 0.0, -(0.10593 + 0.061525), np.pi),
)


def mjcf_path() -> Path:
    """The MuJoCo model of the arm (``mjcf/gen3.xml``), written from Kinova's published kinematics."""
    return Path(str(resources.files(__name__) / "mjcf" / "gen3.xml"))
