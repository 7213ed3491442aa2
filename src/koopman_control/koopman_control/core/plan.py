"""The plan a controller follows between replans: one chunk's points on their own time grid.

A plan made at stamp ``s0`` holds points ``p_0, p_1, ...`` that apply from ``s0 + i * dt`` (``dt`` = the
model's control period), whatever the rate the controller ticks at. At a later tick ``t`` the active point is
``j = floor((t - s0 + tol) / dt)`` and what is published is ``p_j`` from ``t`` on, then ``p_{j+1}, ...`` at their
own times. Ticks land up to a feedback sample around their grid point; ``tol`` absorbs that jitter and is at
most half the controller's tick period, so that a tick one period before a grid point never starts that
point early (a fixed tenth of the model period started every point 10 ms early at 100 Hz, and the arm collided:
docs/experiments.md, "The stack"). A new plan is due once ``steps`` points have become active, so at a 10 Hz
task and a 10 Hz controller the plan is followed for ``steps`` ticks, and at 100 Hz for the same
``steps * dt`` seconds. ``steps = 1`` means a new plan at every tick, whatever the rate.
"""

from __future__ import annotations

import math
from collections.abc import Hashable

import numpy as np

from koopman_control.core.observation import NS


class PlanFollower:
    def __init__(self, tick_period_s: float | None = None) -> None:
        self.tick_period_ns = None if tick_period_s is None else round(tick_period_s * NS)
        self.points: np.ndarray | None = None  # (N, n_joints) from the planning stamp on
        self.dt_ns = 0
        self.stamp_ns = 0
        self.key: Hashable | None = None  # what the plan belongs to (episode, mode): another key needs a new plan

    def adopt(self, points: np.ndarray, dt_s: float, stamp_ns: int, key: Hashable) -> None:
        if len(points) < 1:
            raise ValueError("a plan needs at least one point")
        self.points = np.asarray(points, dtype=np.float64)
        self.dt_ns = max(1, round(dt_s * NS))
        self.stamp_ns = int(stamp_ns)
        self.key = key

    def clear(self) -> None:
        self.points, self.key = None, None

    def active_index(self, stamp_ns: int) -> int:
        tol = self.dt_ns // 10
        if self.tick_period_ns is not None:
            tol = min(tol, self.tick_period_ns // 2)
        return math.floor((stamp_ns - self.stamp_ns + tol) / self.dt_ns)

    def remaining(self, stamp_ns: int, key: Hashable, steps: int) -> tuple[np.ndarray, np.ndarray] | None:
        """(offsets in s from ``stamp_ns``, points) still to execute at this tick, or None when a new plan is due:
        no plan, another key, ``steps`` points already active, or the plan used up."""
        if self.points is None or key != self.key:
            return None
        j = max(0, self.active_index(stamp_ns))
        if j >= min(steps, len(self.points)) or (steps == 1 and stamp_ns > self.stamp_ns):
            return None
        times = self.stamp_ns + np.arange(j, len(self.points)) * self.dt_ns
        offsets = (times - stamp_ns) / NS
        offsets[0] = 0.0  # the active point applies from now (a tick may land just before its grid time)
        return offsets, self.points[j:]
