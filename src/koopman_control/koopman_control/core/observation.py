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
from typing import Any

import numpy as np

from koopman_control.core.clock import NS
from koopman_control.core.episodes import EpisodeTimeline
from koopman_policy.contract import Feature

__all__ = ["NS", "InputStatus", "JointBounds", "Observation", "ObservationHistory", "StateObservationBuilder",
           "reorder"]


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


@dataclass(frozen=True)
class JointBounds:
    """What a joint sample can physically be: positions near the limits, speeds and steps near the rated speed.

    A sample outside these bounds is not the arm's (a second publisher, a driver fault, 1e9 from a bad
    conversion): it stops the observations instead of reaching a policy, which answered such inputs with
    targets of -3.9 to 15.7 rad. ``speed_factor`` leaves room for what the arm really does (the sim's
    joints briefly exceed their rated speeds in contacts) while catching what it cannot. Joints without known
    limits carry infinities and are checked for finiteness only.
    """

    lower: np.ndarray
    upper: np.ndarray
    speed: np.ndarray  # rated joint speeds
    position_margin: float = 0.1
    speed_factor: float = 3.0
    step_tolerance: float = 0.05  # plus the distance that speed covers between two samples

    def check(self, names: Sequence[str], q: np.ndarray, qd: np.ndarray | None, prev: tuple[int, np.ndarray] | None,
              stamp_ns: int) -> tuple[str, str] | None:
        """(cause, reason) when the sample is implausible, else None."""
        lo, hi = self.lower - self.position_margin, self.upper + self.position_margin
        bad = (q < lo) | (q > hi)
        if bad.any():
            j = int(np.flatnonzero(bad)[0])
            return "implausible position", (f"joint_states {names[j]} = {q[j]:.4g} outside its limits "
                                            f"[{self.lower[j]:.4g}, {self.upper[j]:.4g}]")
        vmax = self.speed_factor * self.speed
        if qd is not None:
            bad = np.abs(qd) > vmax
            if bad.any():
                j = int(np.flatnonzero(bad)[0])
                return "implausible velocity", (f"joint_states {names[j]} velocity {qd[j]:.4g} beyond "
                                                f"{self.speed_factor:g}x its rated {self.speed[j]:.4g}")
        if prev is not None:
            dt = (stamp_ns - prev[0]) / NS
            step = np.abs(q - prev[1])
            bad = step > vmax * dt + self.step_tolerance
            if bad.any():
                j = int(np.flatnonzero(bad)[0])
                return "jump", (f"joint_states {names[j]} jumped {step[j]:.4g} in {dt * 1e3:.1f} ms (a second "
                                "publisher, or a reset that was not announced?)")
        return None


@dataclass
class _Vector:
    """A vector feature's recent values, each with its stamp (the message's, or its receive time)."""

    feature: Feature
    values: deque[tuple[int, np.ndarray]]


