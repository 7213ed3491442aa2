"""Evaluation pieces for issue 23: the model-free reference policies and the per-state mode metric."""

from __future__ import annotations

import json

import numpy as np
import pytest

import koopman_sim
from koopman_distill.cli import main
from koopman_distill.evaluate import (
    MODES,
    ReferenceRunner,
    mode_counts,
    mode_summary,
    pusht_contact_face,
    reference_runner,
)
from koopman_distill.runners import load_runner


def pusht_reference(name: str) -> ReferenceRunner:
    return reference_runner(name, "pusht", load_runner("pusht_dkoopman"))


def test_hold_repeats_the_disc_position_and_random_target_draws_from_the_table() -> None:
    obs = np.array([[[10, 20, 0, 0, 0], [30, 40, 0, 0, 0]]], np.float32)
    noise = np.random.default_rng(0).standard_normal((1, 16, 2)).astype(np.float32)
    hold = pusht_reference("hold").predict_action(obs, noise)
    assert hold.shape == (1, 16, 2) and np.all(hold == [30, 40])
    random = pusht_reference("random_target")
    a, b = random.predict_action(obs, noise), random.predict_action(obs, -noise)
    assert np.all((a >= 0) & (a <= 512)) and np.all(a == a[:, :1])
    np.testing.assert_array_equal(a, random.predict_action(obs, noise))
    np.testing.assert_allclose(a + b, 512.0, atol=1e-3)  # the normal CDF maps -x to 1 - F(x)
    with pytest.raises(ValueError, match="unknown reference"):
        ReferenceRunner("wander", np.zeros(2), np.ones(2), 5, 16, 2, 8)


@pytest.mark.parametrize(("agent", "face"), [((256, 285), "bar_back"), ((256, 435), "stem_tip"),
                                             ((331, 315), "bar_end_right"), ((100, 100), None)])
def test_contact_face_is_the_touched_face_of_the_t(agent, face) -> None:
    env = koopman_sim.make("pusht")  # block at (256, 300), angle 0: its frame is the world's, shifted
    env.reset(seed=0, options={"reset_to_state": [*agent, 256.0, 300.0, 0.0]})
    assert pusht_contact_face(env) == face


def test_mode_summary_removes_the_sampling_noise_of_both_estimates() -> None:
    modes = ("left", "right", "none")
    same = np.array([[16, 16, 0], [20, 12, 0], [8, 24, 0]])
    s = mode_summary(same, modes, same)
    assert s["fraction"]["left"] == pytest.approx(44 / 96) and s["states"] == 3 and s["draws"] == 32
    assert s["rms_diff_to_reference"]["left"] == 0.0  # identical counts: all of the difference is noise
    flipped = mode_summary(np.array([[32, 0, 0]] * 3), modes, np.array([[0, 32, 0]] * 3))
    assert flipped["rms_diff_to_reference"]["left"] == pytest.approx(1.0)
    assert flipped["fraction_sd_across_states"]["left"] == 0.0


def test_mode_counts_of_hold_never_touch_the_block() -> None:
    counts = mode_counts(pusht_reference("hold"), "pusht", states=2, draws=3, seed=7, max_steps=8, progress=False)
    assert counts.shape == (2, len(MODES["pusht"])) and counts[:, -1].tolist() == [3, 3]


def test_eval_reports_reference_rows_and_modes_against_the_teacher(tmp_path) -> None:
    out = tmp_path / "eval.json"
    assert main(["eval", "--task", "pusht", "--policies", "hold,random_target", "--episodes", "2", "--json", str(out),
                 "--mmd-obs", "2", "--mmd-draws", "4", "--mode-states", "1", "--mode-draws", "2",
                 "--mode-steps", "8"]) == 0
    results = json.loads(out.read_text())
    hold = results["hold"]
    assert hold["method"] == "reference" and hold["parameters"] == 0
    assert hold["first_mode_fraction"]["none"] == 1.0 and hold["modes"]["fraction"]["none"] == 1.0
    assert hold["modes"]["reference"] == "pusht_teacher" and "rms_diff_to_reference" in hold["modes"]
    assert sum(results["random_target"]["modes"]["fraction"].values()) == pytest.approx(1.0)
    assert "stem_tip" in out.with_suffix(".md").read_text()


def test_table_keeps_reference_rows_out_of_the_checks(tmp_path) -> None:
    row = {"success_rate": 0.0, "episodes": 2, "mean_coverage": 0.05}
    evaluation = {"pusht_teacher": {**row, "method": "teacher", "backend": "torch", "mean_coverage": 0.7},
                  "pusht_bc": {**row, "method": "bc", "backend": "onnx", "mean_coverage": 0.1},
                  "hold": {**row, "method": "reference", "backend": "none", "mean_coverage": 0.9}}
    bench = {"pusht_teacher_ddpm100": {"runtime": "torch", "p50_ms": 200.0, "speedup_vs_teacher_ddpm100": 1.0},
             "pusht_bc": {"p50_ms": 0.05, "speedup_vs_teacher_ddpm100": 4000.0}}
    paths = [tmp_path / "eval.json", tmp_path / "bench.json"]
    for path, data in zip(paths, (evaluation, bench), strict=True):
        path.write_text(json.dumps(data))
    out = tmp_path / "table.json"
    assert main(["table", "--results", "pusht", *map(str, paths), "--json", str(out)]) == 0
    table = json.loads(out.read_text())["pusht"]
    assert table["rows"]["hold"]["latency_p50_ms"] is None and table["targets"]["best_student"] == "bc"
    assert "| pusht | hold | 0.900" in out.with_suffix(".md").read_text()
