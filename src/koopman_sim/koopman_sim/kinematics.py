"""Kinematics helpers: Kinova's published DH model and a damped-least-squares IK on the MuJoCo model.

``dh_forward`` is deliberately independent of the MJCF (pure numpy from Kinova's user-guide DH table,
:data:`gen3_description.DH_TABLE`) so it can check the hand-written model; ``IKSolver`` uses MuJoCo's
Jacobians so it matches the simulated arm exactly.
"""

from __future__ import annotations

import mujoco
import numpy as np

from gen3_description import DH_TABLE
from koopman_sim import gen3

__all__ = ["DH_TABLE", "IKSolver", "dh_forward"]


def _rot_x(a: float) -> np.ndarray:
    c, s = np.cos(a), np.sin(a)
    return np.array([[1, 0, 0, 0], [0, c, -s, 0], [0, s, c, 0], [0, 0, 0, 1.0]])


def dh_forward(q: np.ndarray) -> np.ndarray:
    """4x4 pose of the tool flange in the base frame from the classic DH table (base->frame 0 = Rx(pi))."""
    q = np.asarray(q, dtype=float)
    if q.shape != (7,):
        raise ValueError(f"q must have shape (7,), got {q.shape}")
    t = _rot_x(np.pi)
    for (alpha, a, d, offset), qi in zip(DH_TABLE, q, strict=True):
        th = qi + offset
        ct, st, ca, sa = np.cos(th), np.sin(th), np.cos(alpha), np.sin(alpha)
        t = t @ np.array(
            [[ct, -st * ca, st * sa, a * ct], [st, ct * ca, -ct * sa, a * st], [0, sa, ca, d], [0, 0, 0, 1.0]]
        )
    return t


class IKSolver:
    """Position + orientation IK by damped least squares with a posture term in the null space.

    Owns a private MjModel/MjData (kinematics only), so solving never disturbs a running simulation.
    Warm-starting from the previous solution keeps consecutive solutions on one continuous branch, which is
    what a smooth joint trajectory needs.
    """

    def __init__(self, model_path: str | None = None, damping: float = 0.03, rot_weight: float = 0.5):
        self.model = gen3.load_model(model_path)
        self.data = mujoco.MjData(self.model)
        self._site = self._find_site()
        self._qadr = np.array([self.model.joint(n).qposadr[0] for n in gen3.JOINT_NAMES])
        self._dadr = np.array([self.model.joint(n).dofadr[0] for n in gen3.JOINT_NAMES])
        self.damping = damping
        self.rot_weight = rot_weight
        self._jp = np.zeros((3, self.model.nv))
        self._jr = np.zeros((3, self.model.nv))

    def _find_site(self) -> int:
        for name in (gen3.EE_SITE, *gen3.EE_SITE_FALLBACKS):
            sid = mujoco.mj_name2id(self.model, mujoco.mjtObj.mjOBJ_SITE, name)
            if sid >= 0:
                return sid
        raise gen3.Gen3ModelError(f"model has no end-effector site {gen3.EE_SITE!r}")

    def forward(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(position (3,), rotation (3, 3)) of the end-effector site at joint positions q."""
        self.data.qpos[self._qadr] = q
        mujoco.mj_kinematics(self.model, self.data)
        return self.data.site_xpos[self._site].copy(), self.data.site_xmat[self._site].reshape(3, 3).copy()

    def solve(
        self,
        pos: np.ndarray,
        rot: np.ndarray,
        q0: np.ndarray,
        q_rest: np.ndarray | None = None,
        iters: int = 60,
        tol: float = 2e-4,
        posture_gain: float = 0.05,
    ) -> tuple[np.ndarray, float]:
        """Joint positions reaching (pos, rot) starting from q0; returns (q, position error in m)."""
        m, d = self.model, self.data
        q = np.array(q0, dtype=float)
        q_rest = q if q_rest is None else np.asarray(q_rest, dtype=float)
        w = self.rot_weight
        eye6 = np.eye(6)
        err = np.inf
        for _ in range(iters):
            d.qpos[self._qadr] = q
            mujoco.mj_kinematics(m, d)
            mujoco.mj_comPos(m, d)
            r = d.site_xmat[self._site].reshape(3, 3)
            e_pos = pos - d.site_xpos[self._site]
            e_rot = 0.5 * (
                np.cross(r[:, 0], rot[:, 0]) + np.cross(r[:, 1], rot[:, 1]) + np.cross(r[:, 2], rot[:, 2])
            )
            err = float(np.linalg.norm(e_pos))
            if err < tol and np.linalg.norm(e_rot) < 10 * tol:
                break
            mujoco.mj_jacSite(m, d, self._jp, self._jr, self._site)
            jac = np.vstack([self._jp[:, self._dadr], w * self._jr[:, self._dadr]])
            jpinv = jac.T @ np.linalg.solve(jac @ jac.T + self.damping**2 * eye6, eye6)
            dq = jpinv @ np.concatenate([e_pos, w * e_rot])
            dq += (np.eye(7) - jpinv @ jac) @ (posture_gain * (q_rest - q))
            q = np.clip(q + np.clip(dq, -0.2, 0.2), gen3.JOINT_LOWER, gen3.JOINT_UPPER)
        return q, err
