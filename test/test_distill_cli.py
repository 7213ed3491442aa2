"""The ``koopman-distill`` pipeline end to end on a tiny problem, through its real command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from koopman_distill.cli import main
from koopman_distill.data import file_sha256, read_teacher_data
from koopman_distill.evaluate import reference_runner, rollout
from koopman_distill.runners import TeacherFinishedRunner, load_runner
from koopman_policy.checkpoint import load_policy
from koopman_policy.registry import STUDENT_METHODS
from koopman_sim.collect import collect

TINY_TEACHER = ["--set", "down_dims=8,16", "--set", "step_embed_dim=8", "--set", "n_groups=4"]
TINY_STUDENT = ["--set", "hidden_dim=32", "--set", "cond_embed_dim=8"]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pipeline")
    collect("gen3_reach_obstacle", episodes=6, out=root / "demos.h5", seed=0, progress=False)
    assert main(["teacher", "--data", str(root / "demos.h5"), "--out", str(root / "teacher"),
                 "--steps", "30", "--batch-size", "32", *TINY_TEACHER]) == 0
    assert main(["teacher-data", "--teacher", str(root / "teacher"), "--data", str(root / "demos.h5"),
                 "--out", str(root / "td.h5"), "--steps", "3", "--draws", "1"]) == 0
    return root


def test_teacher_card_records_provenance(pipeline):
    card = json.loads((pipeline / "teacher" / "card.json").read_text())
    assert card["method"] == "teacher"
    assert len(card["data"]["sha256"]) == 64
    assert card["command"].startswith("koopman-distill teacher")
    assert card["commit"]
    assert card["training"]["steps"] == 30
    assert not (pipeline / "teacher" / "train_state.safetensors").exists()


@pytest.mark.parametrize("method", STUDENT_METHODS)
def test_every_student_method_distils_and_loads(pipeline, method):
    out = pipeline / method
    assert main(["student", "--method", method, "--teacher", str(pipeline / "teacher"),
                 "--teacher-data", str(pipeline / "td.h5"), "--out", str(out), "--steps", "20",
                 "--batch-size", "16", *TINY_STUDENT]) == 0
    policy = load_policy(out)
    teacher = load_policy(pipeline / "teacher")
    assert torch.equal(policy.action_normalizer.scale, teacher.action_normalizer.scale)
    card = json.loads((out / "card.json").read_text())
    assert card["method"] == method and card["parameters"] == policy.num_parameters()
    if method in ("kdm", "dkoopman"):
        assert card["ood_threshold"] > 0
    chunk = policy.predict_action(torch.zeros(1, 2, 20))
    assert chunk.shape == (1, 16, 7) and torch.isfinite(chunk).all()


def test_the_contract_travels_from_the_data_to_the_export(pipeline):
    """collect records the task's contract, teacher and student carry it in their configs, export writes it."""
    from koopman_policy.contract import Contract
    from koopman_policy.onnx_format import read_metadata
    from koopman_sim.dataset import load_dataset

    recorded = Contract.from_json(load_dataset(pipeline / "demos.h5").contract)
    assert recorded.task == "gen3_reach_obstacle" and recorded.image is None
    assert main(["student", "--method", "bc", "--teacher", str(pipeline / "teacher"), "--teacher-data",
                 str(pipeline / "td.h5"), "--out", str(pipeline / "bc_contract"), "--steps", "2", *TINY_STUDENT]) == 0
    assert main(["export", "--checkpoint", str(pipeline / "bc_contract"), "--parity-samples", "8"]) == 0
    for directory in (pipeline / "teacher", pipeline / "bc_contract"):
        assert Contract.from_dict(load_policy(directory).config.contract) == recorded
    assert Contract.from_dict(read_metadata(pipeline / "bc_contract" / "policy.onnx")["contract"]) == recorded
    assert json.loads((pipeline / "bc_contract" / "card.json").read_text())["contract"] == \
        json.loads(recorded.to_json())


