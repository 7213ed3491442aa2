"""Gen3Arm: the one physics wrapper shared by the gym task and the ROS sim node.

Keeping a single wrapper means the 10 Hz gym environment and the 500 Hz ROS node simulate exactly the same
arm (same servo gains, limits and input validation).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import mujoco
import numpy as np

from koopman_sim import gen3

__all__ = ["Gen3Arm"]


def _as_joint_vector(q: object, what: str) -> np.ndarray:
    """Validate a 7-vector of joint positions; raise ValueError before anything touches the physics."""
    try:
        arr = np.asarray(q, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be a numeric array of shape (7,): {exc}") from exc
    if arr.shape != (7,):
        raise ValueError(f"{what} must have shape (7,) (one value per joint), got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        bad = [gen3.JOINT_NAMES[i] for i in np.flatnonzero(~np.isfinite(arr))]
        raise ValueError(f"{what} contains NaN/inf for {', '.join(bad)}; rejected, previous target kept")
    return arr


class Gen3Arm:
    """MuJoCo Gen3 arm with position-servo joints.

    ``set_target`` is the only way commands enter the physics and it rejects malformed input, so a NaN
    from a policy can never corrupt the simulation state.
    """

    def __init__(self, model_path: str | Path | None = None, physics_dt: float = 0.002):
        if not (isinstance(physics_dt, int | float) and np.isfinite(physics_dt) and physics_dt > 0):
            raise ValueError(f"physics_dt must be a positive number of seconds, got {physics_dt!r}")
        self.model_path = None if model_path is None else str(model_path)
        self._spec = gen3.load_spec(model_path)
        self._spec.option.timestep = float(physics_dt)
        self._compile()
        self.reset()

    # -- model construction -------------------------------------------------------------------------------
    def _compile(self) -> None:
        try:
            model = self._spec.compile()
        except Exception as exc:
            raise gen3.Gen3ModelError(f"cannot compile the arm scene: {exc}") from exc
        gen3.validate_model(model, self.model_path or "gen3_description's gen3.xml")
        self._model = model
        self._data = mujoco.MjData(model)
        self._qadr = np.array([model.joint(n).qposadr[0] for n in gen3.JOINT_NAMES])
        self._dadr = np.array([model.joint(n).dofadr[0] for n in gen3.JOINT_NAMES])
        jids = [model.joint(n).id for n in gen3.JOINT_NAMES]
        act = []
        for jid, name in zip(jids, gen3.JOINT_NAMES, strict=True):
            hits = [
                a
                for a in range(model.nu)
                if model.actuator_trntype[a] == mujoco.mjtTrn.mjTRN_JOINT
                and model.actuator_trnid[a, 0] == jid
            ]
            if not hits:
                raise gen3.Gen3ModelError(f"model has no actuator driving {name}")
            act.append(hits[0])
        self._act = np.array(act)
        self._site = -1
        for name in (gen3.EE_SITE, *gen3.EE_SITE_FALLBACKS):
            self._site = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_SITE, name)
            if self._site >= 0:
                break
        if self._site < 0:
            raise gen3.Gen3ModelError(f"model has no end-effector site {gen3.EE_SITE!r}")
        base = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_BODY, "base_link")
        root = base if base >= 0 else model.jnt_bodyid[jids[0]]
        # Bodies of the arm: the subtree below the base (used for collision queries by tasks).
        self.arm_body_ids = np.array([b for b in range(model.nbody) if self._in_subtree(b, root)])
        self.arm_geom_ids = np.flatnonzero(np.isin(model.geom_bodyid, self.arm_body_ids))

    def _in_subtree(self, body: int, root: int) -> bool:
        while body > 0:
            if body == root:
                return True
            body = self._model.body_parentid[body]
        return root == 0

    def edit_scene(self, edit: Callable[[mujoco.MjSpec], None]) -> None:
        """Apply ``edit`` to the MjSpec (add obstacles, targets, cameras) and recompile.

        Joint state and targets carry over. ``model``/``data`` are new objects afterwards, so callers must
        re-read them instead of caching the old ones.
        """
        q, qd, tgt = self.q, self.qd, self.target
        edit(self._spec)
        self._compile()
        self.reset(q)
        self._data.qvel[self._dadr] = qd
        self._data.ctrl[self._act] = tgt
        mujoco.mj_forward(self._model, self._data)

    # -- control --------------------------------------------------------------------------------------------
    def reset(self, q: np.ndarray | None = None) -> None:
        """Zero time and velocities, put the joints at q (default HOME_Q) and hold them there."""
        q = (
            gen3.HOME_Q
            if q is None
            else np.clip(_as_joint_vector(q, "reset q"), gen3.JOINT_LOWER, gen3.JOINT_UPPER)
        )
        mujoco.mj_resetData(self._model, self._data)
        self._data.qpos[self._qadr] = q
        self._data.ctrl[self._act] = q
        mujoco.mj_forward(self._model, self._data)

    def set_target(self, q: np.ndarray) -> np.ndarray:
        """Set absolute joint position targets (rad); returns the target actually applied (clipped to limits).

        Raises ValueError for a wrong shape or non-finite values, leaving the previous target in place.
        """
        arr = np.clip(_as_joint_vector(q, "joint target"), gen3.JOINT_LOWER, gen3.JOINT_UPPER)
        self._data.ctrl[self._act] = arr
        return arr

    def step(self, n: int = 1) -> None:
        """Advance the physics by n timesteps."""
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n!r}")
        if n:
            mujoco.mj_step(self._model, self._data, nstep=int(n))

    # -- state ----------------------------------------------------------------------------------------------
    @property
    def q(self) -> np.ndarray:
        return self._data.qpos[self._qadr].copy()

    @property
    def qd(self) -> np.ndarray:
        return self._data.qvel[self._dadr].copy()

    @property
    def target(self) -> np.ndarray:
        return self._data.ctrl[self._act].copy()

    @property
    def ee_pos(self) -> np.ndarray:
        return self._data.site_xpos[self._site].copy()

    @property
    def ee_xmat(self) -> np.ndarray:
        return self._data.site_xmat[self._site].reshape(3, 3).copy()

    @property
    def time(self) -> float:
        return float(self._data.time)

    @property
    def physics_dt(self) -> float:
        return float(self._model.opt.timestep)

    @property
    def model(self) -> mujoco.MjModel:
        return self._model

    @property
    def data(self) -> mujoco.MjData:
        return self._data
