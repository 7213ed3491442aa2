"""Latency and rate statistics that the nodes report on /diagnostics and the bench writes to JSON.

Samples are kept in full (a ``array('d')`` of 8 bytes each: ten minutes at 1 kHz is under 5 MB) so that the
p99 of a long run is exact rather than estimated from a sketch. Writers and readers may sit in different
threads (control thread vs. diagnostics timer), hence the lock.
"""

from __future__ import annotations

import threading
from array import array
from typing import Any

import numpy as np


class SampleStats:
    """Exact percentiles over every sample added (e.g. latency in milliseconds)."""

    def __init__(self) -> None:
        self._values = array("d")
        self._lock = threading.Lock()

    def add(self, value: float) -> None:
        with self._lock:
            self._values.append(float(value))

    def __len__(self) -> int:
        return len(self._values)

    def values(self, last: int | None = None) -> np.ndarray:
        with self._lock:
            data = self._values[-last:] if last else self._values
            return np.array(data, dtype=np.float64)

    def reset(self) -> None:
        with self._lock:
            self._values = array("d")

    def summary(self, last: int | None = None) -> dict[str, Any]:
        """count, mean, p50, p99, max (None when empty); ``last`` restricts to the newest samples."""
        v = self.values(last)
        if v.size == 0:
            return {"count": 0, "mean": None, "p50": None, "p99": None, "max": None}
        p50, p99 = np.percentile(v, [50, 99])
        return {"count": int(v.size), "mean": float(v.mean()), "p50": float(p50), "p99": float(p99),
                "max": float(v.max())}


class RateMeter:
    """Achieved rate and jitter of a periodic event, from its timestamps (seconds, monotonic)."""

    def __init__(self, nominal_hz: float | None = None) -> None:
        self.nominal_hz = nominal_hz
        self._last: float | None = None
        self._first: float | None = None
        self._count = 0
        self.intervals = SampleStats()

    def tick(self, t: float) -> None:
        if self._last is not None:
            self.intervals.add(t - self._last)
        else:
            self._first = t
        self._last = t
        self._count += 1

    def reset(self) -> None:
        self._last = self._first = None
        self._count = 0
        self.intervals.reset()

    @property
    def count(self) -> int:
        return self._count

    def summary(self, last: int | None = None) -> dict[str, Any]:
        """rate_hz (events / elapsed), interval p50/p99/max and jitter in ms.

        Jitter is the standard deviation of the interval; ``late_p99_ms`` the 99th percentile of how much an
        interval exceeded the nominal period (what a real-time loop cares about).
        """
        iv = self.intervals.values(last)
        out: dict[str, Any] = {"count": self._count, "nominal_hz": self.nominal_hz, "rate_hz": None,
                               "interval_p50_ms": None, "interval_p99_ms": None, "interval_max_ms": None,
                               "jitter_ms": None, "late_p99_ms": None}
        if iv.size == 0:
            return out
        ms = iv * 1e3
        out.update(
            rate_hz=float(iv.size / iv.sum()) if iv.sum() > 0 else None,
            interval_p50_ms=float(np.percentile(ms, 50)),
            interval_p99_ms=float(np.percentile(ms, 99)),
            interval_max_ms=float(ms.max()),
            jitter_ms=float(ms.std()),
        )
        if self.nominal_hz:
            late = np.maximum(ms - 1e3 / self.nominal_hz, 0.0)
            out["late_p99_ms"] = float(np.percentile(late, 99))
        return out
