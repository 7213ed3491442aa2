"""Push-T: the gym-pusht wrapper, its scripted expert, evaluation and the shipped policies."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import koopman_sim
from koopman_distill.cli import main
from koopman_distill.commands.bench import flops_per_call
from koopman_distill.runners import load_runner
from koopman_policy.catalog import load_catalog
from koopman_policy.checkpoint import load_policy
from koopman_sim.collect import collect, run_episode
from koopman_sim.dataset import load_dataset
from koopman_sim.pusht_expert import PushTExpert
from koopman_sim.tasks.pusht import GOAL_POSE, OBS_NAMES, wrap_angle

REPO = Path(__file__).resolve().parents[1]
PUSHT_POLICIES = ("pusht_teacher", "pusht_kdm", "pusht_dkoopman", "pusht_oneflow", "pusht_cd", "pusht_bc")


def test_reset_is_seeded_and_follows_the_conventions() -> None:
    env = koopman_sim.make("pusht")
    a, info = env.reset(seed=3)
    b, _ = env.reset(seed=3)
    c, _ = env.reset(seed=4)
    assert a.dtype == np.float32 and a.shape == (len(OBS_NAMES),)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert GOAL_POSE[2] - np.pi < a[4] <= GOAL_POSE[2] + np.pi
    assert 0.0 <= info["coverage"] < 0.95
    assert env.control_dt == pytest.approx(0.1)


def test_step_moves_the_agent_and_truncates_at_the_limit() -> None:
    env = koopman_sim.make("pusht", max_steps=3)
    obs, _ = env.reset(seed=0)
    target = obs[:2] + np.array([20.0, 0.0], np.float32)
    for _ in range(2):
        new, _, terminated, truncated, _ = env.step(target)
        assert not (terminated or truncated)
    assert np.linalg.norm(new[:2] - target) < np.linalg.norm(obs[:2] - target)
    *_, truncated, _ = env.step(target)
    result = env.result()
    assert truncated and result.steps == 3 and not result.success
    assert result.coverage >= result.final_coverage


def test_block_on_the_goal_is_covered_and_terminates() -> None:
    env = koopman_sim.make("pusht")
    # gym-pusht sets the position and then rotates about the centre of gravity (0, 45) in the block frame.
    cog, (c, s) = np.array([0.0, 45.0]), (np.cos(GOAL_POSE[2]), np.sin(GOAL_POSE[2]))
    position = GOAL_POSE[:2] - cog + np.array([[c, -s], [s, c]]) @ cog
    env.reset(seed=0, options={"reset_to_state": [50.0, 50.0, *position, GOAL_POSE[2]]})
    obs, _, terminated, _, info = env.step(np.array([50.0, 50.0], np.float32))
    assert info["coverage"] > 0.99 and terminated
    assert env.result().success
    assert obs[4] == pytest.approx(GOAL_POSE[2], abs=1e-5)


def test_angle_wrap_keeps_the_discontinuity_opposite_the_goal() -> None:
    g = GOAL_POSE[2]
    np.testing.assert_allclose(wrap_angle(np.array([g, g + 2 * np.pi, g - 0.1 + 2 * np.pi])), [g, g, g - 0.1])
    assert wrap_angle(g + np.pi) == pytest.approx(g + np.pi)


def test_expert_mostly_succeeds() -> None:
    """Ten seeds in about two seconds; over 300 episodes it succeeds about three times in four."""
    env = koopman_sim.make("pusht")
    results = [run_episode(env, PushTExpert(), seed).result for seed in range(10)]
    assert np.mean([r.success for r in results]) >= 0.6
    assert np.mean([r.coverage for r in results]) >= 0.85


def test_collect_writes_pusht_demonstrations(tmp_path) -> None:
    summary = collect("pusht", 3, tmp_path / "d.h5", seed=0, only_success=False, progress=False)
    data = load_dataset(tmp_path / "d.h5")
    assert data.task == "pusht" and data.obs_names == OBS_NAMES and data.action.shape[1] == 2
    assert len(data.episode_ends) == 3 and summary["episodes"] == 3
    assert 0.0 < summary["mean_coverage"] <= 1.0


def test_unknown_task_is_an_error(tmp_path, capsys) -> None:
    with pytest.raises(koopman_sim.UnknownTaskError, match=r"known tasks: .*pusht"):
        koopman_sim.make("push_t")
    assert main(["eval", "--task", "push_t", "--policies", "pusht_bc", "--json", str(tmp_path / "e.json")]) == 2
    assert "unknown task 'push_t'" in capsys.readouterr().err


def test_catalogue_lists_the_pusht_policies() -> None:
    catalog = load_catalog(REPO)
    for name in PUSHT_POLICIES:
        entry = catalog.policies[name]
        assert entry.task == "pusht" and name == f"pusht_{entry.method}"
        runner = load_runner(name)
        assert (runner.obs_dim, runner.action_dim) == (5, 2)
        assert entry.card is not None and json.loads(entry.card.read_text())["evaluation"]["task"] == "pusht"


def test_flops_per_decision_of_students_and_the_teacher_denoiser() -> None:
    """An MLP student costs less than one teacher call; the U-Net-encoder dkoopman one pass of the teacher's network
    (its encoder and head) plus the Koopman layer, well under two calls."""
    denoiser = flops_per_call(load_policy(REPO / "models/pusht_teacher"))
    mlp = flops_per_call(load_policy(REPO / "models/pusht_kdm"))
    unet = flops_per_call(load_policy(REPO / "models/pusht_dkoopman"))
    assert 0 < mlp < denoiser < unet < 1.5 * denoiser, (mlp, denoiser, unet)


def test_eval_pusht_writes_coverage_success_and_latency(tmp_path) -> None:
    out = tmp_path / "eval.json"
    assert main(["eval", "--task", "pusht", "--policies", "pusht_oneflow", "--episodes", "2", "--json", str(out),
                 "--mmd-obs", "4", "--mmd-draws", "4"]) == 0
    result = json.loads(out.read_text())["pusht_oneflow"]
    assert result["episodes"] == 2 and result["task"] == "pusht"
    assert 0.0 <= result["mean_coverage"] <= 1.0 and 0.0 <= result["success_rate"] <= 1.0
    assert result["latency_ms"]["p50"] > 0
    assert out.with_suffix(".md").is_file() and out.with_suffix(".png").is_file()


def test_table_joins_both_tasks_and_fills_its_region_of_a_document(tmp_path) -> None:
    out, doc = tmp_path / "table.json", tmp_path / "results.md"
    doc.write_text("# Results\nwords before\n<!-- results-table:begin -->\nold table\n<!-- results-table:end -->\n"
                   "words after\n")
    results = REPO / "results"
    assert main(["table", "--results", "pusht", str(results / "eval_pusht.json"), str(results / "bench_pusht.json"),
                 "--json", str(out), "--into", str(doc)]) == 0
    text = doc.read_text()
    assert "old table" not in text and text.startswith("# Results\nwords before\n") and text.endswith("words after\n")
    assert out.with_suffix(".md").read_text() in text and "| pusht | teacher |" in text
    assert main(["table", "--results", "pusht", str(results / "eval_pusht.json"), str(results / "bench_pusht.json"),
                 "--json", str(out), "--into", str(REPO / "README.md")]) == 2  # no table region: refused
    table = json.loads(out.read_text())["pusht"]
    assert table["rows"]["pusht_teacher"]["flops_per_decision"] > table["rows"]["pusht_bc"]["flops_per_decision"]
    assert set(table["targets"]) >= {"best_student_at_least_teacher", "min_speedup"}
