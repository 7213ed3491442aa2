"""The camera pipeline end to end on a tiny problem (data -> teacher -> teacher data -> student -> ONNX ->
closed loop), and the camera student in closed loop through the camera ingest core, as the ROS stack feeds it.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from koopman_control.core.image import ImageNormalizer, ImageObservationBuilder
from koopman_control.core.observation import NS, StateObservationBuilder
from koopman_distill.camera import make_camera_env, state_columns
from koopman_distill.cli import main
from koopman_policy.checkpoint import load_policy
from koopman_policy.onnx_export import read_metadata
from koopman_policy.onnx_image_policy import OnnxImagePolicy
from koopman_sim import gen3
from koopman_sim.dataset import load_dataset

pytestmark = pytest.mark.slow

SIZE = ("32", "32")
TINY_TEACHER = ["--set", "down_dims=8,16", "--set", "step_embed_dim=8", "--set", "n_groups=4",
                "--set", "vision_dims=8,8,8", "--set", "keypoints=4"]
TINY_STUDENT = ["--set", "hidden_dim=32", "--set", "latent_dim=16", "--set", "cond_embed_dim=8",
                "--set", "gain_hidden=16"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("camera")
    demos, teacher, student = root / "demos.h5", root / "teacher", root / "student"
    assert main(["camera-collect", "--episodes", "3", "--out", str(demos), "--size", *SIZE,
                 "--json", str(root / "collect.json")]) == 0
    assert main(["camera-teacher", "--data", str(demos), "--out", str(teacher), "--steps", "20",
                 "--batch-size", "16", "--threads", "1", *TINY_TEACHER]) == 0
    assert main(["camera-teacher-data", "--teacher", str(teacher), "--data", str(demos), "--out",
                 str(root / "td.h5"), "--steps", "3", "--draws", "2", "--batch-size", "64"]) == 0
    assert main(["camera-student", "--teacher", str(teacher), "--teacher-data", str(root / "td.h5"), "--data",
                 str(demos), "--out", str(student), "--steps", "20", "--batch-size", "16", *TINY_STUDENT]) == 0
    threshold = json.loads((student / "card.json").read_text())["ood_threshold"]
    assert main(["export", "--checkpoint", str(student), "--parity-samples", "64", "--ood-threshold",
                 str(threshold)]) == 0
    assert main(["export", "--checkpoint", str(teacher), "--parity-samples", "16", "--teacher-steps", "2"]) == 0
    return root


def test_collected_frames_are_the_observed_states(pipeline):
    """Frame i shows the scene of obs[i]: re-rendering the episode's first state gives the stored frame."""
    demos = load_dataset(pipeline / "demos.h5")
    assert demos.images is not None and demos.images.shape == (demos.n_steps, 32, 32, 3)
    with h5py.File(pipeline / "demos.h5") as f:
        assert (f.attrs["camera"], int(f.attrs["image_height"])) == ("workspace", 32)
    view = make_camera_env("gen3_reach_obstacle", "workspace", (32, 32))
    obs, _ = view.reset(seed=int(demos.episode_seed[1]))
    start = int(demos.episode_starts[1])
    np.testing.assert_array_equal(obs, demos.obs[start])
    np.testing.assert_array_equal(view.render_frame(), demos.images[start])
    view.close()
    summary = json.loads((pipeline / "collect.json").read_text())
    assert summary["render_ms_per_frame"]["p50"] > 0 and summary["steps_written"] == demos.n_steps


def test_cards_and_metadata(pipeline):
    teacher_card = json.loads((pipeline / "teacher" / "card.json").read_text())
    card = json.loads((pipeline / "student" / "card.json").read_text())
    demos_sha = load_dataset(pipeline / "demos.h5").sha256
    assert teacher_card["data"]["sha256"] == demos_sha and card["data"]["dataset_sha256"] == demos_sha
    assert card["command"].startswith("koopman-distill camera-student") and card["commit"]
    assert card["method"] == "dkoopman_image" and card["inputs"] == "image" and card["ood_threshold"] > 0
    assert card["exports"]["policy.onnx"]["parity_max_abs"] <= 1e-4
    assert teacher_card["exports"]["policy.onnx"]["parity_max_abs"] <= 1e-4
    meta = read_metadata(pipeline / "student" / "policy.onnx")
    assert meta["inputs"] == ["image", "state", "noise"] and meta["camera"] == "workspace"
    assert meta["obs_names"] == [f"q_{j}" for j in gen3.JOINT_NAMES] + [f"qd_{j}" for j in gen3.JOINT_NAMES]
    assert meta["ood_threshold"] == pytest.approx(card["ood_threshold"])
    student, teacher = load_policy(pipeline / "student"), load_policy(pipeline / "teacher")
    assert torch.equal(student.action_normalizer.scale, teacher.action_normalizer.scale)


