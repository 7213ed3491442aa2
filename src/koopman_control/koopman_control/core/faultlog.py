"""Repeated faults, counted per cause and logged once, then at most once per interval with a count.

A foreign publisher sending bad joint states at 100 Hz used to produce 100 log lines a second, one per
sample, while the summaries counted something else. Here one object does both: every occurrence is
counted under its cause, and the line to log (if any) is returned, so the log and the summary counters
agree by construction. (rclpy's ``throttle_duration_sec`` throttles per call site, so two causes reported
from one place would hide each other; this throttles per cause.)
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Cause:
    count: int = 0
    reported: int = 0  # occurrences already covered by a log line
    last_log: float = float("-inf")
    last_seen: float = float("-inf")
    last_detail: str = ""


class FaultLog:
    def __init__(self, interval_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = float(interval_s)
        self.clock = clock
        self._causes: dict[str, _Cause] = {}
        self._lock = threading.Lock()  # reported from executor threads and the physics thread alike

    def report(self, cause: str, detail: str) -> str | None:
        """Count one occurrence; the line to log now, or None while throttled."""
        with self._lock:
            c = self._causes.setdefault(cause, _Cause())
            c.count += 1
            c.last_detail = detail
            now = self.clock()
            c.last_seen = now
            if now - c.last_log < self.interval_s:
                return None
            unreported = c.count - c.reported
            c.reported, c.last_log = c.count, now
        if c.count == 1:
            return detail
        return f"{detail} ({unreported} times since the last report, {c.count} in all)"

    def counts(self) -> dict[str, int]:
        with self._lock:
            return {k: c.count for k, c in self._causes.items()}

    def last(self, cause: str) -> str:
        with self._lock:
            c = self._causes.get(cause)
            return c.last_detail if c is not None else ""

    def recent(self, within_s: float) -> tuple[str, int] | None:
        """(detail, count) of the latest fault within the last ``within_s`` seconds, or None."""
        now = self.clock()
        with self._lock:
            fresh = [c for c in self._causes.values() if now - c.last_seen <= within_s]
            if not fresh:
                return None
            c = max(fresh, key=lambda c: c.last_seen)
            return c.last_detail, sum(x.count for x in fresh)

    def total(self) -> int:
        with self._lock:
            return sum(c.count for c in self._causes.values())

    def reset(self) -> None:
        with self._lock:
            self._causes.clear()
