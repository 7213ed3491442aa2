"""Joint limits of the real arm and the command shaping every outgoing command passes through.

Nothing reaches the arm without going through :class:`CommandShaper`: a non-finite value becomes a stop,
speeds are scaled and clipped to the velocity limits, changes of speed to the acceleration limits, and a
joint is slowed so that it can always brake before its position limit. The limits are those of
``config/kinova.yaml`` (defaults: the arm's description, :mod:`gen3_description`, and a reduced acceleration).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import gen3_description as gen3

# Kinova publishes 8.6 rad/s^2 (its MoveIt configuration); commands here stay well below it.
DEFAULT_ACCELERATION = 3.0


class LimitsError(ValueError):
    """Limits that cannot be used (wrong length, lower >= upper, non-positive speed...)."""


@dataclass(frozen=True)
class JointLimits:
    lower: np.ndarray  # rad
    upper: np.ndarray  # rad
    velocity: np.ndarray  # rad/s, the arm's rated maxima
    acceleration: np.ndarray  # rad/s^2
    continuous: np.ndarray  # bool
    speed_scale: float = 0.5  # fraction of ``velocity`` commands may use
    names: tuple[str, ...] = field(default=gen3.JOINT_NAMES)

    def __post_init__(self) -> None:
        n = len(self.names)
        for what in ("lower", "upper", "velocity", "acceleration", "continuous"):
            arr = np.asarray(getattr(self, what), dtype=bool if what == "continuous" else np.float64)
            if arr.shape != (n,):
                raise LimitsError(f"limits: {what} needs {n} values (one per joint), got {arr.shape}")
            if what != "continuous" and not np.isfinite(arr).all():
                raise LimitsError(f"limits: {what} must be finite, got {arr.tolist()}")
            arr.setflags(write=False)
            object.__setattr__(self, what, arr)
        if not (self.lower < self.upper).all():
            raise LimitsError("limits: every lower position limit must be below the upper one")
        if not ((self.velocity > 0).all() and (self.acceleration > 0).all()):
            raise LimitsError("limits: velocity and acceleration limits must be positive")
        if not 0.0 < self.speed_scale <= 1.0:
            raise LimitsError(f"limits: speed_scale must be in (0, 1], got {self.speed_scale}")

    @property
    def max_speed(self) -> np.ndarray:
        return self.speed_scale * self.velocity

    @classmethod
    def default(cls, speed_scale: float = 0.5) -> JointLimits:
        return cls(np.array(gen3.JOINT_LOWER), np.array(gen3.JOINT_UPPER), np.array(gen3.VELOCITY_LIMITS),
                   np.full(7, DEFAULT_ACCELERATION), np.array(gen3.CONTINUOUS), speed_scale)

    @classmethod
    def from_params(cls, p: Mapping[str, Any]) -> JointLimits:
        """From the bridge's parameters (``position_lower`` ... ``speed_scale``); missing keys take defaults."""
        d = cls.default()

        def arr(key: str, default: np.ndarray) -> np.ndarray:
            v = p.get(key)
            return default if v is None or len(v) == 0 else np.asarray(v, dtype=np.float64)

        cont = p.get("continuous_joints")
        return cls(arr("position_lower", d.lower), arr("position_upper", d.upper),
                   arr("velocity_limits", d.velocity), arr("acceleration_limits", d.acceleration),
                   d.continuous if cont is None or len(cont) == 0 else np.asarray(cont, dtype=bool),
                   float(p.get("speed_scale", d.speed_scale)))


@dataclass
class ShaperCounters:
    nonfinite: int = 0
    velocity_clipped: int = 0
    acceleration_clipped: int = 0
    position_braked: int = 0


