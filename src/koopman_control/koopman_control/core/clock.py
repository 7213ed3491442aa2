"""The stack's time unit: integer nanoseconds of the system clock (no sim time; stamps match a real robot's)."""

NS = 1_000_000_000