class StateObservationBuilder:
    """``joint_states`` + the contract's vector features -> the observation history at the policy rate.

    The vector is the contract's observation names in order (images apart): for the reach task
    ``[q(7), qd(7), target_xyz(3), pillar_xyz(3)]``. Every sample belongs to the episode its stamp falls in
    (:class:`~koopman_control.core.episodes.EpisodeTimeline`); an ``episode``-scoped input to the episode whose
    start its stamp is at or after; a ``stream`` input is paired with the joint sample of the tick by stamp (the
    tick waits for it, up to the age limit): a history never holds samples of two episodes, nor one
    episode's joints with another's inputs, whatever order the topics arrive in. Continuous joints are
    unwrapped onto the training data's branch (their feature's ``reference``), then kept continuous.
    """

    def __init__(
        self,
        features: Sequence[Feature],
        n_obs_steps: int,
        policy_rate_hz: float,
        max_state_age_s: float = 0.05,
        tick_tolerance_s: float = 0.0005,
        history_spacing_s: float | None = None,
        bounds: JointBounds | None = None,
    ) -> None:
        if not policy_rate_hz > 0 or not math.isfinite(policy_rate_hz):
            raise ValueError(f"policy_rate must be a positive number of Hz, got {policy_rate_hz}")
        if not max_state_age_s > 0:
            raise ValueError(f"max_state_age must be positive, got {max_state_age_s}")
        self.features = [f for f in features if f.kind != "image"]
        joints: list[str] = []
        for f in self.features:
            joints += [j for j in f.joints if j not in joints]
        if not joints:
            raise ValueError("the observation has no joint feature: nothing drives its ticks")
        self.joint_names = tuple(joints)
        self.names = tuple(n for f in self.features for n in f.names)
        if bounds is not None and bounds.lower.shape != (len(joints),):
            raise ValueError(f"joint bounds have {bounds.lower.size} entries for {len(joints)} joints")
        self.bounds = bounds
        self.needs_velocity = any(f.kind == "joint_velocity" for f in self.features)
        jidx = {j: k for k, j in enumerate(joints)}
        self._parts: list[tuple[str, Any]] = []  # how each feature is filled from a sample
        self._vectors: dict[str, _Vector] = {}
        self._continuous = np.zeros(len(joints), bool)
        self._reference = np.full(len(joints), np.nan)
        for f in self.features:
            if f.kind in ("joint_position", "joint_velocity"):
                self._parts.append((f.kind, np.array([jidx[j] for j in f.joints])))
                for k, j in enumerate(f.joints):
                    if f.continuous and f.continuous[k]:
                        self._continuous[jidx[j]] = True
                        if f.reference:
                            self._reference[jidx[j]] = f.reference[k]
            else:
                self._parts.append(("vector", f.name))
                v = _Vector(f, deque(maxlen=8))
                if f.value is not None:
                    v.values.append((-(2**62), np.asarray(f.value, dtype=np.float64)))
                self._vectors[f.name] = v
        self.period_ns = round(NS / policy_rate_hz)
        self.max_age_ns = round(max_state_age_s * NS)
        self.tol_ns = round(tick_tolerance_s * NS)
        self.history = ObservationHistory(n_obs_steps, 1.0 / policy_rate_hz, spacing_s=history_spacing_s)
        self.timeline = EpisodeTimeline()
        self.episode = 0
        self.status = InputStatus.WAITING
        self.reason = "no joint state yet"
        self.cause = ""
        self.last_state_stamp_ns: int | None = None
        self._prev: tuple[int, np.ndarray] | None = None  # last plausible sample of this episode: (stamp, q)
        self._unwrapped: np.ndarray | None = None  # last unwrapped q, the branch the next sample continues
        self._pending: tuple[int, np.ndarray, np.ndarray | None, int] | None = None  # a tick waiting for streams
        self._last_rx_ns: int | None = None
        self._next_tick_ns: int | None = None
        self._pad_next = True
        self.emitted = 0
        self.missed_ticks = 0
        self.faults = 0  # transitions into STALE or INVALID
        self.dropped = 0  # out-of-order samples
        self.episode_starts = 0  # histories restarted at an episode boundary
        self.events: list[tuple[str, str]] = []  # (cause, reason) of every fault since the caller last took them

    # -- inputs ----------------------------------------------------------------------------------------------
    def announce_episode(self, episode: int, start_ns: int) -> None:
        """An episode announcement (``task/episode``): samples stamped from ``start_ns`` on are its own."""
        if self.timeline.announce(episode, start_ns) and self.last_state_stamp_ns is not None \
                and start_ns <= self.last_state_stamp_ns:
            # Samples of the new episode arrived before its announcement (see core.episodes): drop the
            # history they went into.
            self._new_episode(self.timeline.episode_at(self.last_state_stamp_ns))

    def set_vector(self, name: str, stamp_ns: int, value: Sequence[float], now_ns: int | None = None
                   ) -> Observation | None:
        """A vector feature's value stamped ``stamp_ns``; returns the observation of a tick that waited for it."""
        v = self._vectors.get(name)
        if v is None:
            raise ValueError(f"unknown vector feature {name!r}; this ingest reads {sorted(self._vectors)}")
        arr = np.asarray(value, dtype=np.float64)
        if arr.shape != (v.feature.dim,) or not np.isfinite(arr).all():
            self._fault(InputStatus.INVALID, f"{name} invalid", f"{name} from {v.feature.source()} must be "
                                                                f"{v.feature.dim} finite numbers, got {list(value)!r}")
            return None
        v.values.append((int(stamp_ns), arr))
        if self._pending is not None and v.feature.scope == "stream":
            return self._emit(*self._pending)
        return None

    def _vector_at(self, v: _Vector, stamp_ns: int) -> np.ndarray | None:
        if v.feature.value is not None:
            return v.values[0][1]
        if v.feature.scope == "episode":
            start = self.timeline.start_of(stamp_ns)
            for t, val in reversed(v.values):
                if t <= stamp_ns and (start is None or t >= start):
                    return val
            return None
        # stream: the value measured with this sample (its stamp, within the tick tolerance)
        for t, val in reversed(v.values):
            if abs(t - stamp_ns) <= self.tol_ns:
                return val
            if t < stamp_ns - self.tol_ns:
                return None
        return None

    def _new_episode(self, episode: int) -> None:
        self.episode = int(episode)
        self.history.clear()
        self._pad_next = True
        self._next_tick_ns = None
        self._prev = None
        self._pending = None
        self.episode_starts += 1

    def align_grid(self, grid_ns: int) -> None:
        """Put the tick grid on ``grid_ns + k * period`` from the newest sample on (a replay reconstructing the
        grid a live ingest anchored before its recording started)."""
        if self.last_state_stamp_ns is not None:
            k = (self.last_state_stamp_ns + self.tol_ns - grid_ns) // self.period_ns + 1
            self._next_tick_ns = grid_ns + k * self.period_ns

    def _unwrap(self, q: np.ndarray) -> np.ndarray:
        """Continuous joints onto the branch of the previous sample, or the training data's (first sample)."""
        if not self._continuous.any():
            return q
        ref = self._unwrapped if self._unwrapped is not None else np.where(np.isnan(self._reference), q,
                                                                            self._reference)
        c = self._continuous
        q = q.copy()
        q[c] = q[c] + 2 * np.pi * np.round((ref[c] - q[c]) / (2 * np.pi))
        return q

    def on_joint_state(
        self, names: Sequence[str], position: Sequence[float], velocity: Sequence[float], stamp_ns: int,
        now_ns: int,
    ) -> Observation | None:
        """Feed one sample; returns an observation when this sample is the one at a policy tick."""
        self._last_rx_ns = now_ns  # the stream is alive, whatever its content (the watchdog's business)
        try:
            q = reorder(names, position, self.joint_names, "joint_states position")
            qd = None
            if self.needs_velocity:
                if len(velocity) == 0:
                    raise ValueError("joint_states has no velocities")
                qd = reorder(names, velocity, self.joint_names, "joint_states velocity")
        except ValueError as err:
            self._fault(InputStatus.INVALID, "malformed", str(err))
            return None
        if not (np.isfinite(q).all() and (qd is None or np.isfinite(qd).all())):
            finite = np.isfinite(q) & (np.isfinite(qd) if qd is not None else True)
            bad = [n for n, ok in zip(self.joint_names, finite, strict=True) if not ok]
            self._fault(InputStatus.INVALID, "non-finite", f"joint_states has NaN/inf for {', '.join(bad)}")
            return None
        age = now_ns - stamp_ns
        if age > self.max_age_ns:
            self._fault(InputStatus.STALE, "stale",
                        f"joint state is {age / 1e6:.1f} ms old (limit {self.max_age_ns / 1e6:.0f} ms)")
            return None
        if age < -self.max_age_ns:
            self._fault(InputStatus.INVALID, "future stamp",
                        f"joint state stamped {-age / 1e6:.1f} ms in the future (clock skew?)")
            return None
        if self.last_state_stamp_ns is not None and stamp_ns <= self.last_state_stamp_ns:
            self.dropped += 1
            return None
        self.last_state_stamp_ns = stamp_ns
        episode = self.timeline.episode_at(stamp_ns)
        if episode != self.episode:
            self._new_episode(episode)
        latest = self.timeline.latest
        if latest is not None and latest[1] > stamp_ns:
            # The next episode is announced: this one is over and the arm is held for the reset.
            self.history.clear()
            self.status, self.reason = InputStatus.WAITING, f"episode {latest[0]} starts at its reset"
            return None
        q = self._unwrap(q)
        if self.bounds is not None:
            problem = self.bounds.check(self.joint_names, q, qd, self._prev, stamp_ns)
            if problem is not None:
                self._prev = None  # the next plausible sample starts a new reference
                self._fault(InputStatus.INVALID, *problem)
                return None
        self._prev = (stamp_ns, q)
        self._unwrapped = q
        for v in self._vectors.values():  # an episode's inputs must be there before its first tick is taken
            if v.feature.scope == "episode" and self._vector_at(v, stamp_ns) is None:
                f = v.feature
                self.status, self.reason = InputStatus.WAITING, f"no {f.name} for this episode yet ({f.source()})"
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
        return self._emit(stamp_ns, q, qd, episode)

    def _emit(self, stamp_ns: int, q: np.ndarray, qd: np.ndarray | None, episode: int) -> Observation | None:
        """The tick's observation once every vector feature has its value for it; else the tick waits."""
        parts = []
        for kind, how in self._parts:
            if kind == "joint_position":
                parts.append(q[how])
            elif kind == "joint_velocity":
                parts.append(qd[how])
            else:
                v = self._vectors[how]
                val = self._vector_at(v, stamp_ns)
                if val is None:
                    f = v.feature
                    self._pending = (stamp_ns, q, qd, episode) if f.scope == "stream" else None
                    what = "this episode" if f.scope == "episode" else "this sample"
                    self.status, self.reason = InputStatus.WAITING, f"no {f.name} for {what} yet ({f.source()})"
                    return None
                parts.append(val)
        self._pending = None
        obs = self.history.push(stamp_ns, np.concatenate(parts), episode, pad=self._pad_next)
        self._pad_next = False
        if self.status is not InputStatus.OK:
            self.status, self.reason, self.cause = InputStatus.OK, "ok", ""
        if obs is not None:
            self.emitted += 1
        return obs

    def check(self, now_ns: int) -> InputStatus:
        """Watchdog, called from a timer: no joint state at all within the age limit, or a tick still waiting
        for a streamed input, stops the flow. (Samples that arrive broken or old are judged as they arrive.)"""
        if self._last_rx_ns is None:
            return self.status
        age = now_ns - self._last_rx_ns
        if age > self.max_age_ns and self.status is not InputStatus.STALE:
            self._fault(InputStatus.STALE, "silent",
                        f"no joint state for {age / 1e6:.0f} ms (limit {self.max_age_ns / 1e6:.0f} ms)")
        elif self._pending is not None and now_ns - self._pending[0] > self.max_age_ns:
            self._fault(InputStatus.STALE, "stream late", f"a tick waited {(now_ns - self._pending[0]) / 1e6:.0f} ms: "
                                                          f"{self.reason}")
        return self.status

    def take_events(self) -> list[tuple[str, str]]:
        """The faults since the last call, each once (the node logs and counts them)."""
        events, self.events = self.events, []
        return events

    def _fault(self, status: InputStatus, cause: str, reason: str) -> None:
        self.events.append((cause, reason))
        del self.events[:-1000]
        if self.status not in (InputStatus.STALE, InputStatus.INVALID):
            self.faults += 1
        self.status, self.cause, self.reason = status, cause, reason
        self.history.clear()
        self._next_tick_ns = None
        self._pending = None
