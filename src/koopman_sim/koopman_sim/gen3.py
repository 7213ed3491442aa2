"""The Kinova Gen3 in MuJoCo: loading and checking its model.

The arm's facts (names, limits, home pose, the MJCF itself) live in :mod:`gen3_description`, shared with the
Kortex bridge and the config; they are re-exported here for the simulator's code.
"""

from __future__ import annotations

from pathlib import Path

import mujoco

from gen3_description import (
    CONTINUOUS,
    EE_SITE,
    EE_SITE_FALLBACKS,
    EFFORT_LIMITS,
    HOME_Q,
    JOINT_LOWER,
    JOINT_NAMES,
    JOINT_UPPER,
    VELOCITY_LIMITS,
    mjcf_path,
)

__all__ = [
    "CONTINUOUS",
    "EE_SITE",
    "EE_SITE_FALLBACKS",
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


class Gen3ModelError(ValueError):
    """An MJCF file that cannot serve as a Gen3 arm (unparsable, or joints/actuators/site missing)."""


def default_model_path() -> Path:
    """Path of the arm's MJCF (:func:`gen3_description.mjcf_path`)."""
    return mjcf_path()


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
