"""The simulated arm as the control stack sees a robot: joint feedback out, action chunks in, episodes scored.

Wraps ``koopman_sim``'s :class:`Gen3Arm` and :class:`ReachObstacleTask` (the same physics and scoring as the
10 Hz gym environment) and steps them at the feedback rate from a real-time loop. Everything that touches
MuJoCo state holds ``lock``: chunks and resets arrive from ROS callbacks on other threads.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from koopman_control.core.chunk import ActionChunk, ChunkExecutor


@dataclass(frozen=True)
class EpisodeStart:
    episode: int
    stamp_ns: int
    seed: int
    target: np.ndarray
    pillar: np.ndarray


@dataclass(frozen=True)
class SimState:
    stamp_ns: int
    q: np.ndarray
    qd: np.ndarray
    result: dict[str, Any] | None = None  # set on the step an episode ended
    started: EpisodeStart | None = None  # set on the step an automatic reset happened


class SimDriver:
    def __init__(self, *, feedback_rate_hz: float = 500.0, physics_dt: float = 0.002, time_limit: float = 8.0,
                 seed: int = 0, auto_reset: bool = True, command_timeout_s: float = 0.3,
                 interpolation: str = "zoh", model_path: str | None = None) -> None:
        from koopman_sim import gen3
        from koopman_sim.arm import Gen3Arm
        from koopman_sim.tasks.reach_obstacle import ReachObstacleTask

        if not 0 < feedback_rate_hz <= 1000:
            raise ValueError(f"feedback_rate must be in (0, 1000] Hz, got {feedback_rate_hz}")
        period = 1.0 / feedback_rate_hz
        # Physics never steps coarser than the feedback period; at 500 Hz one 2 ms step per sample.
        physics_dt = min(physics_dt, period)
        self.substeps = max(1, round(period / physics_dt))
        self.feedback_period = period
        self.joint_names = tuple(gen3.JOINT_NAMES)
        self.arm = Gen3Arm(model_path or None, physics_dt=period / self.substeps)
        self.task = ReachObstacleTask(self.arm, time_limit=time_limit)
        self.executor = ChunkExecutor(gen3.JOINT_LOWER, gen3.JOINT_UPPER, command_timeout_s, interpolation)
        self.seed = int(seed)
        self.auto_reset = auto_reset
        self.lock = threading.RLock()
        self.episode = 0
        self.episode_seed = self.seed
        self.results: list[dict[str, Any]] = []
        self._reported = False
        self.set_target_errors = 0

    # -- episodes --------------------------------------------------------------------------------------------
    def reset_episode(self, now_ns: int, seed: int | None = None) -> EpisodeStart:
        """New episode: arm to the (noisy) start pose, new target and pillar, plan forgotten."""
        with self.lock:
            self.episode += 1
            self.episode_seed = int(seed) if seed is not None else self.seed * 100_003 + self.episode
            self.task.reset(np.random.default_rng(self.episode_seed))
            self.task.update()
            self.executor.reset(now_ns, self.arm.q)
            self._reported = False
            return EpisodeStart(self.episode, int(now_ns), self.episode_seed, self.task.target.copy(),
                                self.task.pillar.copy())

    # -- commands --------------------------------------------------------------------------------------------
    def submit(self, chunk: ActionChunk, now_ns: int) -> tuple[bool, str]:
        with self.lock:
            return self.executor.submit(chunk, now_ns)

    def refuse(self, reason: str) -> tuple[bool, str]:
        """Count a chunk that could not even be converted (wrong joint names, ragged points)."""
        with self.lock:
            return self.executor.reject(reason)

    # -- physics ---------------------------------------------------------------------------------------------
    def step(self, now_ns: int, skipped: int = 0) -> SimState:
        """Sample the joints at ``now_ns``, then advance one period (plus ``skipped`` dropped ones, up to 50).

        The returned state is the one measured *before* the step, as a robot's feedback is sampled before the
        command of the same cycle takes effect. Sampling after the step (under the next chunk point's
        set-point) yet stamping with the step's start showed the policy joint velocities 2.5-4x the gym
        environment's at the same phase, and closed-loop success through topics dropped accordingly.
        """
        with self.lock:
            arm, task = self.arm, self.task
            q, qd = arm.q, arm.qd  # copies
            target = self.executor.command(now_ns, arm.q)
            if target is not None:
                try:
                    arm.set_target(target)
                except ValueError:  # cannot happen for validated chunks; never let it stop the physics
                    self.set_target_errors += 1
            for _ in range(self.substeps * (1 + min(skipped, 50))):
                arm.step(1)
                if not self._reported:
                    task.update()
            result = started = None
            if not self._reported and task.done:
                self._reported = True
                result = {"episode": self.episode, "seed": self.episode_seed, **task.result().to_dict()}
                self.results.append(result)
        if result is not None and self.auto_reset:
            started = self.reset_episode(now_ns)
        return SimState(now_ns, q, qd, result, started)

    def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        """qpos and mocap positions, for rendering on another thread without touching the live data."""
        with self.lock:
            d = self.arm.data
            return d.qpos.copy(), d.mocap_pos.copy()

    def summary(self) -> dict[str, Any]:
        with self.lock:
            res = list(self.results)
        n = len(res)
        return {
            "episodes": n,
            "successes": sum(r["success"] for r in res),
            "collisions": sum(r["collision"] for r in res),
            "success_rate": (sum(r["success"] for r in res) / n) if n else None,
            "sides": {str(s).lower(): sum(r["side"] == s for r in res) for s in ("left", "right", None)},
            "commands": {"accepted": self.executor.counters.accepted, "rejected": self.executor.counters.rejected,
                         "clamped": self.executor.counters.clamped, "timeouts": self.executor.counters.timeouts},
        }
