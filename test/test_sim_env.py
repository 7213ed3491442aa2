"""gen3_reach_obstacle: gym API, seeding, input validation, collision and side scoring (real MuJoCo)."""

import numpy as np
import pytest

import koopman_sim
from koopman_sim import gen3
from koopman_sim.arm import Gen3Arm
from koopman_sim.expert import ScriptedExpert
from koopman_sim.kinematics import IKSolver
from koopman_sim.tasks.reach_obstacle import (
    ACTION_NAMES,
    OBS_NAMES,
    PILLAR_HEIGHT,
    Gen3ReachObstacleEnv,
    ReachObstacleTask,
)


@pytest.fixture(scope="module")
def env():
    e = koopman_sim.make("gen3_reach_obstacle")
    yield e
    e.close()


def _state(e):
    d = e.arm.data
    return d.qpos.copy(), d.qvel.copy(), d.ctrl.copy(), d.time


def test_registry_and_unknown_task():
    assert "gen3_reach_obstacle" in koopman_sim.TASKS
    with pytest.raises(koopman_sim.UnknownTaskError, match="gen3_reach_obstacle") as exc:
        koopman_sim.make("gen3_reach_pillar")
    assert isinstance(exc.value, ValueError)


def test_reset_and_step_shapes(env):
    obs, info = env.reset(seed=3)
    assert obs.shape == (20,) and obs.dtype == np.float32
    assert len(OBS_NAMES) == 20 and ACTION_NAMES == gen3.JOINT_NAMES
    assert env.observation_space.contains(obs)
    assert env.action_space.shape == (7,)
    assert set(info) >= {"success", "collision", "side", "distance"}
    obs2, reward, terminated, truncated, info = env.step(obs[:7])
    assert obs2.shape == (20,) and obs2.dtype == np.float32
    assert isinstance(reward, float) and not terminated and not truncated
    assert env.arm.time == pytest.approx(0.1)
    np.testing.assert_allclose(obs2[14:], obs[14:])  # target and pillar stay put


def test_seeding_is_deterministic_and_scene_is_between():
    a, b = Gen3ReachObstacleEnv(), Gen3ReachObstacleEnv()
    for seed in (0, 1, 2):
        oa, _ = a.reset(seed=seed)
        ob, _ = b.reset(seed=seed)
        np.testing.assert_array_equal(oa, ob)
        act = oa[:7] + 0.05
        for _ in range(3):
            ra = a.step(act)
            rb = b.step(act)
        np.testing.assert_array_equal(ra[0], rb[0])
    targets = [a.reset(seed=s)[0][14:17] for s in range(20)]
    assert len({tuple(t) for t in targets}) == 20
    for s in range(20):
        obs, _ = a.reset(seed=s)
        start, target, pillar = a.task.start_ee[:2], obs[14:16], obs[17:19]
        line = target - start
        t = np.dot(pillar - start, line) / np.dot(line, line)
        lateral = abs(line[0] * (pillar - start)[1] - line[1] * (pillar - start)[0]) / np.linalg.norm(line)
        assert 0.3 < t < 0.7 and lateral <= 0.0101
        assert obs[19] == pytest.approx(PILLAR_HEIGHT / 2)


@pytest.mark.parametrize(
    "bad",
    [
        np.full(7, np.nan),
        np.r_[np.zeros(6), np.inf],
        np.zeros(6),
        np.zeros((1, 7)),
        np.zeros(8),
        "seven",
    ],
    ids=["nan", "inf", "short", "2d", "long", "string"],
)
def test_bad_actions_rejected_and_physics_untouched(env, bad):
    obs, _ = env.reset(seed=0)
    env.step(obs[:7] + 0.1)  # get the arm moving so that any stray step would show
    before = _state(env)
    with pytest.raises(ValueError, match="action"):
        env.step(bad)
    after = _state(env)
    for x, y in zip(before, after, strict=True):
        np.testing.assert_array_equal(x, y)
    assert np.all(np.isfinite(env.arm.data.qacc))


def test_arm_set_target_rejects_nan_and_clips():
    arm = Gen3Arm()
    before = arm.target
    with pytest.raises(ValueError, match="NaN"):
        arm.set_target(np.r_[np.nan, np.zeros(6)])
    np.testing.assert_array_equal(arm.target, before)
    applied = arm.set_target(np.full(7, 10.0))
    np.testing.assert_allclose(applied, gen3.JOINT_UPPER)
    with pytest.raises(ValueError):
        arm.step(-1)


def test_driving_straight_into_the_pillar_is_a_collision(env):
    obs, info = env.reset(seed=5)
    ik = IKSolver()
    q0 = obs[:7].astype(float)
    _, rot = ik.forward(q0)
    q_goal, err = ik.solve(obs[14:17].astype(float), rot, q0)
    assert err < 1e-3
    for k in range(80):
        frac = min(1.0, (k + 1) / 30)
        obs, reward, terminated, truncated, info = env.step(q0 + frac * (q_goal - q0))
        if terminated or truncated:
            break
    assert terminated and info["collision"] and not info["success"]
    assert reward < -5
    assert env.task.elapsed < 3.0  # stopped at the contact, not at the time limit
    assert env.result().collision


@pytest.mark.parametrize("side", ["left", "right"])
def test_side_is_reported_from_geometry(env, side):
    obs, _ = env.reset(seed=11)
    expert = ScriptedExpert()
    expert.reset(obs, np.random.default_rng(0), side=side)
    for _ in range(100):
        obs, _, terminated, truncated, info = env.step(expert.act(obs))
        if terminated or truncated:
            break
    assert info["success"] and not info["collision"]
    assert info["side"] == side
    # Left is +y when reaching along +x from the start pose.
    mid_y = expert.path[len(expert.path) // 2, 1]
    assert (mid_y > obs[18]) == (side == "left")


def test_task_runs_without_the_gym_wrapper_at_500hz():
    arm = Gen3Arm()
    task = ReachObstacleTask(arm)
    task.reset(np.random.default_rng(4))
    obs = task.observation()
    assert obs.shape == (20,) and obs.dtype == np.float32
    arm.set_target(obs[:7])  # hold still: no success, no collision, times out
    for _ in range(200):
        arm.step(1)
        info = task.update()
    assert not info["collision"] and not info["success"] and info["side"] is None
    assert info["time"] == pytest.approx(0.4)
    res = task.result()
    assert res.duration == pytest.approx(0.4) and not task.done
