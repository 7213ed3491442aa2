"""Kinova Gen3 7-DoF constants and model loading.

The numbers come from Kinova's published specifications so that every consumer (gym task, scripted expert,
ROS sim node, policy action limits) agrees on one set of limits.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import mujoco
import numpy as np

__all__ = [
    "EE_SITE",
    "EFFORT_LIMITS",
    "HOME_Q",
    "JOINT_LOWER",
    "JOINT_NAMES",
    "JOINT_UPPER",
    "VELOCITY_LIMITS",
    "Gen3ModelError",
    "default_model_path",
    "load_model",
    "load_spec",
]

JOINT_NAMES: tuple[str, ...] = tuple(f"joint_{i}" for i in range(1, 8))
EE_SITE = "ee_site"
# Menagerie's kinova_gen3 model names its flange site differently; accepted as a fallback.
EE_SITE_FALLBACKS: tuple[str, ...] = ("pinch_site",)

_TWO_PI = 2.0 * np.pi
# Joints 1, 3, 5, 7 are continuous on the real arm; commands are restricted to one turn either way so that a
# policy's action space is bounded and a target never asks for several revolutions of cable wind-up.
JOINT_UPPER = np.array([_TWO_PI, 2.24, _TWO_PI, 2.57, _TWO_PI, 2.09, _TWO_PI])
JOINT_LOWER = -JOINT_UPPER
VELOCITY_LIMITS = np.array([1.3963, 1.3963, 1.3963, 1.3963, 1.2218, 1.2218, 1.2218])  # rad/s
EFFORT_LIMITS = np.array([39.0, 39.0, 39.0, 39.0, 9.0, 9.0, 9.0])  # N m
# Ready pose with the tool pointing straight down, flange at about (0.26, 0, 0.20) m: the start pose of the
# reach task. It is not Kinova's factory "Home" (which points the tool forward at 0.43 m height).
HOME_Q = np.array([0.0, 0.4154, np.pi, -2.4349, 0.0, -0.2917, np.pi / 2])

for _arr in (JOINT_UPPER, JOINT_LOWER, VELOCITY_LIMITS, EFFORT_LIMITS, HOME_Q):
    _arr.setflags(write=False)


class Gen3ModelError(ValueError):
    """An MJCF file that cannot serve as a Gen3 arm (unparsable, or joints/actuators/site missing)."""


def default_model_path() -> Path:
    """Path of the bundled MJCF (``koopman_sim/assets/gen3.xml``)."""
    return Path(str(resources.files("koopman_sim") / "assets" / "gen3.xml"))


def _resolve(path: str | Path | None) -> Path:
    p = default_model_path() if path is None else Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"Gen3 model file not found: {p}")
    return p


def validate_model(model: mujoco.MjModel, source: str = "model") -> None:
    """Raise Gen3ModelError unless ``model`` has the seven Gen3 hinge joints."""
    missing = [n for n in JOINT_NAMES if mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_JOINT, n) < 0]
    if missing:
        raise Gen3ModelError(
            f"{source} lacks Gen3 joint(s) {', '.join(missing)}; "
            f"expected joints named {', '.join(JOINT_NAMES)}"
        )
    for n in JOINT_NAMES:
        if model.joint(n).type[0] != mujoco.mjtJoint.mjJNT_HINGE:
            raise Gen3ModelError(f"{source}: joint {n!r} must be a hinge joint")


def load_spec(path: str | Path | None = None) -> mujoco.MjSpec:
    """Parse the MJCF (bundled one by default) into an editable MjSpec, validating the joint names.

    Tasks build their scenes by editing this spec (adding obstacles, targets) before compiling.
    """
    p = _resolve(path)
    try:
        spec = mujoco.MjSpec.from_file(str(p))
        model = spec.compile()
    except Exception as exc:  # mujoco raises a bare ValueError/Exception with the parser message
        raise Gen3ModelError(f"cannot load MJCF {p}: {exc}") from exc
    validate_model(model, str(p))
    return spec


def load_model(path: str | Path | None = None) -> mujoco.MjModel:
    """Compile the Gen3 model; ``path`` may point to another MJCF (e.g. Menagerie's gen3.xml) that uses the
    same joint names. Raises FileNotFoundError for a missing file and Gen3ModelError for a wrong model."""
    return load_spec(path).compile()
