"""Action chunks and their execution: time-indexed interpolation, clamping, hold on timeout.

Chunk timing convention (shared by the policy node, the sim node and the Kinova bridge): a chunk carries
the stamp of the newest observation it was computed from; point ``i`` of the policy's output applies at
``stamp + (i - (n_obs_steps - 1)) * control_dt``. Points before the stamp are dropped when publishing, so a
published chunk starts at ``time_from_start = 0``. The executor always follows the newest chunk by stamp.
"""

from __future__ import annotations

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

    @classmethod
    def from_offsets(cls, stamp_ns: int, offsets_s: Sequence[float], positions: np.ndarray) -> ActionChunk:
        offsets = np.asarray(offsets_s, dtype=np.float64)
        return cls(int(stamp_ns), stamp_ns + np.round(offsets * NS).astype(np.int64),
                   np.asarray(positions, dtype=np.float64))


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
    HOLD = "hold"  # command timeout: holding where the arm was when commands stopped


@dataclass
class ExecutorCounters:
    accepted: int = 0
    rejected: int = 0
    clamped: int = 0
    timeouts: int = 0
    last_reject_reason: str = ""
    reject_reasons: dict[str, int] = field(default_factory=dict)


class ChunkExecutor:
    """Turns the newest chunk into a joint position target at any instant.

    * ``submit`` validates a chunk (shape, finite, times increasing, newer than the current one and than the
      last reset) and clamps positions into the joint limits (counted, never silently passed through).
    * ``command`` interpolates the current chunk at ``now`` (linear, or zero-order hold as the 10 Hz task
      applies actions), holds its last point after the end, and once no chunk has arrived for
      ``timeout_s`` holds the arm where it is measured to be: commands stopping means stop, not "finish the
      old plan".
    """

    def __init__(self, lower: np.ndarray, upper: np.ndarray, timeout_s: float = 0.3,
                 interpolation: str = "linear") -> None:
        if interpolation not in ("linear", "zoh"):
            raise ValueError(f"interpolation must be 'linear' or 'zoh', got {interpolation!r}")
        if not timeout_s > 0:
            raise ValueError(f"command timeout must be positive, got {timeout_s}")
        self.lower = np.asarray(lower, dtype=np.float64)
        self.upper = np.asarray(upper, dtype=np.float64)
        self.n_joints = self.lower.size
        self.timeout_ns = round(timeout_s * NS)
        self.interpolation = interpolation
        self.counters = ExecutorCounters()
        self.state = ExecState.IDLE
        self._chunk: ActionChunk | None = None
        self._received_ns = 0
        self._min_stamp_ns = -(2**62)
        self._hold_q: np.ndarray | None = None

    def reset(self, now_ns: int, hold_q: np.ndarray) -> None:
        """Forget the plan (new episode): hold ``hold_q`` and refuse chunks computed before ``now_ns``."""
        self._chunk = None
        self._min_stamp_ns = int(now_ns)
        self._hold_q = np.clip(np.asarray(hold_q, dtype=np.float64), self.lower, self.upper)
        self.state = ExecState.IDLE

    def reject(self, reason: str) -> tuple[bool, str]:
        """Count a refused chunk under the reason's prefix (also used for messages that fail to convert)."""
        c = self.counters
        c.rejected += 1
        c.last_reject_reason = reason
        key = reason.split(":")[0]
        c.reject_reasons[key] = c.reject_reasons.get(key, 0) + 1
        return False, reason

    def submit(self, chunk: ActionChunk, now_ns: int) -> tuple[bool, str]:
        """Accept or refuse a chunk; returns (accepted, reason)."""
        pos = chunk.positions
        if pos.ndim != 2 or pos.shape[1] != self.n_joints or pos.shape[0] < 1:
            return self.reject(f"bad shape: {pos.shape}, expected (N, {self.n_joints})")
        if chunk.times_ns.shape != (pos.shape[0],):
            return self.reject(f"bad shape: {chunk.times_ns.shape[0]} times for {pos.shape[0]} points")
        if not np.isfinite(pos).all():
            return self.reject("non-finite: NaN/inf positions")
        if pos.shape[0] > 1 and not (np.diff(chunk.times_ns) > 0).all():
            return self.reject("bad timing: time_from_start must increase strictly")
        if chunk.stamp_ns < self._min_stamp_ns:
            return self.reject("outdated: computed before the last episode reset")
        if self._chunk is not None and chunk.stamp_ns < self._chunk.stamp_ns:
            return self.reject("outdated: older than the chunk being executed")
        if chunk.times_ns[-1] < now_ns - self.timeout_ns:
            return self.reject("outdated: every point is in the past")
        clipped = np.clip(pos, self.lower, self.upper)
        if not np.array_equal(clipped, pos):
            self.counters.clamped += 1
            chunk = ActionChunk(chunk.stamp_ns, chunk.times_ns, clipped)
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
