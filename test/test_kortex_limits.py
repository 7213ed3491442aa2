"""Command shaping: speed, acceleration and position limits, NaN -> stop; limits from config/kinova.yaml."""

from pathlib import Path

import numpy as np
import pytest

from koopman_control.kortex.limits import CommandShaper, JointLimits, LimitsError, validate_pose
from koopman_control.params import load_parameters
from koopman_sim import gen3

ROOT = Path(__file__).resolve().parents[1]


def limits(scale=0.5):
    return JointLimits.default(scale)


def test_kinova_yaml_limits_load_and_are_conservative():
    p = load_parameters(ROOT / "config" / "kinova.yaml", "kortex_bridge")
    lim = JointLimits.from_params(p)
    np.testing.assert_allclose(lim.velocity, gen3.VELOCITY_LIMITS)
    np.testing.assert_allclose(lim.upper[[1, 3, 5]], [2.24, 2.57, 2.09])
    assert list(lim.continuous) == [True, False, True, False, True, False, True]
    assert lim.speed_scale <= 0.5
    assert p["backend"] == "kortex" and p["tcp_port"] == 10000 and p["udp_port"] == 10001
    # The arm's own facts come from its description; the file keeps only this stack's choices.
    assert not {"position_lower", "position_upper", "velocity_limits", "continuous_joints", "home_q"} & set(p)
    validate_pose(gen3.HOME_Q, lim, "home_q")


@pytest.mark.parametrize("bad", [{"speed_scale": 1.5}, {"speed_scale": 0.0}, {"velocity_limits": [1.0] * 6},
                                 {"position_lower": [3.0] * 7}, {"acceleration_limits": [-1.0] * 7},
                                 {"velocity_limits": [float("nan")] * 7}])
def test_bad_limits_are_refused(bad):
    with pytest.raises(LimitsError):
        JointLimits.from_params(bad)


def test_speed_clipped_and_acceleration_ramped():
    lim = limits(0.5)
    sh = CommandShaper(lim)
    q = np.array(gen3.HOME_Q)
    dt = 0.025
    out = [sh.shape(np.full(7, 10.0), q, dt) for _ in range(40)]
    steps = np.diff(np.vstack([np.zeros(7), *out]), axis=0)
    assert (np.abs(steps) <= lim.acceleration * dt + 1e-12).all()
    np.testing.assert_allclose(out[-1], lim.max_speed)
    assert (np.abs(np.vstack(out)) <= lim.max_speed + 1e-12).all()


@pytest.mark.parametrize("bad", [np.full(7, np.nan), np.array([0, 0, np.inf, 0, 0, 0, 0.0]), np.zeros(6)])
def test_nonfinite_or_malformed_command_decelerates_to_zero(bad):
    sh = CommandShaper(limits())
    q = np.array(gen3.HOME_Q)
    for _ in range(20):
        v = sh.shape(np.full(7, 0.3), q, 0.025)
    for _ in range(20):
        v = sh.shape(bad, q, 0.025)
        assert np.isfinite(v).all()
    np.testing.assert_allclose(v, 0.0)
    assert sh.counters.nonfinite == 20


def test_brakes_before_position_limit_and_never_crosses_it():
    lim = limits(1.0)
    sh = CommandShaper(lim, position_margin=0.02)
    q = np.zeros(7)
    q[1] = 1.5  # joint 2 heads for its +2.24 limit at full speed
    dt = 0.01
    top = 0.0
    for _ in range(400):
        v = sh.shape(np.array([0, 5.0, 0, 0, 0, 0, 0]), q, dt)
        q = q + v * dt
        top = max(top, q[1])
    assert top <= lim.upper[1] - 0.02 + 1e-6
    assert q[1] > lim.upper[1] - 0.1  # it does get close: braking, not a blanket refusal
    assert sh.counters.position_braked > 0


def test_low_level_positions_move_smoothly_and_stay_inside():
    lim = limits(0.5)
    sh = CommandShaper(lim)
    prev = np.array(gen3.HOME_Q)
    target = prev + np.array([3.0, 5.0, 0, 0, 0, -9.0, 0])  # far outside for joints 2 and 6
    dt = 0.001
    cmds = []
    for _ in range(4000):
        prev = sh.step_position(target, prev, dt)
        cmds.append(prev)
    c = np.vstack(cmds)
    v = np.diff(c, axis=0) / dt
    assert (np.abs(v) <= lim.max_speed + 1e-9).all()
    assert (c >= lim.lower).all() and (c <= lim.upper).all()
    assert c[-1, 1] <= lim.upper[1] - 0.02 + 1e-9 and c[-1, 5] >= lim.lower[5] + 0.02 - 1e-9
    assert sh.step_position(np.full(7, np.nan), prev, dt) == pytest.approx(prev, abs=lim.max_speed.max() * dt)


def test_validate_pose():
    with pytest.raises(ValueError, match="outside"):
        validate_pose([0, 3.0, 0, 0, 0, 0, 0], limits(), "home")
    with pytest.raises(ValueError, match="finite"):
        validate_pose([0, np.nan, 0, 0, 0, 0, 0], limits(), "home")
