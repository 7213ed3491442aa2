"""A simulated robot as the control stack sees one: joint feedback out, action chunks in, episodes scored.

Steps a task of :mod:`koopman_control.core.sim_tasks` (the Gen3 reach task, Push-T's pusher) at the feedback
rate from a real-time loop, with the same physics and scoring as the gym environment of that task. Chunks pass
the robot's :class:`~koopman_control.core.chunk.CommandChecks` (the arm's, from ``config/kinova.yaml``, for
the Gen3), so a chunk the Kortex bridge would refuse is refused here too. Episodes follow
:mod:`koopman_control.core.episodes`: announced one ``reset_delay`` ahead, the robot reset at the announced
instant, scored from the first accepted chunk. Everything that touches the physics holds ``lock``: chunks,
holds and resets arrive from ROS callbacks on other threads.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from koopman_control.core.chunk import ActionChunk, ChunkExecutor, CommandChecks
from koopman_control.core.episodes import Announcement, EpisodeSequencer, Phase
from koopman_control.core.sim_tasks import SimTask


@dataclass(frozen=True)
class EpisodeStart:
    """A reset applied: the episode's first sample is stamped ``stamp_ns``; the inputs fixed for it."""

    episode: int
    stamp_ns: int
    seed: int
    inputs: dict[str, np.ndarray]


@dataclass(frozen=True)
class SimState:
    stamp_ns: int
    q: np.ndarray
    qd: np.ndarray
    streams: dict[str, np.ndarray] = field(default_factory=dict)  # the inputs measured with this sample
    result: dict[str, Any] | None = None  # set on the step an episode ended
    announced: Announcement | None = None  # set on the step the next episode was scheduled
    started: EpisodeStart | None = None  # set on the step a reset was applied


class SimDriver:
    def __init__(self, task: SimTask, checks: CommandChecks | None = None, *, feedback_rate_hz: float = 0.0,
                 seed: int = 0, sequential_seeds: bool = False, auto_reset: bool = True, reset_delay_s: float = 0.1,
                 start_timeout_s: float = 30.0) -> None:
        """``checks`` None: the task's own (Push-T); ``feedback_rate_hz`` 0: the task's (500 Hz Gen3, 100 Hz
        Push-T), else a whole multiple of physics steps per sample; ``sequential_seeds``: episode k uses seed
        ``seed + k - 1`` (the gym evaluation's seeds) instead of ``seed * 100003 + k``."""
        rate = feedback_rate_hz or task.feedback_rate_hz
        if not 0 < rate <= 1000:
            raise ValueError(f"feedback_rate must be in (0, 1000] Hz, got {rate}")
        period = 1.0 / rate
        steps = period / task.physics_dt
        if abs(steps - round(steps)) > 1e-6 or round(steps) < 1:
            raise ValueError(f"feedback_rate {rate:g} Hz is not a whole number of {task.name}'s "
                             f"{task.physics_dt * 1e3:g} ms physics steps per sample")
        self.substeps = round(steps)
        self.feedback_period = period
        self.task = task
        self.joint_names = task.joint_names
        checks = checks if checks is not None else task.own_checks()
        if checks is None:
            raise ValueError(f"task {task.name} needs the arm's command checks (config/kinova.yaml)")
        if checks.lower.shape != (len(self.joint_names),):
            raise ValueError(f"command checks have {checks.lower.size} joint limits, {task.name} has "
                             f"{len(self.joint_names)} joints")
        self.executor = ChunkExecutor(checks)
        self.sequencer = EpisodeSequencer(seed=seed, reset_delay_s=reset_delay_s, start_timeout_s=start_timeout_s,
                                          auto_reset=auto_reset, sequential_seeds=sequential_seeds)
        self.lock = threading.RLock()
        self.set_target_errors = 0

    @property
    def episode(self) -> int:
        return self.sequencer.episode

    @property
    def results(self) -> list[dict[str, Any]]:
        return self.sequencer.results

    # -- episodes --------------------------------------------------------------------------------------------
    def schedule_reset(self, now_ns: int, seed: int | None = None) -> Announcement:
        """Announce a new episode one reset delay from now; the current one is abandoned unscored and the
        robot holds where it is until the reset."""
        with self.lock:
            self.executor.hold(now_ns, self.task.joints()[0], command=False)
            return self.sequencer.schedule(now_ns, seed)

    def _apply_reset(self, ann: Announcement, now_ns: int) -> EpisodeStart:
        inputs = self.task.reset(ann.seed)
        self.executor.reset(now_ns, self.task.joints()[0], ann.episode)
        self.sequencer.begin(ann, now_ns)
        return EpisodeStart(ann.episode, int(now_ns), ann.seed, inputs)

    # -- commands --------------------------------------------------------------------------------------------
    def submit(self, chunk: ActionChunk, now_ns: int) -> tuple[bool, str]:
        with self.lock:
            if self.sequencer.phase is Phase.RESETTING:
                return self.executor.reject(f"outdated: episode {self.sequencer.episode} is over, the arm is "
                                            "held for the next reset")
            ok, reason = self.executor.submit(chunk, now_ns, self.task.joints()[0])
            if ok and self.sequencer.chunk_accepted(now_ns):
                self.task.restart_clock()
            return ok, reason

    def hold(self, now_ns: int) -> None:
        """The hold command: stop where the robot is now."""
        with self.lock:
            self.executor.hold(now_ns, self.task.joints()[0])

    def refuse(self, reason: str) -> tuple[bool, str]:
        """Count a chunk that could not even be converted (wrong joint names, ragged points)."""
        with self.lock:
            return self.executor.reject(reason)

    # -- physics ---------------------------------------------------------------------------------------------
    def step(self, now_ns: int, skipped: int = 0) -> SimState:
        """:meth:`sample` then :meth:`advance`: one feedback period on a virtual clock (``bag.simrun``)."""
        st = self.sample(now_ns)
        result, announced = self.advance(now_ns, skipped)
        return SimState(st.stamp_ns, st.q, st.qd, st.streams, result, announced, st.started)

    def sample(self, now_ns: int) -> SimState:
        """Apply a due reset and measure the joints at ``now_ns``: the feedback sample, published before the
        physics of the period runs, so its latency does not include the step.

        The sample is the state *before* the step, as a robot's feedback is sampled before the command of the
        same cycle takes effect. Sampling after the step (under the next chunk point's set-point) yet stamping
        with the step's start showed the policy joint velocities 2.5-4x the gym environment's at the same
        phase, and closed-loop success through topics dropped accordingly.
        """
        with self.lock:
            started = None
            if (ann := self.sequencer.due(now_ns)) is not None:
                started = self._apply_reset(ann, now_ns)
            q, qd = self.task.joints()
            return SimState(now_ns, q, qd, self.task.stream_inputs(), started=started)

    def advance(self, now_ns: int, skipped: int = 0) -> tuple[dict[str, Any] | None, Announcement | None]:
        """Command the arm for ``now_ns`` and advance one period (plus ``skipped`` dropped ones, up to 50);
        (the result of an episode that ended, the next episode's announcement)."""
        with self.lock:
            seq, task = self.sequencer, self.task
            target = self.executor.command(now_ns, task.joints()[0])
            if target is not None:
                try:
                    task.set_target(target)
                except ValueError:  # cannot happen for validated chunks; never let it stop the physics
                    self.set_target_errors += 1
            scoring = seq.phase is Phase.RUNNING
            for _ in range(self.substeps * (1 + min(skipped, 50))):
                task.step()
                if scoring:
                    task.update()
            result = announced = None
            if scoring and task.done:
                result, announced = seq.finish(now_ns, task.result())
            elif seq.start_overdue(now_ns):
                waited = (now_ns - seq.start_ns) / 1e9
                unscored = {**task.result(), "success": False, "collision": False, "side": None,
                            "duration": 0.0, "time_to_success": None,
                            "start": f"no action chunk within {waited:.1f} s of the reset: is the policy running?"}
                result, announced = seq.finish(now_ns, unscored)
            if result is not None:
                self.executor.hold(now_ns, task.joints()[0], command=False)
        return result, announced

    def snapshot(self) -> tuple[np.ndarray, np.ndarray]:
        """qpos and mocap positions of the Gen3's scene, for rendering on another thread without touching the
        live data."""
        with self.lock:
            d = self.task.arm.data  # type: ignore[attr-defined]
            return d.qpos.copy(), d.mocap_pos.copy()

    def summary(self) -> dict[str, Any]:
        with self.lock:
            res = list(self.sequencer.results)
            counters = self.executor.counters
            commands = {"accepted": counters.accepted, "rejected": counters.rejected, "holds": counters.holds,
                        "timeouts": counters.timeouts, "refused_by_cause": dict(counters.reject_reasons),
                        "stops": list(counters.stops), "state": str(self.executor.state)}
        return {**episode_summary(res), "commands": commands}


