"""OnnxPolicy runtime: file validation (the contract among it), input validation, providers, noise seeding,
action queue; the runtime imports no torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from policy_fields import task_fields

from koopman_policy import onnx_policy
from koopman_policy.onnx_export import export_policy, export_teacher_denoiser, file_sha256
from koopman_policy.onnx_policy import ModelLoadError, OnnxDenoiserLoop, OnnxPolicy, load_onnx
from koopman_policy.registry import POLICIES


def _policy(method: str):
    torch.manual_seed(0)
    cls = POLICIES[method]
    kw = {"down_dims": (16, 32), "step_embed_dim": 16} if method == "teacher" else {}
    policy = cls(cls.config_class(**kw, **task_fields())).eval()
    policy.fit_normalizers(torch.randn(64, 2, 20) * 2.0, torch.rand(64, 16, 7) * 2.0 - 1.0)
    return policy


@pytest.fixture(scope="module")
def dkoopman_file(tmp_path_factory) -> str:
    return str(export_policy(_policy("dkoopman"), tmp_path_factory.mktemp("onnx") / "policy.onnx"))


def _rewrite(src: str, dst, edit) -> str:
    model = onnx.load(src)
    edit(model)
    onnx.save(model, str(dst))
    return str(dst)


# -- file validation ------------------------------------------------------------------------------------
def test_missing_file(tmp_path) -> None:
    with pytest.raises(ModelLoadError, match="no such file"):
        OnnxPolicy(tmp_path / "absent.onnx")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_bytes(damage: str, dkoopman_file: str, tmp_path) -> None:
    data = Path(dkoopman_file).read_bytes()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(data[: len(data) // 3] if damage == "truncated" else b"\x08\x07not an onnx model" * 50)
    with pytest.raises(ModelLoadError, match="cannot be opened as an ONNX model"):
        OnnxPolicy(bad)


def test_missing_metadata_key(dkoopman_file: str, tmp_path) -> None:
    def drop(model: onnx.ModelProto) -> None:
        keep = [p for p in model.metadata_props if p.key != "obs_low"]
        del model.metadata_props[:]
        model.metadata_props.extend(keep)

    with pytest.raises(ModelLoadError, match="metadata lacks obs_low"):
        OnnxPolicy(_rewrite(dkoopman_file, tmp_path / "m.onnx", drop))


def _set_meta(model: onnx.ModelProto, key: str, value) -> None:
    keep = [p for p in model.metadata_props if p.key != key]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)
    if value is not None:
        model.metadata_props.add(key=key, value=json.dumps(value))


def test_a_file_without_its_contract_is_refused_with_the_fix(dkoopman_file: str, tmp_path) -> None:
    with pytest.raises(ModelLoadError, match=r"no observation and action contract.*koopman-distill export "
                                             r"--checkpoint DIR"):
        OnnxPolicy(_rewrite(dkoopman_file, tmp_path / "old.onnx", lambda m: _set_meta(m, "contract", None)))
    contract = OnnxPolicy(dkoopman_file).metadata.contract
    assert contract.task == "gen3_reach_obstacle" and contract.action_joints == tuple(f"joint_{i}" for i in
                                                                                     range(1, 8))
    other = json.loads(json.dumps(contract.to_dict()))
    other["control_dt"] = 0.05
    with pytest.raises(ModelLoadError, match=r"control_dt 0\.05 s, the model acts every 0\.1 s"):
        OnnxPolicy(_rewrite(dkoopman_file, tmp_path / "dt.onnx", lambda m: _set_meta(m, "contract", other)))
    other = json.loads(json.dumps(contract.to_dict()))
    other["observation"] = other["observation"][:2]
    with pytest.raises(ModelLoadError, match="its observation names"):
        OnnxPolicy(_rewrite(dkoopman_file, tmp_path / "obs.onnx", lambda m: _set_meta(m, "contract", other)))


def test_runtime_imports_no_torch() -> None:
    """The serving modules import where torch, diffusers, onnx and safetensors.torch cannot be imported."""
    prelude = ("import sys\n"
               "class Block:\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name.partition('.')[0] in ('torch', 'diffusers', 'onnx') or name == 'safetensors.torch':\n"
               "            raise ImportError(name)\n"
               "sys.meta_path.insert(0, Block())\n"
               "import koopman_policy, koopman_policy.onnx_policy, koopman_policy.loader, koopman_policy.catalog\n"
               "import koopman_policy.contract, koopman_policy.onnx_format, koopman_policy.checkpoint\n"
               "print(sorted(m for m in sys.modules if m.partition('.')[0] in ('torch', 'onnx')))\n")
    out = subprocess.run([sys.executable, "-c", prelude], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_shapes_must_match_metadata(dkoopman_file: str, tmp_path) -> None:
    def lie(model: onnx.ModelProto) -> None:
        for p in model.metadata_props:
            if p.key == "horizon":
                p.value = json.dumps(8)
            if p.key == "n_action_steps":
                p.value = json.dumps(4)

    with pytest.raises(ModelLoadError, match="'noise' has shape"):
        OnnxPolicy(_rewrite(dkoopman_file, tmp_path / "s.onnx", lie))


def test_sha256_must_match(dkoopman_file: str) -> None:
    good = file_sha256(dkoopman_file)
    assert OnnxPolicy(dkoopman_file, expected_sha256=good.upper()).metadata.file_sha256 == good
    with pytest.raises(ModelLoadError, match="does not match the expected"):
        OnnxPolicy(dkoopman_file, expected_sha256="0" * 64)


def test_the_runtime_follows_the_metadata_kind(tmp_path, dkoopman_file: str) -> None:
    den = export_teacher_denoiser(_policy("teacher"), tmp_path / "denoiser.onnx")
    with pytest.raises(ModelLoadError, match=r"holds a 'denoiser' graph.*load_onnx"):
        OnnxPolicy(den)
    with pytest.raises(ModelLoadError, match="holds a 'policy' graph"):
        OnnxDenoiserLoop(dkoopman_file)
    loop = load_onnx(den, sampler="ddim", num_inference_steps=4)
    assert isinstance(loop, OnnxDenoiserLoop) and loop.num_inference_steps == 4 and loop.image_size is None
    assert isinstance(load_onnx(dkoopman_file), OnnxPolicy)
    bad = _rewrite(dkoopman_file, tmp_path / "kind.onnx", lambda m: _set_meta(m, "kind", "sampler"))
    with pytest.raises(ModelLoadError, match="kind 'sampler' is not one of policy, denoiser"):
        load_onnx(bad)


# -- runtime --------------------------------------------------------------------------------------------
def test_provider_choice_and_session_options(dkoopman_file: str) -> None:
    policy = OnnxPolicy(dkoopman_file)
    listed = ort.get_available_providers()
    assert policy.provider in listed
    assert policy.session.get_providers()[0] == policy.provider
    gpu_listed = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in listed]
    if policy.provider == "CPUExecutionProvider":  # every listed GPU provider was tried and explained
        assert all(any(r.startswith(p) for r in policy.fallback_reasons) for p in gpu_listed)
    opts = policy.session.get_session_options()
    assert opts.intra_op_num_threads == 1 and opts.inter_op_num_threads == 1
    assert opts.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    cpu = OnnxPolicy(dkoopman_file, providers=["CPUExecutionProvider"], intra_op_threads=2)
    assert cpu.provider == "CPUExecutionProvider" and cpu.fallback_reasons == []
    assert cpu.session.get_session_options().intra_op_num_threads == 2
    with pytest.raises(ValueError, match="intra_op_threads"):
        OnnxPolicy(dkoopman_file, intra_op_threads=0)


def test_unusable_gpu_providers_are_probed_quietly(dkoopman_file: str, monkeypatch, capfd) -> None:
    """A GPU build without its libraries: the probe's failure reaches `logging` (the fallback reasons), not ORT's
    own error lines and "EP Error" banner on the terminal."""
    monkeypatch.setattr(onnx_policy, "_UNUSABLE_PROVIDERS", {})
    capfd.readouterr()
    policy = OnnxPolicy(dkoopman_file)
    out, err = capfd.readouterr()
    assert "EP Error" not in out and "EP Error" not in err and "Failed to load library" not in err
    listed = ort.get_available_providers()
    gpu_listed = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in listed]
    if policy.provider == "CPUExecutionProvider":
        assert len(policy.fallback_reasons) == len(gpu_listed)


def test_input_validation(dkoopman_file: str) -> None:
    policy = OnnxPolicy(dkoopman_file)
    ok = np.zeros((2, 20), np.float32)
    for bad, msg in ((np.zeros((3, 20)), "shape"), (np.zeros((2, 19)), "shape"), (np.zeros(20), "shape"),
                     (np.zeros((1, 1, 2, 20)), "shape")):
        with pytest.raises(ValueError, match=msg):
            policy.predict_action(bad)
    for value in (np.nan, np.inf, -np.inf):
        bad = ok.copy()
        bad[1, 3] = value
        with pytest.raises(ValueError, match="NaN or inf"):
            policy.predict_action(bad)
    with pytest.raises(ValueError, match="noise must have shape"):
        policy.predict_action(ok, np.zeros((8, 7)))
    with pytest.raises(ValueError, match="noise contains NaN"):
        policy.predict_action(ok, np.full((16, 7), np.nan))
    with pytest.raises(TypeError, match="takes obs"):
        policy.predict_action(np.zeros((2, 64, 64, 3)), ok, np.zeros((16, 7)))  # a frame history for a state policy
    np.testing.assert_array_equal(policy.predict_action(ok, np.zeros((16, 7), np.float32)),
                                  policy.predict_action(ok, noise=np.zeros((16, 7), np.float32)))


def test_seeded_noise_and_returned_arrays_are_owned(dkoopman_file: str) -> None:
    obs = np.random.default_rng(0).normal(size=(2, 20)).astype(np.float32)
    a, b, c = (OnnxPolicy(dkoopman_file, seed=s) for s in (3, 3, 4))
    first = a.predict_action(obs)
    kept = first.copy()
    second = a.predict_action(obs)
    np.testing.assert_array_equal(first, kept)  # the next call does not overwrite a returned chunk
    assert not np.array_equal(first, second)  # fresh noise per call
    np.testing.assert_array_equal(first, b.predict_action(obs))
    assert not np.array_equal(first, c.predict_action(obs))
    assert first.dtype == np.float32 and isinstance(a.last_ood_score, float)


def test_select_action_queue_and_safe_state(dkoopman_file: str) -> None:
    policy = OnnxPolicy(dkoopman_file, seed=1)
    reference = OnnxPolicy(dkoopman_file, seed=1)
    obs = [np.full(20, 0.1 * i, np.float32) for i in range(12)]
    chunk = reference.predict_action(np.stack([obs[0], obs[0]]))
    got = [policy.select_action(obs[i]) for i in range(8)]
    np.testing.assert_allclose(np.stack(got), chunk[1:9], atol=1e-6)
    with pytest.raises(ValueError, match="NaN"):
        policy.select_action(np.full(20, np.nan, np.float32))
    assert len(policy._queues["obs"]) == 2 and np.isfinite(np.stack(policy._queues["obs"])).all()
    nxt = reference.predict_action(np.stack([obs[7], obs[8]]))
    np.testing.assert_allclose(policy.select_action(obs[8]), nxt[1], atol=1e-6)  # replans from the history
    policy.reset()
    assert not policy._action_queue and policy.last_ood_score is None


def test_ood_threshold_flag(tmp_path) -> None:
    path = export_policy(_policy("kdm"), tmp_path / "kdm.onnx", {"ood_threshold": 1e-9})
    policy = OnnxPolicy(path)
    assert policy.ood_exceeded is None
    policy.predict_action(np.zeros((2, 20), np.float32))
    assert policy.last_ood_score > 0 and policy.ood_exceeded is True
