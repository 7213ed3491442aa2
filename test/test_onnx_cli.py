"""``koopman-distill export`` and ``bench`` on small randomly initialised checkpoints."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from policy_fields import task_fields

from koopman_distill.cli import UserError
from koopman_distill.commands import bench, export
from koopman_policy.checkpoint import save_policy
from koopman_policy.onnx_export import file_sha256
from koopman_policy.onnx_policy import OnnxDenoiserLoop, OnnxPolicy
from koopman_policy.registry import POLICIES


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    export.register(sub)
    bench.register(sub)
    args = parser.parse_args(argv)
    return args.func(args)


def _checkpoint(method: str, directory):
    """A checkpoint as those trained before contracts: the Gen3 task's names, no contract in its config."""
    torch.manual_seed(0)
    cls = POLICIES[method]
    kw = {"down_dims": (16, 32), "step_embed_dim": 16} if method == "teacher" else {"hidden_dim": 64}
    fields = task_fields()
    policy = cls(cls.config_class(**kw, obs_names=fields["obs_names"], action_names=fields["action_names"]))
    policy.fit_normalizers(torch.randn(64, 2, 20), torch.rand(64, 16, 7))
    save_policy(policy, directory, extra={"card": {"commit": "0123abc"}})
    (directory / "card.json").write_text(json.dumps({"name": directory.name, "method": method}) + "\n")
    return directory


def test_export_cli_writes_files_parity_and_card(tmp_path, capsys) -> None:
    ckpt = _checkpoint("teacher", tmp_path / "teacher")
    assert _cli(["export", "--checkpoint", str(ckpt), "--parity-samples", "100", "--teacher-steps", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("parity: ONNX Runtime vs PyTorch on 100 random inputs") == 2 and "FAILED" not in out
    card = json.loads((ckpt / "card.json").read_text())
    for name in ("policy.onnx", "denoiser.onnx"):
        assert card["exports"][name]["sha256"] == file_sha256(ckpt / name)
        assert card["exports"][name]["parity_max_abs"] <= 1e-4
    # Trained before contracts: the built-in task whose names these are.
    assert card["contract"] == task_fields()["contract"] and "contract of task 'gen3_reach_obstacle'" in out
    teacher = OnnxPolicy(ckpt / "policy.onnx", expected_sha256=card["exports"]["policy.onnx"]["sha256"])
    assert teacher.metadata.training_commit == "0123abc" and teacher.metadata.sampler == "ddim"
    loop = OnnxDenoiserLoop(ckpt / "denoiser.onnx", sampler="ddim", num_inference_steps=3)
    obs, noise = np.zeros((2, 20), np.float32), np.random.default_rng(0).standard_normal((16, 7), np.float32)
    np.testing.assert_allclose(loop.predict_action(obs, noise), teacher.predict_action(obs, noise), atol=1e-4)


def test_export_cli_user_errors(tmp_path) -> None:
    with pytest.raises(UserError, match="not a checkpoint directory"):
        _cli(["export", "--checkpoint", str(tmp_path)])
    ckpt = _checkpoint("bc", tmp_path / "bc")
    with pytest.raises(UserError, match=r"\.onnx"):
        _cli(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "x.txt")])
    out = tmp_path / "elsewhere" / "bc.onnx"
    assert _cli(["export", "--checkpoint", str(ckpt), "--out", str(out), "--ood-threshold", "2.5"]) == 0
    assert OnnxPolicy(out).metadata.ood_threshold == 2.5
    assert "exports" not in json.loads((ckpt / "card.json").read_text())  # only files beside the card
    alien = save_policy(POLICIES["bc"](POLICIES["bc"].config_class(hidden_dim=64)), tmp_path / "alien")
    with pytest.raises(ValueError, match="are no built-in task's"):
        _cli(["export", "--checkpoint", str(alien)])


def test_bench_on_checkpoints_by_path(tmp_path) -> None:
    teacher = _checkpoint("teacher", tmp_path / "gen3_teacher")
    student = _checkpoint("dkoopman", tmp_path / "gen3_dkoopman")
    out = tmp_path / "bench.json"
    argv = ["bench", "--json", str(out), "--models", str(teacher), str(student), "--calls", "30",
            "--ddpm-calls", "2", "--warmup", "3"]
    assert _cli(argv) == 0
    data = json.loads(out.read_text())
    expected = {"gen3_dkoopman", "gen3_teacher_ddpm100_torch", "gen3_teacher_ddim10_torch",
                "gen3_teacher_ddim10_onnx_denoiser_loop", "gen3_teacher_ddim10_onnx_unrolled", "machine"}
    assert set(data) == expected
    for key in expected - {"machine"}:
        entry = data[key]
        assert 0 < entry["p50_ms"] <= entry["p99_ms"]
        assert entry["calls"] == (2 if key.endswith("ddpm100_torch") else 30)
    assert data["gen3_dkoopman"]["speedup_vs_teacher_ddpm100"] > 0
    machine = data["machine"]
    assert machine["one_core"] is True and machine["intra_op_threads"] == 1
    assert {"cpu_model", "cores", "provider", "onnxruntime_version", "pinned_core"} <= set(machine)
