"""Kortex units <-> the stack's units: degrees in [0, 360) and deg/s on the wire, radians everywhere else.

Kortex reports every joint angle in [0, 360) degrees, also for the continuous joints (1, 3, 5, 7) whose
command range here is one turn either way, and for the bounded joints whose negative angles come back as
e.g. 331.35 deg. Converting a continuous joint naively to (-pi, pi] would make a joint resting at 180 deg
(joint 3 of the ready pose sits at pi) flicker between +pi and -pi, and a policy would see a 2 pi jump.
So a continuous joint is unwrapped to the value nearest a reference: the previous measurement, or at the
first sample the configured reference pose. Bounded joints (|limit| < pi) are unambiguous in (-180, 180].
"""

from __future__ import annotations

import numpy as np

TWO_PI = 2.0 * np.pi
DEG = 180.0 / np.pi


def wrap_to_pi(rad: np.ndarray | float) -> np.ndarray:
    """Angle(s) in [-pi, pi): the signed shortest difference convention."""
    return (np.asarray(rad, dtype=np.float64) + np.pi) % TWO_PI - np.pi


def wrap_deg_360(deg: np.ndarray | float) -> np.ndarray:
    """Degrees in [0, 360), as Kortex expects positions (360 - 1e-13 rounds to 0, never to 360)."""
    out = np.asarray(deg, dtype=np.float64) % 360.0
    return np.where(out >= 360.0, 0.0, out)


def rad_to_kortex_deg(rad: np.ndarray) -> np.ndarray:
    """Joint positions (rad, any turn) -> Kortex position commands in [0, 360) degrees."""
    return wrap_deg_360(np.asarray(rad, dtype=np.float64) * DEG)


def kortex_deg_to_rad(deg: np.ndarray, reference: np.ndarray, continuous: np.ndarray) -> np.ndarray:
    """Measured Kortex angles ([0, 360) deg) -> radians.

    Continuous joints take the value nearest ``reference`` (rad), bounded joints their (-pi, pi] value.
    Raises ValueError for non-finite input: a broken reading must not become a plausible-looking angle.
    """
    deg = np.asarray(deg, dtype=np.float64)
    if not np.isfinite(deg).all():
        raise ValueError(f"non-finite joint angle from the arm: {deg.tolist()}")
    rad = np.deg2rad(deg)
    bounded = -wrap_to_pi(-rad)  # (-pi, pi]: 180 deg -> +pi
    ref = np.asarray(reference, dtype=np.float64)
    unwrapped = ref + wrap_to_pi(rad - ref)
    return np.where(np.asarray(continuous, dtype=bool), unwrapped, bounded)


def rad_s_to_deg_s(rad_s: np.ndarray) -> np.ndarray:
    return np.asarray(rad_s, dtype=np.float64) * DEG


def deg_s_to_rad_s(deg_s: np.ndarray) -> np.ndarray:
    return np.asarray(deg_s, dtype=np.float64) / DEG
