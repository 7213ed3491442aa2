"""A periodic loop on a monotonic schedule, for the sim's physics at the robot's feedback rate.

A timer in a Python executor drifts and bunches under load; here each cycle has an absolute deadline
``t0 + k * period`` and the thread sleeps until it, so lateness never accumulates. When a cycle is late by
more than ``max_catch_up`` periods (a long GC pause, the machine being busy) the schedule is re-anchored
instead of firing a burst, and the overrun is counted. A late cycle is still followed by a short sleep: in
the real-time scheduling class a loop that never sleeps would take the core from everything else.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from koopman_control.core.stats import RateMeter


class PeriodicLoop:
    def __init__(self, rate_hz: float, body: Callable[[int], None], name: str = "periodic",
                 max_catch_up: int = 5, spin_s: float = 0.0, priority: int = 0) -> None:
        """``body(skipped)`` runs once per cycle; ``skipped`` is how many cycles were dropped before it.
        ``priority`` > 0 runs the thread under SCHED_FIFO (see ``priority_problem`` if that was refused)."""
        if not rate_hz > 0:
            raise ValueError(f"rate must be positive, got {rate_hz}")
        self.period = 1.0 / rate_hz
        self.body = body
        self.name = name
        self.max_catch_up = max_catch_up
        self.spin_s = spin_s
        self.rate = RateMeter(rate_hz)
        self.overruns = 0
        self.skipped = 0
        self.error: BaseException | None = None
        self.priority = priority
        self.min_idle = 0.1  # fraction of a period slept after a late cycle
        self.priority_problem: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self) -> None:
        if self.priority > 0:
            try:
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(min(self.priority, 99)))
            except (OSError, AttributeError) as err:
                self.priority_problem = f"cannot use SCHED_FIFO priority {self.priority}: {err}"
        t_next = time.monotonic()
        skipped = 0
        while not self._stop.is_set():
            now = time.monotonic()
            delay = t_next - now
            # Sleep most of the way; an optional short spin trims time.sleep's ~60 us overshoot at the
            # cost of a busy core (off by default: the machine is shared with the policy).
            if delay > self.spin_s and self._stop.wait(delay - self.spin_s):
                break
            while time.monotonic() < t_next:
                pass
            start = time.monotonic()
            self.rate.tick(start)
            try:
                self.body(skipped)
            except BaseException as err:  # a failing body stops the loop; the owner reports it
                self.error = err
                return
            skipped = 0
            t_next += self.period
            lag = time.monotonic() - t_next
            if lag > 0:
                # Behind schedule: still leave the core for a moment, so that a body slower than the period
                # can never turn a real-time thread into a busy loop that starves the machine.
                time.sleep(min(self.period * self.min_idle, 0.001))
            if lag > self.max_catch_up * self.period:
                missed = int(lag / self.period)
                self.overruns += 1
                self.skipped += missed
                skipped = missed
                t_next += missed * self.period
