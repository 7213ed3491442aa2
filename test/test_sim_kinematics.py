"""The hand-written Gen3 MJCF against Kinova's published DH table, and model loading errors."""

from pathlib import Path

import mujoco
import numpy as np
import pytest

from koopman_sim import gen3
from koopman_sim.arm import Gen3Arm
from koopman_sim.kinematics import dh_forward


def _random_configs(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Continuous joints: one full turn each way covers every distinct pose.
    lo = np.where(np.isclose(gen3.JOINT_UPPER, 2 * np.pi), -np.pi, gen3.JOINT_LOWER)
    hi = -lo
    return rng.uniform(lo, hi, size=(n, 7))


def test_mjcf_forward_kinematics_matches_dh_table():
    model = gen3.load_model()
    data = mujoco.MjData(model)
    site = model.site(gen3.EE_SITE).id
    qadr = [model.joint(n).qposadr[0] for n in gen3.JOINT_NAMES]
    pos_err, rot_err = [], []
    for q in _random_configs(64):
        data.qpos[qadr] = q
        mujoco.mj_kinematics(model, data)
        ref = dh_forward(q)
        pos_err.append(np.linalg.norm(data.site_xpos[site] - ref[:3, 3]))
        rot_err.append(np.abs(data.site_xmat[site].reshape(3, 3) - ref[:3, :3]).max())
    # DH has no counterpart for the URDF's two 0.175 mm wrist offsets: 0.35 mm worst case.
    assert max(pos_err) < 1e-3, max(pos_err)
    assert max(pos_err) > 0  # the two computations really are different code paths
    assert max(rot_err) < 1e-6


def test_zero_pose_height_matches_published_reach():
    # All joints at zero: the arm stands straight up; flange height 0.2848+0.4208+0.3143+0.1674 m (DH sums).
    ref = dh_forward(np.zeros(7))
    assert ref[2, 3] == pytest.approx(1.187385, abs=1e-6)
    arm = Gen3Arm()
    arm.reset(np.zeros(7))
    assert np.linalg.norm(arm.ee_pos - ref[:3, 3]) < 1e-3


def test_model_limits_and_mass_follow_the_spec():
    model = gen3.load_model()
    assert model.body_subtreemass[model.body("base_link").id] == pytest.approx(8.19, abs=0.05)
    for i, name in enumerate(gen3.JOINT_NAMES):
        act = model.actuator(name)
        assert act.ctrlrange[0] == pytest.approx(gen3.JOINT_LOWER[i])
        assert act.ctrlrange[1] == pytest.approx(gen3.JOINT_UPPER[i])
        assert act.forcerange[1] == pytest.approx(gen3.EFFORT_LIMITS[i])
        if i in (1, 3, 5):
            assert model.joint(name).range[1] == pytest.approx(gen3.JOINT_UPPER[i])
    assert model.key("home").id >= 0


def test_load_model_accepts_external_file_and_validates(tmp_path: Path):
    text = gen3.default_model_path().read_text()
    good = tmp_path / "copy.xml"
    good.write_text(text)
    assert gen3.load_model(good).njnt == 7
    assert Gen3Arm(str(good)).q.shape == (7,)

    bad = tmp_path / "renamed.xml"
    bad.write_text(text.replace('name="joint_3"', 'name="elbow"'))
    with pytest.raises(gen3.Gen3ModelError, match="joint_3"):
        gen3.load_model(bad)

    with pytest.raises(FileNotFoundError, match="not found"):
        gen3.load_model(tmp_path / "missing.xml")

    broken = tmp_path / "broken.xml"
    broken.write_text("<mujoco><worldbody>")
    with pytest.raises(gen3.Gen3ModelError, match="cannot load"):
        gen3.load_model(broken)
