"""``pusht``: Diffusion Policy's Push-T (``gym-pusht``, state observations) with the project's conventions.

A kinematic disc (radius 15 px) follows an absolute position target through the env's PD law (10 Hz
control, 10 physics steps of 10 ms) and pushes a T-shaped block into a fixed goal pose (256, 256, pi/4) on a
512 x 512 px table. Observation (float32, 5): ``[agent_x, agent_y, block_x, block_y, block_angle]``; action
(float32, 2): the agent's target position in px, clipped to the table.

Conventions beside gym-pusht's:
  * the block angle is wrapped to ``(goal - pi, goal + pi]`` instead of ``[0, 2 pi)``, so the wrap-around
    discontinuity lies opposite the goal orientation (an upside-down T) rather than 45 degrees from it,
    where every successful episode ends;
  * episodes are truncated after ``max_steps`` = 300 control steps (30 s), the limit of Diffusion Policy's
    Push-T evaluation, and terminate on success (coverage > 0.95, gym-pusht's criterion);
  * ``result()`` scores the episode like ``gen3_reach_obstacle``'s: success and the maximum coverage over
    the episode (the benchmark's "mean max coverage").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np

__all__ = ["ACTION_NAMES", "GOAL_POSE", "OBS_NAMES", "PushTEnv", "PushTResult", "wrap_angle"]

OBS_NAMES: tuple[str, ...] = ("agent_x", "agent_y", "block_x", "block_y", "block_angle")
ACTION_NAMES: tuple[str, ...] = ("target_x", "target_y")
GOAL_POSE = np.array([256.0, 256.0, np.pi / 4])
SUCCESS_COVERAGE = 0.95
TABLE = (0.0, 512.0)


def wrap_angle(angle: float | np.ndarray) -> float | np.ndarray:
    """Block angle in ``(goal - pi, goal + pi]``."""
    return GOAL_POSE[2] - np.remainder(GOAL_POSE[2] - angle + np.pi, 2 * np.pi) + np.pi


@dataclass
class PushTResult:
    """Outcome of one episode: ``coverage`` is the maximum over the episode, ``final_coverage`` the last."""

    success: bool
    coverage: float
    final_coverage: float
    steps: int
    duration: float
    side: None = None  # no detour side in this task; kept so datasets share one layout

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PushTEnv(gym.Env):
    """gym-pusht's ``PushTEnv`` behind the project's task interface (``result``, ``control_dt``, names)."""

    metadata: ClassVar[dict[str, Any]] = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, max_steps: int = 300, model_path: str | None = None) -> None:
        if model_path is not None:
            raise ValueError("pusht has no model file to replace")
        from gym_pusht.envs.pusht import PushTEnv as _PushT

        self.env = _PushT(obs_type="state", render_mode="rgb_array")
        self.max_steps = int(max_steps)
        self.control_dt = 1.0 / self.env.control_hz
        self.obs_names = OBS_NAMES
        self.action_names = ACTION_NAMES
        self.observation_space = gym.spaces.Box(
            low=np.array([0, 0, 0, 0, GOAL_POSE[2] - np.pi], np.float32),
            high=np.array([512, 512, 512, 512, GOAL_POSE[2] + np.pi], np.float32),
        )
        self.action_space = gym.spaces.Box(low=TABLE[0], high=TABLE[1], shape=(2,), dtype=np.float32)
        self._steps = 0
        self._coverage: list[float] = []

    def _obs(self, raw: np.ndarray) -> np.ndarray:
        obs = np.asarray(raw, dtype=np.float64).copy()
        obs[4] = wrap_angle(obs[4])
        return obs.astype(np.float32)

    @property
    def space(self) -> Any:
        """The live pymunk space (the expert plans with the block's shapes)."""
        return self.env.space

    @property
    def block(self) -> Any:
        return self.env.block

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        raw, info = self.env.reset(seed=seed, options=options)
        self._steps = 0
        self._coverage = [float(self.env._get_coverage())]
        info = {"coverage": self._coverage[0], "is_success": False}
        return self._obs(raw), info

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        action = np.clip(np.asarray(action, dtype=np.float64).reshape(2), *TABLE)
        raw, reward, terminated, _, info = self.env.step(action)
        self._steps += 1
        self._coverage.append(float(info["coverage"]))
        truncated = not terminated and self._steps >= self.max_steps
        return self._obs(raw), float(reward), bool(terminated), truncated, {
            "coverage": float(info["coverage"]), "is_success": bool(info["is_success"])}

    def result(self) -> PushTResult:
        best = max(self._coverage)
        return PushTResult(success=best > SUCCESS_COVERAGE, coverage=best, final_coverage=self._coverage[-1],
                           steps=self._steps, duration=self._steps * self.control_dt)

    def render(self) -> np.ndarray:
        return self.env.render()

    def render_frame(self) -> np.ndarray:
        return self.env.render()

    def close(self) -> None:
        self.env.close()
