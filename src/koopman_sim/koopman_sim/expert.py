"""Scripted expert for ``gen3_reach_obstacle``: a smooth Cartesian detour beside the pillar, tracked by IK.

At ``reset`` the expert flips a fair coin for the side, builds a quadratic Bezier curve from the start hand
position through a via point beside the pillar to the target, solves IK (tool pointing down) along the curve
once, and times the joint path with a minimum-jerk profile stretched until every joint stays below 85 % of
its velocity limit. ``act`` then just reads the cached plan, so an episode costs one planning pass.
Noise: the via-point clearance, height and along-line offset, the Cartesian speed and a small, smooth
(low-pass) perturbation of the joint targets are random, so demonstrations are varied but stay successful.
"""

from __future__ import annotations

import mujoco
import numpy as np

from koopman_sim import gen3
from koopman_sim.kinematics import IKSolver

__all__ = ["ScriptedExpert"]

_Q = slice(0, 7)
_TARGET = slice(14, 17)
_PILLAR = slice(17, 20)


def _slerp_rotations(r0: np.ndarray, r1: np.ndarray, ts: np.ndarray) -> np.ndarray:
    """Rotation matrices interpolated (geodesically) from r0 to r1 at fractions ts."""
    q0, q1 = np.empty(4), np.empty(4)
    mujoco.mju_mat2Quat(q0, r0.ravel())
    mujoco.mju_mat2Quat(q1, r1.ravel())
    if np.dot(q0, q1) < 0:
        q1 = -q1
    angle = np.arccos(np.clip(np.dot(q0, q1), -1.0, 1.0))
    out = np.empty((len(ts), 3, 3))
    m = np.empty(9)
    for i, t in enumerate(ts):
        q = q0 if angle < 1e-9 else (np.sin((1 - t) * angle) * q0 + np.sin(t * angle) * q1) / np.sin(angle)
        mujoco.mju_quat2Mat(m, q / np.linalg.norm(q))
        out[i] = m.reshape(3, 3)
    return out


class ScriptedExpert:
    """Left/right detour expert; ``reset(obs, rng)`` plans, ``act(obs)`` returns the next joint target."""

    def __init__(
        self,
        model_path: str | None = None,
        control_dt: float = 0.1,
        speed: tuple[float, float] = (0.08, 0.10),
        clearance: tuple[float, float] = (0.13, 0.16),
        action_noise: float = 0.003,
        velocity_margin: float = 0.85,
        n_path_points: int = 40,
    ):
        self.ik = IKSolver(model_path)
        self.control_dt = float(control_dt)
        self.speed = speed
        self.clearance = clearance
        self.action_noise = float(action_noise)
        self.velocity_margin = float(velocity_margin)
        self.n_path_points = int(n_path_points)
        # Tool orientation of the start pose (pointing down); kept for the whole motion.
        _, self._rot = self.ik.forward(gen3.HOME_Q)
        self.side: str | None = None
        self.plan: np.ndarray = np.zeros((0, 7))
        self.path: np.ndarray = np.zeros((0, 3))
        self._k = 0
        self._rng = np.random.default_rng()
        self._noise = np.zeros(7)

    @staticmethod
    def _check_obs(obs: np.ndarray) -> np.ndarray:
        obs = np.asarray(obs, dtype=float)
        if obs.shape != (20,) or not np.all(np.isfinite(obs)):
            raise ValueError(
                f"expert needs a finite 20-d gen3_reach_obstacle observation, got shape {obs.shape}"
            )
        return obs

    def reset(self, obs: np.ndarray, rng: np.random.Generator, side: str | None = None) -> None:
        """Plan the episode from the first observation; ``side`` forces 'left'/'right' (else a coin flip)."""
        obs = self._check_obs(obs)
        if side not in (None, "left", "right"):
            raise ValueError(f"side must be 'left', 'right' or None, got {side!r}")
        self._rng = rng
        q0 = obs[_Q].copy()
        target, pillar = obs[_TARGET], obs[_PILLAR]
        start, _ = self.ik.forward(q0)
        self.side = side or ("left" if rng.random() < 0.5 else "right")
        sign = 1.0 if self.side == "left" else -1.0

        line = target[:2] - start[:2]
        u = line / np.linalg.norm(line)
        n = np.array([-u[1], u[0]])  # left normal
        # Via point beside the pillar (on the chosen side, measured from the pillar axis, not from the line).
        lateral = float(np.dot(pillar[:2] - start[:2], n))
        along = float(np.dot(pillar[:2] - start[:2], u)) + rng.uniform(-0.01, 0.02)
        offset = lateral + sign * rng.uniform(*self.clearance)
        via = np.empty(3)
        via[:2] = start[:2] + along * u + offset * n
        via[2] = 0.5 * (start[2] + target[2]) + rng.uniform(-0.01, 0.02)
        # Quadratic Bezier through `via` at s = 0.5.
        ctrl = 2.0 * via - 0.5 * (start + target)
        s = np.linspace(0.0, 1.0, self.n_path_points)[:, None]
        path = (1 - s) ** 2 * start + 2 * (1 - s) * s * ctrl + s**2 * target
        self.path = path

        # The start pose carries reset noise, so orientation is blended from the start's to tool-down along
        # the path and the posture term pulls towards q0; the plan then starts exactly at q0, without a jump.
        _, rot0 = self.ik.forward(q0)
        rots = _slerp_rotations(rot0, self._rot, s[:, 0])
        qs = np.empty((len(path), 7))
        qs[0] = q = q0
        for i in range(1, len(path)):
            last = i == len(path) - 1
            q, _ = self.ik.solve(
                path[i], rots[i], q, q_rest=q0, iters=100 if last else 15, tol=2e-5 if last else 2e-4
            )
            qs[i] = q

        # Minimum-jerk timing: peak ds/dt = 1.875 / T. Pick T from the Cartesian speed, then stretch it so the
        # fastest joint stays within velocity_margin of its limit.
        arc = float(np.sum(np.linalg.norm(np.diff(path, axis=0), axis=1)))
        duration = arc / rng.uniform(*self.speed)
        dq_ds = np.abs(np.diff(qs, axis=0)) * (len(qs) - 1)
        need = 1.875 * np.max(dq_ds / (self.velocity_margin * gen3.VELOCITY_LIMITS))
        duration = max(duration, need, 1.0)
        steps = int(np.ceil(duration / self.control_dt))
        tau = np.arange(1, steps + 1) / steps
        sig = 10 * tau**3 - 15 * tau**4 + 6 * tau**5
        grid = np.linspace(0.0, 1.0, len(qs))
        self.plan = np.stack([np.interp(sig, grid, qs[:, j]) for j in range(7)], axis=1)
        self._k = 0
        self._noise = np.zeros(7)

    def act(self, obs: np.ndarray) -> np.ndarray:
        """Next absolute joint target (float32, 7); holds the final pose once the plan is exhausted."""
        self._check_obs(obs)
        if len(self.plan) == 0:
            raise RuntimeError("ScriptedExpert.act called before reset")
        k = min(self._k, len(self.plan) - 1)
        self._k += 1
        # Smooth noise that fades out over the last 20 % of the plan so the final approach is exact.
        fade = min(1.0, max(0.0, (len(self.plan) - k) / (0.2 * len(self.plan))))
        self._noise = 0.7 * self._noise + 0.3 * self._rng.normal(0.0, self.action_noise, 7)
        target = self.plan[k] + fade * self._noise
        return np.clip(target, gen3.JOINT_LOWER, gen3.JOINT_UPPER).astype(np.float32)

    @property
    def plan_steps(self) -> int:
        return len(self.plan)
