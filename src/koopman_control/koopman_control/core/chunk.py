"""Action chunks and their execution: the arm's command checks, time-indexed interpolation, hold.

Chunk timing convention (shared by the policy node, the sim node and the Kinova bridge): a chunk carries
the stamp of the newest observation it was computed from; point ``i`` of the policy's output applies at
``stamp + (i - (n_obs_steps - 1)) * control_dt``. Points before the stamp are dropped when publishing, so a
published chunk starts at ``time_from_start = 0``. The executor always follows the newest chunk by stamp.
A chunk with no points is the hold command (as ``joint_trajectory_controller`` reads an empty trajectory):
the arm stops where it is measured to be, at once.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import numpy as np

from koopman_control.core.observation import NS


@dataclass(frozen=True)
class ActionChunk:
    stamp_ns: int
    times_ns: np.ndarray  # (N,) int64, absolute, strictly increasing
    positions: np.ndarray  # (N, n_joints) float64
    episode: int | None = None  # the episode of the observation it answers (None: a source without episodes)

    @classmethod
    def from_offsets(cls, stamp_ns: int, offsets_s: Sequence[float], positions: np.ndarray,
                     episode: int | None = None) -> ActionChunk:
        offsets = np.asarray(offsets_s, dtype=np.float64)
        return cls(int(stamp_ns), stamp_ns + np.round(offsets * NS).astype(np.int64),
                   np.asarray(positions, dtype=np.float64), episode)


def policy_chunk_offsets(horizon: int, n_obs_steps: int, control_dt: float) -> np.ndarray:
    """time_from_start (s) of every point of a policy output relative to the observation stamp."""
    return (np.arange(horizon) - (n_obs_steps - 1)) * control_dt


def published_points(chunk: np.ndarray, n_obs_steps: int, control_dt: float) -> tuple[np.ndarray, np.ndarray]:
    """The points of a policy chunk ``(H, Da)`` at or after the stamp, with their offsets (s)."""
    offsets = policy_chunk_offsets(chunk.shape[0], n_obs_steps, control_dt)
    keep = offsets >= -1e-9
    return offsets[keep], chunk[keep]


class ExecState(StrEnum):
    IDLE = "idle"  # no chunk yet (or since reset): holding the reset pose
    TRACKING = "tracking"
    HOLD = "hold"  # watchdog or hold command: holding where the arm was when commands stopped


#: Refusal causes, the prefix of every refusal reason (counted per cause).
REFUSALS = ("bad shape", "non-finite", "bad timing", "out of limits", "too far", "outdated", "stale",
            "not running")


@dataclass(frozen=True)
class CommandChecks:
    """What an arm accepts, shared by the Kortex bridge and the sim node that stands in for it.

    One set of values (``config/kinova.yaml``, given to the sim by the stack description), so that what runs
    in simulation is what the arm would accept: a chunk is refused when it is malformed or non-finite, leaves
    the position limits, starts more than ``max_start_deviation`` from the measured position, answers an
    observation older than ``max_chunk_age`` or an earlier episode; no accepted chunk for
    ``watchdog_timeout`` stops the arm.
    """

    lower: np.ndarray
    upper: np.ndarray
    watchdog_timeout: float = 0.15
    max_start_deviation: float = 0.35
    max_chunk_age: float = 0.1
    interpolation: str = "linear"

    def __post_init__(self) -> None:
        lower = np.asarray(self.lower, dtype=np.float64)
        upper = np.asarray(self.upper, dtype=np.float64)
        if lower.shape != upper.shape or lower.ndim != 1 or not (lower < upper).all():
            raise ValueError(f"position limits must be two equal-length vectors with lower < upper, got "
                             f"{lower.tolist()} and {upper.tolist()}")
        object.__setattr__(self, "lower", lower)
        object.__setattr__(self, "upper", upper)
        for name in ("watchdog_timeout", "max_start_deviation", "max_chunk_age"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and np.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        if self.interpolation not in ("linear", "zoh"):
            raise ValueError(f"interpolation must be 'linear' or 'zoh', got {self.interpolation!r}")


@dataclass
class ExecutorCounters:
    accepted: int = 0
    rejected: int = 0
    holds: int = 0  # hold commands (empty chunks) obeyed
    timeouts: int = 0  # watchdog stops
    last_reject_reason: str = ""
    reject_reasons: dict[str, int] = field(default_factory=dict)
    # When the arm was stopped, why, and when the last chunk before it was accepted (the fault run times these).
    stops: deque[tuple[int, str, int]] = field(default_factory=lambda: deque(maxlen=200))


class ChunkExecutor:
    """Turns the newest accepted chunk into a joint position target at any instant.

    * ``submit`` applies :class:`CommandChecks` and refuses (never clamps) what the arm would not take.
    * ``command`` interpolates the current chunk at ``now`` (linear, or zero-order hold as the 10 Hz task
      applies actions), holds its last point after the end, and once no chunk has arrived for the watchdog
      timeout holds the arm where it is measured to be: commands stopping means stop, not "finish the old
      plan". ``hold`` does the same at once.
    """

    def __init__(self, checks: CommandChecks) -> None:
        self.checks = checks
        self.lower, self.upper = checks.lower, checks.upper
        self.n_joints = self.lower.size
        self.timeout_ns = round(checks.watchdog_timeout * NS)
        self.max_age_ns = round(checks.max_chunk_age * NS)
        self.interpolation = checks.interpolation
        self.counters = ExecutorCounters()
        self.state = ExecState.IDLE
        self.episode: int | None = None
        self._chunk: ActionChunk | None = None
        self._received_ns = 0
        self._min_stamp_ns = -(2**62)
        self._hold_q: np.ndarray | None = None

    def reset(self, now_ns: int, hold_q: np.ndarray, episode: int | None = None) -> None:
        """Forget the plan (new episode, fault cleared): hold ``hold_q``, refuse chunks computed before
        ``now_ns`` and, when ``episode`` is given, chunks labelled with another episode."""
        self._chunk = None
        self._min_stamp_ns = int(now_ns)
        self.episode = episode
        self._hold_q = np.clip(np.asarray(hold_q, dtype=np.float64), self.lower, self.upper)
        self.state = ExecState.IDLE

    def reject(self, reason: str) -> tuple[bool, str]:
        """Count a refused chunk under its cause (the reason's prefix, one of :data:`REFUSALS`)."""
        c = self.counters
        c.rejected += 1
        c.last_reject_reason = reason
        key = reason.split(":")[0]
        c.reject_reasons[key] = c.reject_reasons.get(key, 0) + 1
        return False, reason

    def hold(self, now_ns: int, measured_q: np.ndarray, command: bool = True) -> None:
        """Stop where the arm is now: the hold command (counted), or the robot's own hold (``command`` False:
        an episode ended, a reset is pending)."""
        if command:
            self.counters.holds += 1
            self.counters.stops.append((int(now_ns), "hold command", self._received_ns))
        self._chunk = None
        self._hold_q = np.clip(np.asarray(measured_q, dtype=np.float64), self.lower, self.upper)
        self._received_ns = int(now_ns)
        self.state = ExecState.HOLD

    def submit(self, chunk: ActionChunk, now_ns: int, measured_q: np.ndarray | None = None) -> tuple[bool, str]:
        """Accept or refuse a chunk; returns (accepted, reason). ``measured_q`` enables the start check."""
        c = self.checks
        pos = chunk.positions
        if pos.ndim != 2 or pos.shape[1] != self.n_joints or pos.shape[0] < 1:
            return self.reject(f"bad shape: {pos.shape}, expected (N, {self.n_joints})")
        if chunk.times_ns.shape != (pos.shape[0],):
            return self.reject(f"bad shape: {chunk.times_ns.shape[0]} times for {pos.shape[0]} points")
        if not np.isfinite(pos).all():
            return self.reject("non-finite: NaN/inf positions")
        if pos.shape[0] > 1 and not (np.diff(chunk.times_ns) > 0).all():
            return self.reject("bad timing: time_from_start must increase strictly")
        if self.episode is not None and chunk.episode is not None and chunk.episode != self.episode:
            return self.reject(f"outdated: computed in episode {chunk.episode}, the arm is in episode "
                               f"{self.episode}")
        if chunk.stamp_ns < self._min_stamp_ns:
            return self.reject("outdated: computed before the last reset of the arm")
        if self._chunk is not None and chunk.stamp_ns < self._chunk.stamp_ns:
            return self.reject("outdated: older than the chunk being executed")
        age = now_ns - chunk.stamp_ns
        if age > self.max_age_ns:
            return self.reject(f"stale: computed from an observation {age / 1e6:.0f} ms old "
                               f"(limit {self.max_age_ns / 1e6:.0f} ms)")
        low, high = pos < self.lower - 1e-9, pos > self.upper + 1e-9
        if low.any() or high.any():
            j = int(np.argwhere(low | high)[0, 1])
            worst = pos[:, j].min() if low[:, j].any() else pos[:, j].max()
            return self.reject(f"out of limits: joint {j + 1} target {worst:.3f} outside "
                               f"[{self.lower[j]:.3f}, {self.upper[j]:.3f}]")
        if measured_q is not None:
            dev = float(np.max(np.abs(self.sample(chunk, now_ns) - np.asarray(measured_q, dtype=np.float64))))
            if dev > c.max_start_deviation:
                return self.reject(f"too far: chunk starts {dev:.3f} rad from the measured position "
                                   f"(limit {c.max_start_deviation} rad)")
        self._chunk = chunk
        self._received_ns = int(now_ns)
        self.counters.accepted += 1
        self.state = ExecState.TRACKING
        return True, "ok"

    def command(self, now_ns: int, measured_q: np.ndarray) -> np.ndarray | None:
        """The position target for ``now``; None means "keep the current target" (idle, nothing to follow)."""
        if self.state is ExecState.TRACKING and now_ns - self._received_ns > self.timeout_ns:
            self.state = ExecState.HOLD
            self.counters.timeouts += 1
            self.counters.stops.append((int(now_ns), "watchdog", self._received_ns))
            self._hold_q = np.clip(np.asarray(measured_q, dtype=np.float64), self.lower, self.upper)
            self._chunk = None
        if self.state is not ExecState.TRACKING or self._chunk is None:
            return self._hold_q
        return self.sample(self._chunk, now_ns)

    def sample(self, chunk: ActionChunk, now_ns: int) -> np.ndarray:
        t, p = chunk.times_ns, chunk.positions
        if now_ns <= t[0]:
            return p[0]
        if now_ns >= t[-1]:
            return p[-1]
        i = int(np.searchsorted(t, now_ns, side="right")) - 1
        if self.interpolation == "zoh":
            return p[i]
        a = (now_ns - t[i]) / (t[i + 1] - t[i])
        return p[i] + a * (p[i + 1] - p[i])

    @property
    def chunk(self) -> ActionChunk | None:
        return self._chunk
