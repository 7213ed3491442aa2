"""Policy observations from raw sensor samples: policy-rate ticks, history, NaN and staleness checks.

The flow is driven by the sensor stream itself: a joint-state sample whose stamp crosses the next policy
tick becomes the newest step of the history and the observation is emitted at once, stamped with that
sample's measurement time. The policy rate therefore follows the robot's clock, and the latency a policy
adds is measured from a real measurement time. A stale, broken or out-of-order input clears the history:
the flow of observations stops and the reason is reported; nothing old is ever re-sent as if it were new.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

NS = 1_000_000_000


class InputStatus(StrEnum):
    OK = "ok"
    WAITING = "waiting"  # not every input has been seen yet (e.g. no target)
    STALE = "stale"
    INVALID = "invalid"


@dataclass(frozen=True)
class Observation:
    """A history of ``n_steps`` samples taken at the policy rate, oldest first."""

    stamp_ns: int  # measurement time of the newest step: the stamp latency is measured from
    history: np.ndarray  # (n_steps, *shape) float32
    stamps_ns: np.ndarray  # (n_steps,) int64; equal stamps mark padding at an episode start
    episode: int
    padded: bool


class ObservationHistory:
    """Fixed-length history of samples pushed once per tick (``period_s``), its steps ``spacing_s`` apart.

    The spacing is the model's control period, which the history was trained with; ticks may come faster
    (a 100 Hz controller for a 10 Hz model, ``spacing_s`` a whole multiple of ``period_s``): each step is then
    the buffered tick nearest to its time. A gap longer than ``period * (1 + gap_tolerance)``, or half the
    spacing when that is longer, breaks the history (the spacing no longer holds), so it restarts from the new
    sample and emits again only when full. (At 100 Hz ticks a single feedback sample 11 ms late made two ticks
    21 ms apart; a 15 ms limit then emptied a 0.1 s history, ten ticks without an observation, 4 times in a
    10 minute run.)
    """

    def __init__(self, n_steps: int, period_s: float, gap_tolerance: float = 0.5,
                 spacing_s: float | None = None) -> None:
        if n_steps < 1:
            raise ValueError(f"n_steps must be >= 1, got {n_steps}")
        if not period_s > 0:
            raise ValueError(f"period must be positive, got {period_s}")
        spacing_s = period_s if spacing_s is None else spacing_s
        ratio = spacing_s / period_s
        if ratio < 1 - 1e-6 or abs(ratio - round(ratio)) > 0.01:
            raise ValueError(f"history spacing {spacing_s} s must be a whole multiple of the tick period {period_s} s")
        self.n_steps = int(n_steps)
        self.stride = round(ratio)
        self.period_ns = round(period_s * NS)
        self.spacing_ns = round(spacing_s * NS)
        self.max_gap_ns = round(max(period_s * (1.0 + gap_tolerance), 0.5 * spacing_s) * NS)
        self._items: deque[tuple[int, np.ndarray]] = deque(maxlen=(self.n_steps - 1) * self.stride + 1)
        self.gaps = 0

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)

    def push(self, stamp_ns: int, value: np.ndarray, episode: int = 0, pad: bool = False) -> Observation | None:
        """Add a sample; returns the observation once the history is full. ``pad`` fills an empty history with
        copies of this sample (the convention at an episode start, as in training)."""
        if self._items and stamp_ns - self._items[-1][0] > self.max_gap_ns:
            self.gaps += 1
            self._items.clear()
        padded = pad and not self._items
        if padded:
            self._items.extend([(stamp_ns, value)] * self._items.maxlen)
        else:
            self._items.append((stamp_ns, value))
        if len(self._items) < self._items.maxlen:
            return None
        if self.stride == 1:
            steps = list(self._items)
        else:
            have = np.array([s for s, _ in self._items], dtype=np.int64)
            want = stamp_ns - np.arange(self.n_steps - 1, -1, -1) * self.spacing_ns
            steps = [self._items[int(np.argmin(np.abs(have - w)))] for w in want]
        stamps = np.array([s for s, _ in steps], dtype=np.int64)
        hist = np.stack([v for _, v in steps]).astype(np.float32, copy=False)
        return Observation(stamp_ns, hist, stamps, episode, padded or bool(stamps[0] == stamps[-1]))


def reorder(names: Sequence[str], values: Sequence[float], wanted: Sequence[str], what: str) -> np.ndarray:
    """Values of ``wanted`` names in that order; raises ValueError naming what is missing or malformed."""
    if len(values) != len(names):
        raise ValueError(f"{what}: {len(values)} values for {len(names)} names")
    index = {n: i for i, n in enumerate(names)}
    missing = [n for n in wanted if n not in index]
    if missing:
        raise ValueError(f"{what}: missing {', '.join(missing)}")
    return np.array([values[index[n]] for n in wanted], dtype=np.float64)


class StateObservationBuilder:
    """``/joint_states`` + task target and pillar -> the 20-d task observation history at the policy rate.

    Vector layout (the task's OBS_NAMES): ``[q(7), qd(7), target_xyz(3), pillar_xyz(3)]``.
    """

    def __init__(
        self,
        joint_names: Sequence[str],
        n_obs_steps: int,
        policy_rate_hz: float,
        max_state_age_s: float = 0.05,
        tick_tolerance_s: float = 0.0005,
        use_task: bool = True,
        history_spacing_s: float | None = None,
    ) -> None:
        if not policy_rate_hz > 0 or not math.isfinite(policy_rate_hz):
            raise ValueError(f"policy_rate must be a positive number of Hz, got {policy_rate_hz}")
        if not max_state_age_s > 0:
            raise ValueError(f"max_state_age must be positive, got {max_state_age_s}")
        self.joint_names = tuple(joint_names)
        self.period_ns = round(NS / policy_rate_hz)
        self.max_age_ns = round(max_state_age_s * NS)
        self.tol_ns = round(tick_tolerance_s * NS)
        self.use_task = use_task
        self.history = ObservationHistory(n_obs_steps, 1.0 / policy_rate_hz, spacing_s=history_spacing_s)
        self.target: np.ndarray | None = None
        self.pillar: np.ndarray | None = None
        self.episode = 0
        self.status = InputStatus.WAITING
        self.reason = "no joint state yet"
        self.last_state_stamp_ns: int | None = None
        self._last_rx_ns: int | None = None
        self._next_tick_ns: int | None = None
        self._pad_next = True
        self.emitted = 0
        self.missed_ticks = 0
        self.faults = 0  # transitions into STALE or INVALID
        self.dropped = 0  # out-of-order samples

    # -- inputs ----------------------------------------------------------------------------------------------
    def set_task(self, target: Sequence[float] | None = None, pillar: Sequence[float] | None = None) -> None:
        for name, value in (("target", target), ("pillar", pillar)):
            if value is None:
                continue
            arr = np.asarray(value, dtype=np.float64)
            if arr.shape != (3,) or not np.isfinite(arr).all():
                self._fault(InputStatus.INVALID, f"task {name} must be 3 finite numbers, got {value!r}")
                setattr(self, name, None)
                continue
            setattr(self, name, arr)

    def set_episode(self, episode: int) -> None:
        """A new episode: the history restarts (padded), the tick grid re-anchors on the next sample."""
        if episode != self.episode:
            self.episode = int(episode)
            self.history.clear()
            self._pad_next = True
            self._next_tick_ns = None

    def align_grid(self, grid_ns: int) -> None:
        """Put the tick grid on ``grid_ns + k * period`` from the newest sample on (a replay reconstructing the
        grid a live ingest anchored before its recording started)."""
        if self.last_state_stamp_ns is not None:
            k = (self.last_state_stamp_ns + self.tol_ns - grid_ns) // self.period_ns + 1
            self._next_tick_ns = grid_ns + k * self.period_ns

    def on_joint_state(
        self, names: Sequence[str], position: Sequence[float], velocity: Sequence[float], stamp_ns: int,
        now_ns: int,
    ) -> Observation | None:
        """Feed one sample; returns an observation when this sample is the one at a policy tick."""
        self._last_rx_ns = now_ns  # the stream is alive, whatever its content (the watchdog's business)
        try:
            q = reorder(names, position, self.joint_names, "joint_states position")
            if len(velocity) == 0:
                raise ValueError("joint_states has no velocities")
            qd = reorder(names, velocity, self.joint_names, "joint_states velocity")
        except ValueError as err:
            self._fault(InputStatus.INVALID, str(err))
            return None
        if not (np.isfinite(q).all() and np.isfinite(qd).all()):
            finite = np.isfinite(q) & np.isfinite(qd)
            bad = [n for n, ok in zip(self.joint_names, finite, strict=True) if not ok]
            self._fault(InputStatus.INVALID, f"joint_states has NaN/inf for {', '.join(bad)}")
            return None
        age = now_ns - stamp_ns
        if age > self.max_age_ns:
            self._fault(InputStatus.STALE,
                        f"joint state is {age / 1e6:.1f} ms old (limit {self.max_age_ns / 1e6:.0f} ms)")
            return None
        if age < -self.max_age_ns:
            self._fault(InputStatus.INVALID,
                        f"joint state stamped {-age / 1e6:.1f} ms in the future (clock skew?)")
            return None
        if self.last_state_stamp_ns is not None and stamp_ns <= self.last_state_stamp_ns:
            self.dropped += 1
            return None
        self.last_state_stamp_ns = stamp_ns
        if self.use_task and (self.target is None or self.pillar is None):
            self.status, self.reason = InputStatus.WAITING, "no task target/pillar yet"
            return None
        if self._next_tick_ns is not None and stamp_ns < self._next_tick_ns - self.tol_ns:
            return None
        if self._next_tick_ns is None:
            self._next_tick_ns = stamp_ns + self.period_ns
        else:
            late = (stamp_ns + self.tol_ns - self._next_tick_ns) // self.period_ns  # whole periods skipped
            if late > 0:
                self.missed_ticks += int(late)
            self._next_tick_ns += (late + 1) * self.period_ns
        parts = [q, qd] + ([self.target, self.pillar] if self.use_task else [])
        obs = self.history.push(stamp_ns, np.concatenate(parts), self.episode, pad=self._pad_next)
        self._pad_next = False
        if self.status is not InputStatus.OK:
            self.status, self.reason = InputStatus.OK, "ok"
        if obs is not None:
            self.emitted += 1
        return obs

    def check(self, now_ns: int) -> InputStatus:
        """Watchdog, called from a timer: no joint state at all within the age limit stops the flow. (Samples
        that arrive but are broken or old are judged, and reported, as they arrive.)"""
        if self._last_rx_ns is None:
            return self.status
        age = now_ns - self._last_rx_ns
        if age > self.max_age_ns and self.status is not InputStatus.STALE:
            self._fault(InputStatus.STALE,
                        f"no joint state for {age / 1e6:.0f} ms (limit {self.max_age_ns / 1e6:.0f} ms)")
        return self.status

    def _fault(self, status: InputStatus, reason: str) -> None:
        if self.status not in (InputStatus.STALE, InputStatus.INVALID):
            self.faults += 1
        self.status, self.reason = status, reason
        self.history.clear()
        self._next_tick_ns = None
