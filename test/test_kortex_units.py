"""Kortex degrees in [0, 360) <-> radians, at the edges that break naive conversions."""

import numpy as np
import pytest

from koopman_control.kortex import units
from koopman_sim import gen3

CONT = np.array([True, False, True, False, True, False, True])


def conv(deg, ref):
    return units.kortex_deg_to_rad(np.asarray(deg, float), np.asarray(ref, float), CONT)


@pytest.mark.parametrize("rad, deg", [(0.0, 0.0), (np.pi, 180.0), (-np.pi, 180.0), (-0.5, 331.35211),
                                      (2 * np.pi, 0.0), (-2 * np.pi, 0.0), (np.deg2rad(359.99), 359.99),
                                      (-1e-12, 0.0), (6.0, 343.77468)])
def test_command_wraps_into_0_360(rad, deg):
    out = float(units.rad_to_kortex_deg(rad))
    assert 0.0 <= out < 360.0
    assert (out - deg + 180.0) % 360.0 - 180.0 == pytest.approx(0.0, abs=1e-4)  # same angle (359.99999... ~ 0)


def test_tiny_negative_never_becomes_360():
    assert float(units.wrap_deg_360(-1e-14)) < 360.0
    assert float(units.wrap_deg_360(360.0)) == 0.0


def test_bounded_joints_come_back_signed():
    # Joints 2, 4, 6 (index 1, 3, 5): 331.35 deg is -0.5 rad, 180 deg is +pi, 0 is 0, 359.99 is just below 0.
    deg = np.array([0.0, 331.35211, 0.0, 180.0, 0.0, 359.99, 0.0])
    q = conv(deg, np.zeros(7))
    assert q[1] == pytest.approx(-0.5, abs=1e-6)
    assert q[3] == pytest.approx(np.pi)
    assert q[5] == pytest.approx(-np.deg2rad(0.01), abs=1e-9)


def test_continuous_joint_at_180_follows_its_reference_without_flicker():
    # Joint 3 of the ready pose sits at pi: readings either side of 180 deg must stay near +pi, not jump to -pi.
    ref = np.array(gen3.HOME_Q)
    prev = ref
    for d in (179.99, 180.0, 180.01, 179.5, 181.0, 359.99 - 179.0):
        deg = np.rad2deg(ref) % 360.0
        deg[2] = d
        q = conv(deg, prev)
        assert abs(q[2] - np.pi) < np.pi / 2, (d, q[2])
        prev = q
    deg = np.rad2deg(ref) % 360.0
    deg[2] = 180.0
    assert conv(deg, np.array([0, 0, -np.pi + 0.01, 0, 0, 0, 0]))[2] == pytest.approx(-np.pi)
    assert conv(deg, np.array([0, 0, np.pi - 0.01, 0, 0, 0, 0]))[2] == pytest.approx(np.pi)


def test_continuous_joint_unwraps_across_0_and_beyond_one_turn():
    q = np.zeros(7)
    q[0] = 0.001
    path = []
    for d in (0.5, 0.0, 359.99, 359.0, 181.0, 179.0, 1.0, 359.0):  # turning negative through 0, then a full turn
        deg = np.zeros(7)
        deg[0] = d
        q = conv(deg, q)
        path.append(q[0])
    assert path[3] == pytest.approx(np.deg2rad(-1.0))
    assert path[6] == pytest.approx(np.deg2rad(1.0 - 360.0))
    assert path[7] == pytest.approx(np.deg2rad(-361.0))


@pytest.mark.parametrize("q", [np.zeros(7), np.array(gen3.HOME_Q),
                               np.array([np.pi, 2.0, -np.pi, -2.5, 3.0, -2.0, -3.1])])
def test_round_trip(q):
    back = conv(units.rad_to_kortex_deg(q), q)
    np.testing.assert_allclose(units.wrap_to_pi(back - q), 0.0, atol=1e-9)
    np.testing.assert_allclose(back[~CONT], q[~CONT], atol=1e-9)


def test_speeds_are_plain_scaling():
    np.testing.assert_allclose(units.rad_s_to_deg_s([np.pi, -1.3963]), [180.0, -80.0026], atol=1e-3)
    np.testing.assert_allclose(units.deg_s_to_rad_s(units.rad_s_to_deg_s([0.3, -1.2])), [0.3, -1.2])


def test_nonfinite_reading_is_an_error_not_an_angle():
    with pytest.raises(ValueError, match="non-finite"):
        conv([0, 0, np.nan, 0, 0, 0, 0], np.zeros(7))