def test_unet_oneflow_starts_from_the_teacher(pipeline, capsys):
    common = ["student", "--method", "oneflow", "--teacher", str(pipeline / "teacher"), "--teacher-data",
              str(pipeline / "td.h5"), "--steps", "5", "--batch-size", "16", "--set", "backbone=unet"]
    out = pipeline / "oneflow_unet"
    assert main([*common, "--out", str(out), *TINY_TEACHER]) == 0
    card = json.loads((out / "card.json").read_text())
    assert card["initialised_from_teacher"] is True
    assert card["parameters"] == load_policy(pipeline / "teacher").num_parameters()
    # A U-Net of other widths cannot take the teacher's weights: a clear error, nothing written.
    assert main([*common, "--out", str(pipeline / "oneflow_wide")]) == 2
    assert "down_dims" in capsys.readouterr().err and not (pipeline / "oneflow_wide").exists()


def test_oneflow_continues_from_a_student_with_a_demonstration_loss(pipeline, capsys):
    common = ["student", "--method", "oneflow", "--teacher", str(pipeline / "teacher"), "--teacher-data",
              str(pipeline / "td.h5"), "--steps", "5", "--batch-size", "16"]
    first = pipeline / "oneflow_first"
    assert main([*common, "--out", str(first), *TINY_STUDENT]) == 0
    demos = ["--demos", str(pipeline / "demos.h5")]
    out = pipeline / "oneflow_demos"
    assert main([*common, "--out", str(out), "--init", str(first), *demos, "--set", "demo_loss_weight=1"]) == 0
    card, first_card = (json.loads((d / "card.json").read_text()) for d in (out, first))
    assert card["initialised_from"]["sha256"] == file_sha256(first / "model.safetensors")
    assert card["initialised_from"]["command"] == first_card["command"] and not card["initialised_from_teacher"]
    assert card["demos"]["sha256"] == file_sha256(pipeline / "demos.h5") and card["demos"]["windows"] > 0
    policy, start = load_policy(out), load_policy(first)
    assert policy.config.hidden_dim == 32 and policy.config.demo_loss_weight == 1.0  # the init's config, --set on top
    assert any(not torch.equal(a, b) for a, b in zip(policy.state_dict().values(), start.state_dict().values(),
                                                      strict=True))
    # Every mismatch is a clear error and writes nothing.
    collect("gen3_reach_obstacle", episodes=1, out=pipeline / "other_demos.h5", seed=9, progress=False)
    init = ["--init", str(first)]
    refused = [
        ([*init, "--set", "demo_loss_weight=1"], "needs --demos"),
        ([*init, *demos], "only by a student with demo_loss_weight"),
        ([*init, "--demos", str(pipeline / "other_demos.h5"), "--set", "demo_loss_weight=1"], "another dataset"),
        (["--init", str(pipeline / "teacher")], "not oneflow"),
    ]
    for extra, message in refused:
        bad = pipeline / "oneflow_refused"
        assert main([*common, "--out", str(bad), *extra]) == 2
        assert message in capsys.readouterr().err and not bad.exists()


def test_oneflow_learns_its_init_students_refined_chunk(pipeline, capsys):
    common = ["student", "--method", "oneflow", "--teacher", str(pipeline / "teacher"), "--teacher-data",
              str(pipeline / "td.h5"), "--steps", "5", "--batch-size", "16"]
    source = pipeline / "oneflow_source"
    assert main([*common, "--out", str(source), *TINY_STUDENT]) == 0
    out = pipeline / "oneflow_refined"
    refine = ["--set", "refine_steps=2", "--set", "refine_progress=0.6666666667"]  # 2 of the data's 3 steps
    assert main([*common, "--out", str(out), "--init", str(source), *refine]) == 0
    card = json.loads((out / "card.json").read_text())
    t = int(read_teacher_data(pipeline / "td.h5").timesteps[2])
    alpha_bar = float(load_policy(pipeline / "teacher").ddpm.alphas_cumprod[t])
    assert card["refinement"] == {"steps": 2, "progress": 0.6666666667, "diffusion_step": t,
                                  "alpha_bar": pytest.approx(alpha_bar)}
    assert card["initialised_from"]["sha256"] == file_sha256(source / "model.safetensors")
    assert load_policy(out).config.refine_steps == 2
    # No source, or a progress between the teacher data's points: a clear error, nothing written.
    for extra, message in (([*refine], "needs --init"),
                           (["--init", str(source), "--set", "refine_steps=1", "--set", "refine_progress=0.5"],
                            "not a point of the teacher data")):
        bad = pipeline / "oneflow_refused"
        assert main([*common, "--out", str(bad), *extra]) == 2
        assert message in capsys.readouterr().err and not bad.exists()


