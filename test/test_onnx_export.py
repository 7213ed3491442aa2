"""ONNX export: graph interface, metadata (the contract among it), and ONNX Runtime vs PyTorch parity for every
method."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import onnx
import pytest
import torch
from policy_fields import task_fields

from koopman_policy.checkpoint import WEIGHTS, save_policy
from koopman_policy.contract import Contract, ContractError
from koopman_policy.onnx_export import (
    OPSET,
    PARITY_TOL,
    check_parity,
    export_checkpoint,
    export_policy,
    export_teacher_denoiser,
    file_sha256,
    read_metadata,
    state_dict_sha256,
)
from koopman_policy.onnx_format import POLICY_KEYS, SCHEDULER_KEYS
from koopman_policy.onnx_policy import OnnxDenoiserLoop, OnnxPolicy
from koopman_policy.registry import POLICIES

TOL = 1e-4
N = 1000


def make_policy(method: str, seed: int = 0):
    """A randomly initialised policy (default size; a narrower U-Net for the teacher) with fitted,
    non-trivial normalisers, including one constant observation dimension."""
    torch.manual_seed(seed)
    cls = POLICIES[method]
    kw = {"down_dims": (16, 32), "step_embed_dim": 16} if method == "teacher" else {}
    policy = cls(cls.config_class(**kw, **task_fields())).eval()
    obs = torch.randn(256, 2, 20) * torch.linspace(0.1, 3.0, 20) + torch.linspace(-1.0, 2.0, 20)
    obs[..., 19] = 0.4  # fixed pillar height: a constant dimension
    action = torch.rand(256, 16, 7) * 3.0 - 1.5
    policy.fit_normalizers(obs, action)
    return policy


def random_inputs(policy, n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    low, high = policy.obs_normalizer.bounds()
    obs = low + torch.rand((n, 2, 20), generator=gen) * (high - low)
    noise = torch.randn((n, 16, 7), generator=gen)
    return obs, noise


@pytest.mark.parametrize("method", sorted(POLICIES))
def test_policy_parity_and_interface(method: str, tmp_path) -> None:
    policy = make_policy(method)
    path = export_policy(policy, tmp_path / "policy.onnx")
    model = onnx.load(str(path))
    assert model.opset_import[0].version >= OPSET >= 17
    assert [i.name for i in model.graph.input] == ["obs", "noise"]
    assert [o.name for o in model.graph.output] == ["action", "ood_score"]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    meta = read_metadata(path)
    assert set(POLICY_KEYS) <= set(meta)
    assert meta["method"] == method and meta["weights_sha256"] == state_dict_sha256(policy)
    assert meta["inputs"] == ["obs", "noise"] and meta["contract"] == policy.config.contract

    runtime = OnnxPolicy(path)
    obs, noise = random_inputs(policy, N)
    reference = policy
    if method == "teacher":  # policy.onnx is the teacher's DDIM-k, deterministic given the noise
        assert meta["sampler"] == "ddim"
        reference = copy.deepcopy(policy)
        reference.config = dataclasses.replace(reference.config, sampler="ddim",
                                               num_inference_steps=meta["num_inference_steps"])
    with torch.no_grad():
        want_action, want_ood = (t.numpy() for t in reference.export_module()(obs, noise))
        assert np.abs(reference.predict_action(obs[:50], noise[:50]).numpy() - want_action[:50]).max() < TOL
    got = runtime.predict_action(obs.numpy(), noise.numpy())
    assert got.shape == (N, 16, 7)
    assert np.abs(got - want_action).max() < TOL
    assert np.abs(runtime.last_ood_score - want_ood).max() < TOL * max(1.0, float(np.abs(want_ood).max()))
    # Batch 1 goes through the IOBinding path: same numbers.
    one = runtime.predict_action(obs[0].numpy(), noise[0].numpy())
    assert one.shape == (16, 7) and np.abs(one - want_action[0]).max() < TOL
    assert isinstance(runtime.last_ood_score, float)
    report = check_parity(policy, path, samples=32)
    assert set(report.max_abs) == {"action", "ood_score"} and report.ok and report.worst <= PARITY_TOL


def test_unet_oneflow_parity(tmp_path) -> None:
    """The U-Net backbone exports as the MLP one does: same interface, same numbers."""
    torch.manual_seed(0)
    policy = make_policy("oneflow")
    unet = POLICIES["oneflow"](dataclasses.replace(policy.config, backbone="unet", down_dims=(16, 32),
                                                     step_embed_dim=16)).eval()
    unet.copy_normalizers(policy)
    runtime = OnnxPolicy(export_policy(unet, tmp_path / "policy.onnx"))
    obs, noise = random_inputs(unet, 200)
    with torch.no_grad():
        want = unet.predict_action(obs, noise).numpy()
    assert np.abs(runtime.predict_action(obs.numpy(), noise.numpy()) - want).max() < TOL


def test_bc_keeps_an_unused_noise_input(tmp_path) -> None:
    policy = make_policy("bc")
    path = export_policy(policy, tmp_path / "bc.onnx")
    model = onnx.load(str(path))
    noise_in = next(i for i in model.graph.input if i.name == "noise")
    dims = [d.dim_param or d.dim_value for d in noise_in.type.tensor_type.shape.dim]
    assert dims == ["batch", 16, 7]
    assert not any("noise" in node.input for node in model.graph.node)  # declared, read by nothing
    runtime = OnnxPolicy(path)
    obs = np.zeros((2, 20), np.float32)
    a = runtime.predict_action(obs, np.zeros((16, 7), np.float32))
    b = runtime.predict_action(obs, np.full((16, 7), 3.0, np.float32))
    np.testing.assert_array_equal(a, b)


def test_teacher_denoiser_parity(tmp_path) -> None:
    policy = make_policy("teacher")
    path = export_teacher_denoiser(policy, tmp_path / "denoiser.onnx")
    meta = read_metadata(path)
    assert set(SCHEDULER_KEYS) <= set(meta) and meta["kind"] == "denoiser"
    assert meta["beta_schedule"] == "squaredcos_cap_v2" and meta["num_train_timesteps"] == 100
    loop = OnnxDenoiserLoop(path)
    obs, sample = random_inputs(policy, N, seed=3)
    t = torch.randint(0, 100, (N,), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = policy.denoiser_module()(sample, t, obs).numpy()
    got = loop.eps(sample.numpy(), t.numpy(), obs.numpy())
    assert np.abs(got - want).max() < TOL
    np.testing.assert_allclose(loop.scheduler.acp, policy.ddpm.alphas_cumprod.numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_numpy_denoiser_loop_matches_torch_teacher(sampler: str, tmp_path) -> None:
    policy = make_policy("teacher")
    path = export_teacher_denoiser(policy, tmp_path / "denoiser.onnx")
    loop = OnnxDenoiserLoop(path, sampler=sampler, num_inference_steps=10)
    obs, noise = random_inputs(policy, 4, seed=5)
    obs_n = policy.obs_normalizer.normalize(obs).flatten(1)
    with torch.no_grad():
        if sampler == "ddim":
            x0 = policy.ddim_trajectory(obs_n, noise, 10).states[:, -1]
            step_noise = None
        else:  # diffusers draws one noise per step with t > 0 from the generator, in order
            x0 = policy.ddpm_sample(obs_n, noise, generator=torch.Generator().manual_seed(7))
            gen = torch.Generator().manual_seed(7)
            step_noise = np.stack([torch.randn(noise.shape, generator=gen).numpy() for _ in range(99)])
    want = policy.action_normalizer.unnormalize(x0).numpy()
    got = loop.predict_action(obs.numpy(), noise.numpy(), step_noise=step_noise)
    assert np.abs(got - want).max() < TOL


def test_metadata_extra_and_checkpoint_provenance(tmp_path) -> None:
    policy = make_policy("dkoopman")
    lower, upper = [-3.0] * 7, [3.0] * 7
    ckpt = save_policy(policy, tmp_path / "ckpt", extra={"card": {"commit": "abc123"}})
    result = export_checkpoint(ckpt, ood_threshold=0.5, parity_samples=200,
                               metadata_extra={"action_limit_low": lower, "action_limit_high": upper})
    assert result.policy_path == ckpt / "policy.onnx" and result.parity is not None and result.parity.ok
    meta = OnnxPolicy(result.policy_path, expected_sha256=result.policy_sha256).metadata
    assert meta.weights_sha256 == file_sha256(ckpt / WEIGHTS)
    assert meta.training_commit == "abc123" and meta.ood_threshold == 0.5
    np.testing.assert_array_equal(meta.action_limit_low, lower)
    low, high = policy.action_normalizer.bounds()
    np.testing.assert_allclose(meta.action_low, low.numpy(), atol=1e-6)
    np.testing.assert_allclose(meta.action_high, high.numpy(), atol=1e-6)
    assert json.loads(json.dumps(meta.config))["horizon"] == 16
    with pytest.raises(ValueError, match="horizon"):
        export_policy(policy, tmp_path / "x.onnx", {"horizon": 8})
    with pytest.raises(ValueError, match="action_limit_low"):
        export_policy(policy, tmp_path / "x.onnx", {"action_limit_low": [0.0]})
    with pytest.raises(ValueError, match="contract"):
        export_policy(policy, tmp_path / "x.onnx", {"contract": {}})


def test_every_export_carries_a_contract_that_fits(tmp_path) -> None:
    """The contract comes from the config or is given; one that does not describe the model is refused."""
    policy = make_policy("bc")
    pusht = Contract.from_dict(task_fields("pusht")["contract"])
    with pytest.raises(ContractError, match="its observation names"):
        export_policy(policy, tmp_path / "x.onnx", contract=pusht)
    legacy = POLICIES["bc"](dataclasses.replace(policy.config, contract=None))
    with pytest.raises(ContractError, match="records no observation and action contract"):
        export_policy(legacy, tmp_path / "x.onnx")
    given = Contract.from_dict(policy.config.contract)
    path = export_policy(legacy, tmp_path / "given.onnx", contract=given)
    assert OnnxPolicy(path).metadata.contract == given
    den = export_teacher_denoiser(make_policy("teacher"), tmp_path / "denoiser.onnx")
    assert Contract.from_dict(read_metadata(den)["contract"]) == given