class CommandShaper:
    """Turns a desired joint velocity into one that respects every limit, given where the arm is.

    Keeps the last command so acceleration is limited across calls; ``reset`` when the arm is known to be
    still (after a stop) so the next command starts from zero.
    """

    def __init__(self, limits: JointLimits, position_margin: float = 0.02) -> None:
        self.limits = limits
        self.margin = float(position_margin)
        self.last = np.zeros(len(limits.names))
        self.counters = ShaperCounters()

    def reset(self, velocity: np.ndarray | None = None) -> None:
        self.last = np.zeros(len(self.limits.names)) if velocity is None else np.asarray(velocity, float).copy()

    def shape(self, desired: np.ndarray, q: np.ndarray, dt: float) -> np.ndarray:
        """Safe velocity (rad/s) for the next ``dt`` seconds from the measured position ``q`` (rad)."""
        lim = self.limits
        desired = np.asarray(desired, dtype=np.float64)
        q = np.asarray(q, dtype=np.float64)
        if desired.shape != self.last.shape or not (np.isfinite(desired).all() and np.isfinite(q).all()):
            self.counters.nonfinite += 1
            desired = np.zeros_like(self.last)  # decelerate (acceleration-limited below) rather than pass junk
            q = np.where(np.isfinite(q), q, 0.5 * (lim.lower + lim.upper)) if q.shape == self.last.shape \
                else 0.5 * (lim.lower + lim.upper)
        v = np.clip(desired, -lim.max_speed, lim.max_speed)
        if not np.array_equal(v, desired):
            self.counters.velocity_clipped += 1
        # Braking room: the speed from which the joint can still stop (at the acceleration limit) before
        # the margin inside its position limit, after moving for one more period at that speed.
        lo, hi = lim.lower + self.margin, lim.upper - self.margin
        a = lim.acceleration
        room_up = np.maximum(hi - q, 0.0)
        room_dn = np.maximum(q - lo, 0.0)
        v_up = np.maximum(-a * dt + np.sqrt((a * dt) ** 2 + 2.0 * a * room_up), 0.0)
        v_dn = np.maximum(-a * dt + np.sqrt((a * dt) ** 2 + 2.0 * a * room_dn), 0.0)
        braked = np.clip(v, -v_dn, v_up)
        if not np.array_equal(braked, v):
            self.counters.position_braked += 1
        # Acceleration limit relative to the previous command, except that slowing towards a position limit
        # always wins (a joint may brake harder than it may speed up).
        step = a * dt
        accel = np.clip(braked, self.last - step, self.last + step)
        toward_limit_slowdown = np.abs(braked) < np.abs(accel)
        out = np.where(toward_limit_slowdown & (braked != v), braked, accel)
        if not np.array_equal(out, braked):
            self.counters.acceleration_clipped += 1
        out = np.where(np.isfinite(out), out, 0.0)
        self.last = out
        return out

    def step_position(self, target: np.ndarray, previous: np.ndarray, dt: float) -> np.ndarray:
        """Next low-level position command: from ``previous`` towards ``target`` with shaped velocity."""
        previous = np.asarray(previous, dtype=np.float64)
        target = np.asarray(target, dtype=np.float64)
        if target.shape != previous.shape or not np.isfinite(target).all():
            self.counters.nonfinite += 1
            target = previous
        # Velocity that would reach the target this period, limited like a speed command; positions then
        # never leave the limits (braking term) and never jump.
        v = self.shape((target - previous) / dt, previous, dt)
        # Do not overshoot a target that is closer than one period's motion.
        step = np.clip(v * dt, -np.abs(target - previous), np.abs(target - previous))
        self.last = step / dt
        return np.clip(previous + step, self.limits.lower, self.limits.upper)


def validate_pose(q: Sequence[float], limits: JointLimits, what: str) -> np.ndarray:
    """A 7-vector inside the position limits; raises ValueError (used for the home pose)."""
    arr = np.asarray(q, dtype=np.float64)
    if arr.shape != (len(limits.names),) or not np.isfinite(arr).all():
        raise ValueError(f"{what} must be {len(limits.names)} finite angles (rad), got {list(q)}")
    out = (arr < limits.lower) | (arr > limits.upper)
    if out.any():
        bad = [limits.names[i] for i in np.flatnonzero(out)]
        raise ValueError(f"{what} is outside the position limits for {', '.join(bad)}")
    return arr
