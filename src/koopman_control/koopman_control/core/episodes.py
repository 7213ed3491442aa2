"""Episodes as time intervals: announced ahead, started when the control path answers, scored from then on.

A robot with a task (the sim node, the Kortex stand-in) owns a :class:`EpisodeSequencer`; every consumer of
its samples (the ingests, the policy node) owns an :class:`EpisodeTimeline`.

Why announce ahead. Joint states, task inputs and the episode id travel on different topics, and DDS orders
messages per topic only: in separate processes a sample of the new episode can overtake the announcement of
that episode. An ingest that learns of a reset after its samples mixes two episodes into one history (the
old pose and target with the new joints), and the students answered such histories with 6-20 rad targets.
So the robot announces episode ``k`` with its start stamp ``T_k`` one ``reset_delay`` before it moves the arm
there: every sample stamped before ``T_k`` belongs to episode ``k - 1``, every sample at or after it to ``k``,
whatever order they arrive in. The arm holds still while the reset is pending.

Why wait for the control path. After the reset the arm holds its start pose until the first action chunk of
episode ``k`` is accepted; only then does the task's clock start (``started_ns``), so an episode is scored from
the instant the policy drives it, and the first episode, which starts while the other processes are still
loading their models, counts like the others. No chunk within ``start_timeout`` ends the episode unscored with
the reason in its result.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from koopman_control.core.clock import NS

EPISODE_PREFIX = "episode_"


def episode_label(episode: int) -> str:
    """The ``frame_id`` carried by observations and chunks of an episode (and by episode announcements)."""
    return f"{EPISODE_PREFIX}{int(episode)}"


def parse_episode(frame_id: str) -> int | None:
    """The episode of an ``episode_<id>`` label; None for any other frame_id (a source without episodes)."""
    if frame_id.startswith(EPISODE_PREFIX) and frame_id[len(EPISODE_PREFIX):].isdigit():
        return int(frame_id[len(EPISODE_PREFIX):])
    return None


@dataclass(frozen=True)
class Announcement:
    """Episode ``episode`` starts at ``start_ns`` (published on ``/task/episode`` before that instant)."""

    episode: int
    start_ns: int
    seed: int


class EpisodeTimeline:
    """Which episode a stamp belongs to, from the announcements received so far (in any order).

    Without any announcement every stamp belongs to episode 0: a robot without episodes (the real arm).
    """

    def __init__(self, keep: int = 16) -> None:
        self._starts: list[int] = []
        self._episodes: list[int] = []
        self.keep = keep

    def announce(self, episode: int, start_ns: int) -> bool:
        """Record an announcement; False when it is already known (latched topics repeat the last one)."""
        i = bisect.bisect_left(self._starts, start_ns)
        if i < len(self._starts) and self._starts[i] == start_ns:
            return False
        self._starts.insert(i, int(start_ns))
        self._episodes.insert(i, int(episode))
        del self._starts[:-self.keep], self._episodes[:-self.keep]
        return True

    def episode_at(self, stamp_ns: int) -> int:
        i = bisect.bisect_right(self._starts, stamp_ns) - 1
        return self._episodes[i] if i >= 0 else 0

    def start_of(self, stamp_ns: int) -> int | None:
        """Start stamp of the episode ``stamp_ns`` belongs to (None before the first announcement)."""
        i = bisect.bisect_right(self._starts, stamp_ns) - 1
        return self._starts[i] if i >= 0 else None

    @property
    def latest(self) -> tuple[int, int] | None:
        """(episode, start) of the newest announcement."""
        return (self._episodes[-1], self._starts[-1]) if self._starts else None


class Phase(StrEnum):
    RESETTING = "resetting"  # announced; the arm holds until start_ns, then is reset
    WAITING = "waiting"  # reset done; the arm holds until the first chunk of the episode is accepted
    RUNNING = "running"  # the task is scored
    IDLE = "idle"  # the last episode ended and no new one is scheduled (auto_reset off)


class EpisodeSequencer:
    """When episodes start and what their results say; the robot applies the resets it is told to.

    Not thread-safe: the robot calls it under the lock that guards its physics.
    """

    def __init__(self, *, seed: int = 0, reset_delay_s: float = 0.1, start_timeout_s: float = 30.0,
                 auto_reset: bool = True, sequential_seeds: bool = False) -> None:
        if not reset_delay_s > 0:
            raise ValueError(f"reset_delay must be positive (s), got {reset_delay_s}")
        if not start_timeout_s > 0:
            raise ValueError(f"start_timeout must be positive (s), got {start_timeout_s}")
        self.seed = int(seed)
        self.sequential_seeds = sequential_seeds
        self.reset_delay_ns = round(reset_delay_s * NS)
        self.start_timeout_ns = round(start_timeout_s * NS)
        self.auto_reset = auto_reset
        self.episode = 0
        self.phase = Phase.IDLE
        self.pending: Announcement | None = None
        self.episode_seed_now = 0  # the current episode's seed
        self.start_ns = 0  # when the current episode's reset was applied (its first sample)
        self.started_ns: int | None = None  # when its first chunk was accepted
        self.results: list[dict[str, Any]] = []

    def episode_seed(self, episode: int) -> int:
        """Episode k's seed: ``seed * 100003 + k``, or ``seed + k - 1`` with ``sequential_seeds`` (the seeds a
        gym evaluation from ``seed`` uses, so both can be compared episode by episode)."""
        return self.seed + episode - 1 if self.sequential_seeds else self.seed * 100_003 + episode

    def schedule(self, now_ns: int, seed: int | None = None) -> Announcement:
        """Announce the next episode to start one reset delay from now (the arm holds meanwhile)."""
        ep = self.episode + 1
        self.pending = Announcement(ep, int(now_ns) + self.reset_delay_ns,
                                    self.episode_seed(ep) if seed is None else int(seed))
        self.phase = Phase.RESETTING
        return self.pending

    def due(self, now_ns: int) -> Announcement | None:
        """The announced episode whose start has come: the robot resets to it now and calls :meth:`begin`."""
        p = self.pending
        return p if p is not None and now_ns >= p.start_ns else None

    def begin(self, ann: Announcement, now_ns: int) -> None:
        self.pending = None
        self.episode = ann.episode
        self.episode_seed_now = ann.seed
        self.start_ns = int(now_ns)
        self.started_ns = None
        self.phase = Phase.WAITING

    def chunk_accepted(self, now_ns: int) -> bool:
        """The control path answered: the task's clock starts (True on the first chunk of the episode)."""
        if self.phase is Phase.WAITING:
            self.started_ns = int(now_ns)
            self.phase = Phase.RUNNING
            return True
        return False

    def start_overdue(self, now_ns: int) -> bool:
        return self.phase is Phase.WAITING and now_ns - self.start_ns > self.start_timeout_ns

    def finish(self, now_ns: int, result: dict[str, Any]) -> tuple[dict[str, Any], Announcement | None]:
        """Record the episode's result (with its timing) and schedule the next one if ``auto_reset``."""
        waited = ((self.started_ns if self.started_ns is not None else now_ns) - self.start_ns) / NS
        out = {"episode": self.episode, "seed": self.episode_seed_now, **result,
               "start_ns": self.start_ns, "started_ns": self.started_ns, "waited_s": round(waited, 4)}
        self.results.append(out)
        self.phase = Phase.IDLE
        nxt = self.schedule(now_ns) if self.auto_reset else None
        return out, nxt