def test_eval_writes_json_table_and_plot(pipeline):
    assert main(["student", "--method", "bc", "--teacher", str(pipeline / "teacher"), "--teacher-data",
                 str(pipeline / "td.h5"), "--out", str(pipeline / "bc_eval"), "--steps", "5", *TINY_STUDENT]) == 0
    out = pipeline / "eval" / "results.json"
    assert main(["eval", "--policies", f"{pipeline / 'bc_eval'}", "--teacher", str(pipeline / "teacher"),
                 "--episodes", "2", "--mmd-obs", "3", "--mmd-draws", "4", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    ((_, r),) = results.items()
    for key in ("success_rate", "collision_rate", "left_fraction", "mmd_to_teacher", "latency_ms", "parameters"):
        assert key in r, key
    assert r["episodes"] == 2 and 0.0 <= r["success_rate"] <= 1.0
    assert r["latency_ms"]["p50"] <= r["latency_ms"]["p99"]
    assert out.with_suffix(".md").read_text().startswith("| policy")
    assert out.with_suffix(".png").stat().st_size > 1000


def test_noise_scale_multiplies_the_noise_the_policy_is_given(pipeline, capsys):
    runner = load_runner(str(pipeline / "teacher"), "torch")
    predict = runner.predict_action
    seen: dict[float, list[np.ndarray]] = {1.0: [], 2.5: []}
    for scale, noises in seen.items():
        runner.predict_action = lambda *x, noises=noises: noises.append(x[-1].copy()) or predict(*x)
        rollout(runner, 1, 1000, progress=False, noise_scale=scale)
    # The episodes may end after different numbers of decisions (their actions differ); the k-th draw is the
    # same draw in both, scaled.
    common = min(len(seen[1.0]), len(seen[2.5]))
    assert common > 0
    for a, b in zip(seen[1.0][:common], seen[2.5][:common], strict=True):
        np.testing.assert_allclose(b, 2.5 * a, rtol=1e-6)
    out = pipeline / "eval_scaled" / "results.json"
    args = ["eval", "--policies", str(pipeline / "teacher"), "--teacher", str(pipeline / "teacher"), "--episodes", "1",
            "--mmd-obs", "3", "--mmd-draws", "4", "--json", str(out)]
    assert main([*args, "--noise-scale", "1.5"]) == 0
    ((_, r),) = json.loads(out.read_text()).items()
    assert r["noise_scale"] == 1.5
    assert main([*args, "--noise-scale", "0"]) == 2
    assert "--noise-scale must be positive, got 0.0" in capsys.readouterr().err
    assert main([*args, "--noise-scale", "1.5", "--update-cards"]) == 2
    assert "--update-cards records a model's own evaluation" in capsys.readouterr().err


def test_episodes_in_lockstep_are_the_episodes_one_by_one(pipeline, capsys):
    # random_target acts on its noise, hold on its history: each sees what it would one by one (random_target's
    # normal CDF may round a batch differently in the last bit).
    like = load_runner(str(pipeline / "teacher"), "torch")
    for name in ("random_target", "hold"):
        runner = reference_runner(name, "pusht", like)
        one, grouped = (rollout(runner, 5, 1000, task="pusht", progress=False, keep_histories=True, batch=b)
                        for b in (1, 3))
        assert one.successes == grouped.successes and len(one.histories) == len(grouped.histories)
        np.testing.assert_allclose(grouped.coverages, one.coverages, rtol=1e-9)
        assert len(grouped.latencies_ms) < len(one.latencies_ms)  # one call per decision of the group
        for a, b in [*zip(one.paths, grouped.paths, strict=True), *zip(one.histories, grouped.histories, strict=True)]:
            np.testing.assert_allclose(b, a, atol=1e-6)
    out = pipeline / "eval_lockstep" / "results.json"
    args = ["eval", "--policies", str(pipeline / "teacher"), "--teacher", str(pipeline / "teacher"), "--episodes", "3",
            "--mmd-obs", "3", "--mmd-draws", "4", "--json", str(out), "--batch-episodes", "2"]
    assert main(args) == 0
    ((_, r),) = json.loads(out.read_text()).items()
    assert r["episodes"] == 3 and r["batch_episodes"] == 2
    assert main([*args, "--update-cards"]) == 2
    assert "1 with --update-cards (a card records the latency of one decision; got 2)" in capsys.readouterr().err


def test_visited_histories_are_labelled_by_the_teacher(pipeline, capsys):
    visited = pipeline / "visited.h5"
    assert main(["visit", "--policy", str(pipeline / "teacher"), "--episodes", "2", "--seed", "7",
                 "--out", str(visited)]) == 0
    with h5py.File(visited) as f:
        histories, attrs = f["obs"][()], dict(f.attrs)
    assert histories.shape[1:] == (2, 20) and attrs["episodes"] == 2 and attrs["seed"] == 7
    # every control step of both episodes; the first history of an episode repeats its first observation
    assert len(histories) >= 2 and np.array_equal(histories[0, 0], histories[0, 1])
    out = pipeline / "td_visited.h5"
    assert main(["teacher-data", "--teacher", str(pipeline / "teacher"), "--data", str(pipeline / "demos.h5"),
                 "--visited", str(visited), "--out", str(out), "--steps", "3", "--draws", "1"]) == 0
    plain, labelled = read_teacher_data(pipeline / "td.h5"), read_teacher_data(out)
    assert len(labelled.obs) == len(plain.obs) + len(histories)
    assert torch.equal(labelled.obs[len(plain.obs):], torch.from_numpy(histories))
    assert labelled.attrs["visited_sha256"] == file_sha256(visited)
    with h5py.File(pipeline / "bad_visited.h5", "w") as f:
        f["obs"] = np.zeros((3, 2, 5), dtype=np.float32)  # Push-T histories for a Gen3 teacher
    capsys.readouterr()
    assert main(["teacher-data", "--teacher", str(pipeline / "teacher"), "--data", str(pipeline / "demos.h5"),
                 "--visited", str(pipeline / "bad_visited.h5"), "--out", str(pipeline / "x.h5")]) == 2
    assert "(2, 20)" in capsys.readouterr().err and not (pipeline / "x.h5").exists()


def test_fidelity_separates_the_teacher_from_a_noise_blind_student(pipeline, capsys):
    visited = pipeline / "visited_fidelity.h5"
    assert main(["visit", "--policy", str(pipeline / "teacher"), "--episodes", "1", "--seed", "9",
                 "--out", str(visited)]) == 0
    assert main(["student", "--method", "bc", "--teacher", str(pipeline / "teacher"), "--teacher-data",
                 str(pipeline / "td.h5"), "--out", str(pipeline / "bc_fidelity"), "--steps", "5", *TINY_STUDENT]) == 0
    for d in ("teacher", "bc_fidelity"):
        assert main(["export", "--checkpoint", str(pipeline / d), "--parity-samples", "2"]) == 0
    out = pipeline / "fidelity.json"
    assert main(["fidelity", "--teacher", str(pipeline / "teacher"), "--policies",
                 f"{pipeline / 'teacher'},{pipeline / 'bc_fidelity'}", "--visited", str(visited),
                 "--observations", "4", "--draws", "3", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["policies"]
    itself, bc = rows["teacher"], rows["bc_fidelity"]
    assert itself["paired"] < 1e-9 and abs(itself["spread"] - 1.0) < 1e-6 and itself["teacher_spread"] > 0
    assert bc["spread"] < 1e-9  # behaviour cloning ignores the noise: one chunk per observation
    assert bc["paired"] >= bc["teacher_spread"] - 1e-9  # a noise-blind map cannot do better than the mean push
    assert main(["fidelity", "--teacher", str(pipeline / "teacher"), "--policies", "teacher", "--visited",
                 str(visited), "--draws", "1", "--json", str(out)]) == 2
    assert "--draws" in capsys.readouterr().err


def test_user_errors_exit_2_with_one_line(tmp_path, capsys):
    assert main(["teacher", "--data", str(tmp_path / "missing.h5"), "--out", str(tmp_path / "t")]) == 2
    assert "missing.h5" in capsys.readouterr().err


def test_unknown_config_field_is_refused(pipeline, capsys):
    assert main(["student", "--method", "kdm", "--teacher", str(pipeline / "teacher"), "--teacher-data",
                 str(pipeline / "td.h5"), "--out", str(pipeline / "x"), "--set", "width=3"]) == 2
    assert "FIELD" in capsys.readouterr().err


def _student_cmd(pipeline: Path, out: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "koopman_distill.cli", "student", "--method", "oneflow", "--teacher",
            str(pipeline / "teacher"), "--teacher-data", str(pipeline / "td.h5"), "--out", str(out),
            "--steps", str(steps), "--batch-size", "16", *TINY_STUDENT]


def test_resumed_training_equals_uninterrupted(pipeline):
    steps = 1500
    full, cut = pipeline / "resume_full", pipeline / "resume_cut"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_student_cmd(pipeline, full, steps), check=True, env=env, capture_output=True)
    proc = subprocess.Popen(_student_cmd(pipeline, cut, steps), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (cut / "train_state.json").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = json.loads((cut / "train_state.json").read_text())["step"]
    assert 0 < saved < steps
    subprocess.run([*_student_cmd(pipeline, cut, steps), "--resume"], check=True, env=env, capture_output=True)
    a, b = load_policy(full).state_dict(), load_policy(cut).state_dict()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_ddp_two_processes_agree(pipeline):
    out = pipeline / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "koopman_distill.cli", "student", "--method", "dkoopman", "--teacher", str(pipeline / "teacher"),
           "--teacher-data", str(pipeline / "td.h5"), "--out", str(out), "--steps", "10", "--batch-size", "8",
           *TINY_STUDENT]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=600, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-2000:]
    training = json.loads((out / "card.json").read_text())["training"]
    assert training["world_size"] == 2
    assert training["ranks_agree"] is True


def test_help_lists_every_command_without_torch() -> None:
    """``koopman-distill --help`` answers at once: only the command being run is imported."""
    import subprocess
    import sys

    code = ("import sys; from koopman_distill.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('heavy:', sorted(m for m in ('torch', 'onnxruntime', 'mujoco', 'h5py') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "heavy: []" in r.stdout, r.stdout[-500:]
    from koopman_distill.cli import COMMANDS
    assert all(name in r.stdout for name in COMMANDS)


def _refine_source(pipeline: Path) -> Path:
    """A small dkoopman student of the pipeline's teacher, trained once per module."""
    student = pipeline / "refine_source"
    if not (student / "model.safetensors").is_file():
        assert main(["student", "--method", "dkoopman", "--teacher", str(pipeline / "teacher"), "--teacher-data",
                     str(pipeline / "td.h5"), "--out", str(student), "--steps", "20", "--batch-size", "16",
                     *TINY_STUDENT]) == 0
    return student


def test_eval_finish_progress_measures_what_refined_data_records(pipeline, capsys):
    """``eval --finish-progress``: the student's chunk finished by the teacher's DDIM-30 is exactly the end point
    ``teacher-data --refine`` records for the same history and noise; the teacher itself is evaluated as it is."""
    student = _refine_source(pipeline)
    td = pipeline / "td_refined30.h5"
    assert main(["teacher-data", "--teacher", str(pipeline / "teacher"), "--data", str(pipeline / "demos.h5"),
                 "--steps", "30", "--draws", "1", "--out", str(td), "--refine", str(student)]) == 0
    data = read_teacher_data(td)
    teacher = load_policy(pipeline / "teacher")
    runner = TeacherFinishedRunner.of(load_runner(str(student), "torch"), teacher, 0.7)
    chunk = runner.predict_action(data.obs[:4].numpy(), data.states[:4, 0].numpy())
    expected = teacher.action_normalizer.unnormalize(data.states[:4, -1]).numpy()
    np.testing.assert_allclose(chunk, expected, atol=1e-4)
    out = pipeline / "eval_finished" / "results.json"
    args = ["eval", "--policies", f"{student},{pipeline / 'teacher'}", "--teacher", str(pipeline / "teacher"),
            "--episodes", "1", "--mmd-obs", "3", "--mmd-draws", "4", "--json", str(out)]
    assert main([*args, "--finish-progress", "0.7"]) == 0
    results = json.loads(out.read_text())
    assert results[str(student)]["finished_by_teacher_from"] == 0.7
    assert results[str(student)]["sampler"] == "finished by ddim-30 from 0.7"
    assert "finished_by_teacher_from" not in results[str(pipeline / "teacher")]
    capsys.readouterr()
    assert main([*args, "--finish-progress", "1.0"]) == 2
    assert "--finish-progress must lie in (0, 1)" in capsys.readouterr().err


def test_refined_teacher_data_holds_the_students_chunk_finished_by_the_teacher(pipeline, capsys):
    """``teacher-data --refine``: the same histories and noises as the plain file, the end point the teacher
    reaches from the student's chunk re-noised at the given progress; only the Koopman students train on it."""
    student = _refine_source(pipeline)
    out = pipeline / "td_refined.h5"
    common = ["teacher-data", "--teacher", str(pipeline / "teacher"), "--data", str(pipeline / "demos.h5"),
              "--steps", "3", "--draws", "1"]
    capsys.readouterr()
    assert main([*common, "--out", str(out), "--refine", str(student), "--refine-progress", "0.67"]) == 0
    assert "chunks finished by DDIM-3 from progress 0.67" in capsys.readouterr().out
    plain, refined = read_teacher_data(pipeline / "td.h5"), read_teacher_data(out)
    assert refined.states.shape[1] == 2 and refined.timesteps[-1] == -1
    assert torch.equal(refined.obs, plain.obs) and torch.equal(refined.states[:, 0], plain.states[:, 0])
    assert refined.attrs["refined_by_sha256"] == file_sha256(student / "model.safetensors")
    teacher, source = load_policy(pipeline / "teacher"), load_policy(student)
    obs_n, noise = teacher.encode_obs(plain.obs[:8]), plain.states[:8, 0]
    with torch.no_grad():
        x = source.sample_normalized(obs_n, noise)[0]
        teacher.ddim.set_timesteps(3)
        alpha_bar = teacher.ddim.alphas_cumprod[teacher.ddim.timesteps[2]]
        x = alpha_bar.sqrt() * x + (1 - alpha_bar).sqrt() * noise
        x = teacher.ddim.step(teacher.model(x, teacher.ddim.timesteps[2], obs_n), teacher.ddim.timesteps[2], x,
                              eta=0.0).prev_sample
    assert torch.allclose(refined.states[:8, 1], x, atol=1e-5)
    assert (refined.states[:, 1] - plain.states[:, -1]).abs().max() > 1e-3  # not the teacher's own end point

    kdm = pipeline / "kdm_refined"
    assert main(["student", "--method", "kdm", "--teacher", str(pipeline / "teacher"), "--teacher-data", str(out),
                 "--out", str(kdm), "--steps", "5", "--batch-size", "16", *TINY_STUDENT]) == 0
    card = json.loads((kdm / "card.json").read_text())
    assert card["data"]["refined_by"] == str(student) and card["data"]["refine_progress"] == 0.67
    capsys.readouterr()
    assert main(["student", "--method", "bc", "--teacher", str(pipeline / "teacher"), "--teacher-data", str(out),
                 "--out", str(pipeline / "bc_refined"), "--steps", "5"]) == 2
    assert "refined end points" in capsys.readouterr().err
    assert main([*common, "--out", str(pipeline / "y.h5"), "--refine", str(pipeline / "teacher")]) == 2
    assert "Koopman students" in capsys.readouterr().err
    assert main([*common, "--out", str(pipeline / "y.h5"), "--refine", str(student), "--refine-progress", "0.1"]) == 2
    assert "leaves no step" in capsys.readouterr().err and not (pipeline / "y.h5").exists()