#: Per-episode figures a task adds to its results, kept in the episode list (the reach task's closest approach,
#: Push-T's maximum coverage and how far the block moved).
TASK_FIGURES = ("min_distance", "coverage", "block_moved_px")


def result_line(r: dict[str, Any]) -> str:
    """One log line per episode result."""
    outcome = "success" if r.get("success") else "collision" if r.get("collision") else \
        r.get("start") or "time limit"
    side = f", {r['side']}" if r.get("side") else ""
    return f"episode {r.get('episode')} (seed {r.get('seed')}): {outcome}{side} after {r.get('duration', 0):.2f} s"


def episode_summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts over episode results, and each episode's figures (the sim's and the stand-in's alike).

    ``collision_after_start_s`` is the collision's time after the episode's clock started (its duration,
    since a collision ends the episode): the bringup checks that none comes right after a reset.
    """
    n = len(results)
    episodes = [{"episode": r.get("episode"), "seed": r.get("seed"), "success": bool(r.get("success")),
                 "collision": bool(r.get("collision")), "side": r.get("side"),
                 "collision_after_start_s": r.get("duration") if r.get("collision") else None,
                 "waited_s": r.get("waited_s"), **({"start": r["start"]} if "start" in r else {}),
                 **{k: r[k] for k in TASK_FIGURES if r.get(k) is not None}}
                for r in results]
    coverage = [r["coverage"] for r in results if r.get("coverage") is not None]
    return {
        "episodes": n,
        "mean_max_coverage": float(np.mean(coverage)) if coverage else None,
        "successes": sum(e["success"] for e in episodes),
        "collisions": sum(e["collision"] for e in episodes),
        "success_rate": (sum(e["success"] for e in episodes) / n) if n else None,
        "sides": {str(s).lower(): sum(e["side"] == s for e in episodes) for s in ("left", "right", None)},
        "episode_list": episodes,
    }