def test_camera_eval_records_results_in_the_cards(pipeline):
    out = pipeline / "eval" / "camera.json"
    assert main(["camera-eval", "--policies", f"{pipeline / 'student'},{pipeline / 'teacher'}", "--episodes", "1",
                 "--json", str(out), "--record"]) == 0
    results = json.loads(out.read_text())
    student = results[str(pipeline / "student")]
    assert student["backend"] == "onnx" and student["episodes"] == 1 and student["sampler"] is None
    assert results[str(pipeline / "teacher")]["sampler"] == "ddim-2"
    assert student["render_ms_per_frame"]["p50"] > 0
    card = json.loads((pipeline / "student" / "card.json").read_text())
    assert card["evaluation"]["success_rate"] == student["success_rate"]
    assert out.with_suffix(".md").read_text().startswith("| policy")


def test_user_errors(pipeline, tmp_path, capsys):
    assert main(["camera-teacher", "--data", str(tmp_path / "missing.h5"), "--out", str(tmp_path / "t")]) == 2
    assert main(["camera-collect", "--episodes", "1", "--out", str(tmp_path / "d.h5"), "--camera", "nope"]) == 2
    assert "unknown camera 'nope'" in capsys.readouterr().err
    assert main(["camera-student", "--teacher", str(pipeline / "student"), "--teacher-data",
                 str(pipeline / "td.h5"), "--data", str(pipeline / "demos.h5"), "--out", str(tmp_path / "s")]) == 2
    assert "not 'teacher_image'" in capsys.readouterr().err


def ingest_closed_loop(path: Path, seed: int, max_ticks: int = 100) -> tuple[dict, int]:
    """One episode: env frames and joint states -> the ROS stack's ingest cores -> OnnxImagePolicy -> env.

    The ingest cores are fed with the simulation clock (one frame and one joint state per 100 ms tick) and keep
    the histories current every tick; the policy plans from them every ``n_action_steps`` ticks and its chunk is
    executed in between, with one noise draw per episode: the protocol of ``koopman-distill camera-eval``.
    (Replanning at every tick instead makes these chunk policies run away: in the gym env, 12 episodes each,
    1 executed step per plan gave 0 successes and 12 collisions for this student and for the state dkoopman
    student alike, 4 steps 8/12 and 8 steps 9/12.)
    """
    policy = OnnxImagePolicy(path, providers=["CPUExecutionProvider"])
    m = policy.metadata
    h, w = policy.image_size
    view = make_camera_env("gen3_reach_obstacle", policy.camera, (h, w))
    images = ImageObservationBuilder(ImageNormalizer(h, w, m.raw["image_mean"], m.raw["image_std"]),
                                     m.n_obs_steps, 1.0 / m.control_dt)
    states = StateObservationBuilder(gen3.JOINT_NAMES, m.n_obs_steps, 1.0 / m.control_dt, use_task=False)
    obs, _ = view.reset(seed=seed)
    cols = state_columns(view.obs_names)
    noise = np.random.default_rng(seed).standard_normal((m.horizon, m.action_dim)).astype(np.float32)
    queue: list[np.ndarray] = []
    ticks, info = 0, {}
    for tick in range(max_ticks):
        stamp = (tick + 1) * round(m.control_dt * NS)
        frame = view.render_frame()
        images.on_frame(stamp, frame)
        img_obs = images.tick(stamp)
        state_obs = states.on_joint_state(list(gen3.JOINT_NAMES), view.arm.q, view.arm.qd, stamp, stamp)
        assert img_obs is not None and state_obs is not None, (images.reason, states.reason)
        np.testing.assert_array_equal(img_obs.history[-1], frame.astype(np.float32) / 255)  # no resize at 1:1
        np.testing.assert_allclose(state_obs.history[-1], obs[cols], atol=1e-6)
        if not queue:
            chunk = policy.predict_action(img_obs.history, state_obs.history, noise)
            assert chunk.shape == (m.horizon, m.action_dim) and np.isfinite(chunk).all()
            queue = list(chunk[m.executed_slice])
        obs, _, terminated, truncated, info = view.step(queue.pop(0))
        ticks += 1
        if terminated or truncated:
            break
    view.close()
    return info, ticks


def test_student_runs_closed_loop_through_the_ingest_core(pipeline):
    info, ticks = ingest_closed_loop(pipeline / "student" / "policy.onnx", seed=7)
    assert ticks >= 1 and set(info) >= {"success", "collision", "distance"}


SHIPPED = REPO / "models" / "gen3_camera_dkoopman" / "policy.onnx"


@pytest.mark.skipif(not SHIPPED.is_file(), reason="the camera student is not shipped in models/")
def test_shipped_camera_student_reaches_targets_through_the_ingest_core():
    """The shipped student, fed only frames and joint states by the ingest cores, reaches the target on held-out
    seeds about as often as in ``camera-eval`` (0.72 over 50 episodes; 7 of these 10 when shipped)."""
    outcomes = [ingest_closed_loop(SHIPPED, seed=5000 + i)[0] for i in range(10)]
    assert sum(o["success"] for o in outcomes) >= 5, outcomes
    assert sum(o["collision"] for o in outcomes) <= 3, outcomes
