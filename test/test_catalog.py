"""Policy catalogue: the repository's config/policies.yaml, name resolution and paths."""

from __future__ import annotations

from pathlib import Path

import pytest
from policy_fields import task_fields

from koopman_policy.catalog import CatalogError, UnknownPolicyError, load_catalog, resolve_policy
from koopman_policy.checkpoint import save_policy
from koopman_policy.onnx_export import export_policy
from koopman_policy.registry import POLICIES

REPO = Path(__file__).resolve().parents[1]


def test_repository_catalogue() -> None:
    catalog = load_catalog(REPO)
    assert catalog.default == "dkoopman"
    onnx_only = {name for name, e in catalog.policies.items() if e.checkpoint is None}
    assert onnx_only == {"teacher_ddim10"}  # the teacher's DDIM-10 export, evaluated beside its DDPM-100 sampler
    state = {name: e for name, e in catalog.policies.items()
             if e.inputs == "state" and e.task != "pusht" and name not in onnx_only}
    assert set(state) == set(POLICIES)
    assert {f"pusht_{m}" for m in POLICIES} <= set(catalog.policies)
    for name, entry in catalog.policies.items():
        assert (entry.method == name or entry.inputs == "image" or name == f"{entry.task}_{entry.method}"
                or name in onnx_only)
        assert entry.onnx is not None and (entry.checkpoint is not None or name in onnx_only)
        assert entry.onnx.is_relative_to(REPO / "models")
    assert resolve_policy("teacher_ddim10", root=REPO).onnx == resolve_policy("teacher", root=REPO).onnx
    teacher = resolve_policy("teacher", root=REPO)
    assert teacher.onnx_denoiser == REPO / "models/gen3_teacher/denoiser.onnx"
    assert resolve_policy(None, root=REPO).name == "dkoopman"


def test_shipped_cards_record_the_pipelines_commands() -> None:
    """Every card's commands are the pipeline's (the Makefile's), never a test's run on temporary files."""
    import json

    for card in sorted(REPO.glob("models/*/card.json")):
        text = json.dumps(json.loads(card.read_text()))
        assert "pytest-of" not in text and "/tmp/" not in text, f"{card}: written by a test run"


def test_unknown_name_lists_known_names() -> None:
    known = r"known: bc, camera_dkoopman, camera_teacher, cd, dkoopman"
    with pytest.raises(UnknownPolicyError, match=r"unknown policy 'dkoopmann'.*" + known):
        resolve_policy("dkoopmann", root=REPO)


def test_paths_are_accepted_directly(tmp_path) -> None:
    policy = POLICIES["oneflow"](POLICIES["oneflow"].config_class(**task_fields()))
    ckpt = save_policy(policy, tmp_path / "my_flow")
    entry = resolve_policy(str(ckpt), root=tmp_path)
    assert (entry.name, entry.method, entry.checkpoint, entry.onnx) == ("my_flow", "oneflow", ckpt, None)
    onnx_path = export_policy(policy, ckpt / "policy.onnx")
    assert resolve_policy(ckpt, root=tmp_path).onnx == onnx_path
    direct = resolve_policy(onnx_path, root=tmp_path)
    assert (direct.method, direct.onnx, direct.checkpoint) == ("oneflow", onnx_path, None)
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    with pytest.raises(UnknownPolicyError, match="not a readable ONNX file"):
        resolve_policy(tmp_path / "junk.onnx", root=tmp_path)


def test_catalogue_format_errors(tmp_path) -> None:
    (tmp_path / "config").mkdir()
    path = tmp_path / "config" / "policies.yaml"
    path.write_text("policies:\n  a: {method: bc, onnx: models/a.onnx}\ndefault: a\n")
    entry = resolve_policy("a", root=tmp_path)
    assert entry.onnx == tmp_path / "models/a.onnx" and entry.card is None
    assert entry.expected_sha256() is None
    path.write_text("policies:\n  a: {method: bc, onxx: models/a.onnx}\n")
    with pytest.raises(CatalogError, match="unknown fields"):
        load_catalog(tmp_path)
    path.write_text("policies:\n  a: {method: bc}\ndefault: b\n")
    with pytest.raises(CatalogError, match="default 'b'"):
        load_catalog(tmp_path)
    path.write_text("policies: [unclosed\n")
    with pytest.raises(CatalogError, match="not valid YAML"):
        load_catalog(tmp_path)


def test_one_loader_picks_the_backend_and_the_runtime(tmp_path) -> None:
    """``open_policy``: ONNX for serving (the runtime from the file's kind), the checkpoint for torch, and
    ``auto``/``stack`` choosing as evaluation and replay need."""
    from koopman_policy.loader import open_policy
    from koopman_policy.onnx_policy import ModelLoadError, OnnxDenoiserLoop, OnnxPolicy
    from koopman_policy.teacher import DiffusionPolicy

    cpu = {"providers": ["CPUExecutionProvider"], "root": REPO}
    served = open_policy("teacher_ddim10", "auto", **cpu)  # no checkpoint to run: its export
    assert (served.backend, type(served.model), served.source) == ("onnx", OnnxPolicy,
                                                                  REPO / "models/gen3_teacher/policy.onnx")
    assert isinstance(open_policy("models/gen3_teacher/denoiser.onnx", teacher_steps=3, **cpu).model,
                      OnnxDenoiserLoop)
    live = open_policy("pusht_teacher", teacher_steps=3, teacher_from_denoiser=True, **cpu)  # as the nodes serve
    assert isinstance(live.model, OnnxDenoiserLoop) and live.model.num_inference_steps == 3
    assert live.source == REPO / "models/pusht_teacher/denoiser.onnx"
    assert open_policy("dkoopman", teacher_from_denoiser=True, **cpu).source.name == "policy.onnx"  # no denoiser
    reference = open_policy("teacher", "auto", **cpu)  # the teacher's own sampler, DDPM-100
    assert reference.backend == "torch" and isinstance(reference.model, DiffusionPolicy)
    for backend in ("auto", "stack", "onnx"):
        assert open_policy("dkoopman", backend, **cpu).backend == "onnx"
    with pytest.raises(FileNotFoundError, match="no PyTorch checkpoint"):
        open_policy("teacher_ddim10", "torch", **cpu)
    policy = POLICIES["bc"](POLICIES["bc"].config_class(**task_fields()))
    ckpt = save_policy(policy, tmp_path / "fresh")
    assert open_policy(ckpt, "stack", root=tmp_path).backend == "torch"  # never exported: the checkpoint
    with pytest.raises(ModelLoadError, match="names no ONNX file"):
        open_policy(ckpt, root=tmp_path)
    with pytest.raises(ValueError, match="backend must be one of"):
        open_policy("teacher", "tensorrt", **cpu)
