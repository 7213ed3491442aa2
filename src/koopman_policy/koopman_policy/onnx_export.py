"""Export policies to self-describing ONNX files for the serving runtime, with one parity check.

A policy file's graph inputs are the policy's observation inputs and the noise, the batch axis dynamic:
``obs`` ``(B, n_obs_steps, obs_dim)`` for a state policy, or for a camera policy ``image``
``(B, n_obs_steps, H, W, 3)`` (float32 RGB in [0, 1]) and ``state`` ``(B, n_obs_steps, obs_dim)``; then ``noise``
``(B, horizon, action_dim)`` (standard normal). Observations are in raw units. Outputs: ``action``
``(B, horizon, action_dim)`` in raw units and ``ood_score`` ``(B,)``. Both graphs are traced from the policy's
``export_module()`` (:class:`koopman_policy.base.ExportModule`, :class:`~koopman_policy.base.ImageExportModule`)
on its ``export_example_inputs()``. Everything the runtime needs beyond the graph travels in ONNX
``metadata_props`` (:data:`koopman_policy.onnx_format.POLICY_KEYS`), among it the observation and action
contract, checked against the file's names and rate, so a deployed file never needs the training code or the
checkpoint beside it.

``noise`` is a graph input for every method: the TorchScript exporter drops inputs that no node reads
(``bc`` ignores its noise), so :func:`export_policy` re-declares a dropped input as an unused graph input after
export. The runtime therefore always feeds the inputs the metadata names.

The teacher has no one-step graph. Its ``policy.onnx`` is DDIM-k (default 10, eta = 0) unrolled into one
graph, deterministic given the noise, and :func:`export_teacher_denoiser` writes the U-Net alone
(``sample``, ``timestep``, ``obs`` -> ``eps``) with the scheduler settings, for a numpy loop that runs
DDIM-k or DDPM without torch (:class:`koopman_policy.onnx_policy.OnnxDenoiserLoop`).

Parity (:func:`check_parity`): ONNX Runtime against ``export_module()`` on the same random inputs, every graph
input drawn by its name (observations over and 10 % beyond the normaliser's range, frames uniform in [0, 1],
standard normal noise); the error is the largest absolute difference of the action chunk and of the OOD score,
in raw units, for state and camera policies alike, against :data:`PARITY_TOL`.

The TorchScript-based exporter is used (``dynamo=False``): it needs no extra packages and traces these
fixed-shape MLPs, CNNs and the U-Net exactly.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from safetensors.torch import save as safetensors_bytes

from koopman_policy.base import BasePolicy
from koopman_policy.checkpoint import WEIGHTS, load_extra, load_policy
from koopman_policy.contract import Contract, ContractError, consistent
from koopman_policy.onnx_format import (
    DENOISER_INPUTS,
    DENOISER_OUTPUTS,
    FORMAT_VERSION,
    OBS_LAYOUT,
    POLICY_OUTPUTS,
    SCHEDULER_KEYS,
    file_sha256,
    read_metadata,
)
from koopman_policy.teacher import DiffusionPolicy

OPSET = 17
#: Largest ONNX Runtime vs PyTorch difference accepted, in the action's and the OOD score's raw units. The
#: shipped Gen3 graphs agree to 1e-6 rad; on Push-T, whose chunks reach 1,700 px for observations beyond the
#: training range, float32 rounding alone makes 1e-3 px. An export error (a wrong normaliser, a dropped input,
#: a sampler other than the one named) moves either by far more.
PARITY_TOL = 5e-3
DEFAULT_TEACHER_STEPS = 10

#: Keys metadata_extra may not override: they describe the graph itself.
_PROTECTED = frozenset(
    {"format_version", "kind", "method", "inputs", "obs_dim", "action_dim", "horizon", "n_obs_steps", "obs_low",
     "obs_high", "action_low", "action_high", "weights_sha256", "uses_noise", "config", "contract",
     *SCHEDULER_KEYS}
)


@dataclass
class ParityReport:
    """Largest ONNX Runtime vs PyTorch differences (raw units) over ``samples`` random inputs."""

    samples: int
    max_abs: dict[str, float]

    @property
    def worst(self) -> float:
        return max(self.max_abs.values())

    @property
    def ok(self) -> bool:
        return self.worst <= PARITY_TOL


def state_dict_sha256(policy: torch.nn.Module) -> str:
    """Hash of the weights as a checkpoint would store them (safetensors bytes are deterministic)."""
    state = {k: v.detach().cpu().contiguous() for k, v in policy.state_dict().items()}
    return hashlib.sha256(safetensors_bytes(state)).hexdigest()


def policy_contract(policy: BasePolicy) -> Contract:
    """The contract recorded in the policy's config; ContractError when there is none (a checkpoint trained
    before contracts: ``koopman-distill export`` gives the built-in task's)."""
    if policy.config.contract is None:
        raise ContractError(f"{policy.method}: the config records no observation and action contract; pass one "
                            "(koopman-distill export takes the built-in task's for checkpoints made before "
                            "contracts)")
    return Contract.from_dict(policy.config.contract, f"{policy.method} config.contract")


def _check_contract(policy: BasePolicy, contract: Contract, meta: dict[str, Any]) -> None:
    """The contract must describe the exported vectors, rate and (for a camera policy) frames exactly."""
    c = policy.config
    for key, dim in (("obs_names", c.obs_dim), ("action_names", c.action_dim)):
        if len(meta[key]) != dim:
            raise ValueError(f"{policy.method}: config {key} has {len(meta[key])} names for dimension {dim}")
    consistent(contract, meta["obs_names"], meta["action_names"], c.control_dt)
    feature = contract.image
    if "image" not in meta["inputs"]:
        if feature is not None:
            raise ContractError(f"contract of task {contract.task!r}: image feature {feature.name!r}, but "
                                f"{policy.method} observes no image")
        return
    size = (meta["image_height"], meta["image_width"])
    if feature is None or (feature.image.height, feature.image.width) != size:
        got = "no image feature" if feature is None else f"frames {feature.image.height}x{feature.image.width}"
        raise ContractError(f"contract of task {contract.task!r}: {got}, {policy.method} sees {size[0]}x{size[1]}")


def policy_metadata(policy: BasePolicy, metadata_extra: dict[str, Any] | None = None,
                    contract: Contract | None = None) -> dict[str, Any]:
    """The metadata dictionary (decoded values) :func:`export_policy` writes for ``policy``; ``contract``
    defaults to the config's."""
    c = policy.config
    contract = contract or policy_contract(policy)
    obs_low, obs_high = (t.detach().cpu().float().tolist() for t in policy.obs_normalizer.bounds())
    act_low, act_high = (t.detach().cpu().float().tolist() for t in policy.action_normalizer.bounds())
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "kind": "policy",
        "method": policy.method,
        "inputs": list(policy.export_example_inputs(1)),
        "obs_dim": c.obs_dim,
        "action_dim": c.action_dim,
        "horizon": c.horizon,
        "n_obs_steps": c.n_obs_steps,
        "n_action_steps": c.n_action_steps,
        "control_dt": c.control_dt,
        "obs_layout": OBS_LAYOUT,
        "obs_names": list(c.obs_names),
        "action_names": list(c.action_names),
        "obs_low": obs_low,
        "obs_high": obs_high,
        "action_low": act_low,
        "action_high": act_high,
        # Without joint limits, the demonstrated range is the only limit the policy can vouch for.
        "action_limit_low": act_low,
        "action_limit_high": act_high,
        "training_commit": "unknown",
        "weights_sha256": state_dict_sha256(policy),
        "uses_noise": bool(policy.uses_noise),
        "config": json.loads(json.dumps(c.to_dict())),
        "contract": contract.to_dict(),
    }
    if getattr(policy, "image_inputs", False):
        meta.update(policy.image_metadata())  # type: ignore[attr-defined]
    for key, value in (metadata_extra or {}).items():
        if key in _PROTECTED:
            raise ValueError(f"metadata_extra may not override {key!r}: it describes the exported graph")
        meta[key] = value
    for key in ("action_limit_low", "action_limit_high"):
        if len(meta[key]) != c.action_dim:
            raise ValueError(f"{key} must have {c.action_dim} values, got {len(meta[key])}")
    if meta.get("ood_threshold") is None:
        meta.pop("ood_threshold", None)
    else:
        meta["ood_threshold"] = float(meta["ood_threshold"])
    _check_contract(policy, contract, meta)
    return meta


def _write_metadata(path: Path, meta: dict[str, Any], required_inputs: tuple[str, ...], shapes: dict) -> None:
    """Attach metadata, re-declare inputs the tracer dropped, check the model, save."""
    model = onnx.load(str(path))
    present = {i.name for i in model.graph.input}
    for name in required_inputs:
        if name not in present:
            # An unused graph input is valid ONNX; ORT accepts and ignores it.
            model.graph.input.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, shapes[name]))
    order = {name: i for i, name in enumerate(required_inputs)}
    inputs = sorted(model.graph.input, key=lambda v: order.get(v.name, len(order)))
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    del model.metadata_props[:]
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=json.dumps(value))
    model.doc_string = f"koopman_control {meta['kind']} ({meta['method']})"
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Evaluate in eval mode without leaving the caller's (possibly training) policy changed."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield module
    finally:
        module.train(was_training)


def _trace(module: torch.nn.Module, args: tuple, path: Path, inputs, outputs, dynamic: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), _eval_mode(module):
        warnings.simplefilter("ignore")  # tracer and deprecation chatter; parity is checked instead
        torch.onnx.export(
            module, args, str(path), dynamo=False, opset_version=OPSET, input_names=list(inputs),
            output_names=list(outputs), dynamic_axes=dynamic, do_constant_folding=True,
        )


def _teacher_as_ddim(policy: BasePolicy, steps: int) -> BasePolicy:
    """A copy of the teacher that samples with deterministic DDIM-k, so its graph has no random ops."""
    twin = copy.deepcopy(policy)
    twin.config = dataclasses.replace(policy.config, sampler="ddim", num_inference_steps=steps)
    return twin


def export_policy(
    policy: BasePolicy,
    path: str | Path,
    metadata_extra: dict[str, Any] | None = None,
    *,
    contract: Contract | None = None,
    teacher_steps: int = DEFAULT_TEACHER_STEPS,
) -> Path:
    """Write ``policy.export_module()`` as ONNX with metadata; returns the path.

    ``metadata_extra`` adds or overrides non-structural keys: ``training_commit``, ``ood_threshold``,
    ``action_limit_low``/``action_limit_high`` (joint limits); ``weights_sha256`` is computed here unless given
    (:func:`export_checkpoint` gives the checkpoint file's). ``contract`` (default: the config's) must match the
    policy's names, rate and frames. A teacher (state or camera) is exported as DDIM-``teacher_steps``.
    """
    path = Path(path)
    extra = dict(metadata_extra or {})
    sha = extra.pop("weights_sha256", None)
    meta = policy_metadata(policy, extra, contract)
    if sha is not None:
        meta["weights_sha256"] = sha
    if isinstance(policy, DiffusionPolicy):
        policy = _teacher_as_ddim(policy, teacher_steps)
        meta.update(sampler="ddim", num_inference_steps=teacher_steps)
    example = policy.export_example_inputs(2)
    names = tuple(example)
    dynamic = {name: {0: "batch"} for name in (*names, *POLICY_OUTPUTS)}
    _trace(policy.export_module(), tuple(example.values()), path, names, POLICY_OUTPUTS, dynamic)
    _write_metadata(path, meta, names, {k: ["batch", *v.shape[1:]] for k, v in example.items()})
    return path


def export_teacher_denoiser(
    policy: BasePolicy, path: str | Path, metadata_extra: dict[str, Any] | None = None, *,
    contract: Contract | None = None,
) -> Path:
    """Write the teacher's U-Net (``sample`` normalised, ``timestep`` int64, ``obs`` raw -> ``eps``).

    The scheduler settings go into the metadata so that DDIM-k and DDPM run from numpy alone.
    """
    if policy.method != "teacher":
        raise ValueError(f"only the state teacher has a denoiser file, got method {policy.method!r}")
    path = Path(path)
    extra = dict(metadata_extra or {})
    sha = extra.pop("weights_sha256", None)
    meta = policy_metadata(policy, extra, contract)
    if sha is not None:
        meta["weights_sha256"] = sha
    sched = policy.ddim.config  # type: ignore[attr-defined]
    meta.update(
        kind="denoiser",
        inputs=list(DENOISER_INPUTS),
        num_train_timesteps=int(sched.num_train_timesteps),
        beta_schedule=str(sched.beta_schedule),
        beta_start=float(sched.beta_start),
        beta_end=float(sched.beta_end),
        clip_sample=bool(sched.clip_sample),
        clip_sample_range=float(sched.clip_sample_range),
        prediction_type=str(sched.prediction_type),
        set_alpha_to_one=bool(sched.set_alpha_to_one),
        steps_offset=int(sched.steps_offset),
        timestep_spacing=str(sched.timestep_spacing),
        sampler=policy.config.sampler,
        num_inference_steps=int(policy.config.num_inference_steps),
    )
    c = policy.config
    args = (torch.zeros(2, c.horizon, c.action_dim), torch.zeros(2, dtype=torch.int64),
            torch.zeros(2, c.n_obs_steps, c.obs_dim))
    dynamic = {name: {0: "batch"} for name in (*DENOISER_INPUTS, *DENOISER_OUTPUTS)}
    _trace(policy.denoiser_module(), args, path, DENOISER_INPUTS, DENOISER_OUTPUTS, dynamic)
    _write_metadata(path, meta, DENOISER_INPUTS, {})
    return path


# -- parity ---------------------------------------------------------------------------------------------
def _random_obs(policy: BasePolicy, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Raw observations spread over (and 10 % beyond) the normaliser's range."""
    low, high = policy.obs_normalizer.bounds()
    return low + (torch.rand(shape, generator=gen) * 1.2 - 0.1) * (high - low)


def random_inputs(policy: BasePolicy, n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """``n`` random values of every graph input, by name: observations (``obs``, ``state``) from
    :func:`_random_obs`, frames uniform in [0, 1], standard normal noise."""
    out = {}
    for name, example in policy.export_example_inputs(n).items():
        shape = tuple(example.shape)
        if name == "image":
            out[name] = torch.rand(shape, generator=gen)
        elif name == "noise":
            out[name] = torch.randn(shape, generator=gen)
        else:
            out[name] = _random_obs(policy, shape, gen)
    return out


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def check_parity(policy: BasePolicy, path: str | Path, samples: int = 1000, seed: int = 0,
                 batch: int = 100) -> ParityReport:
    """Run the exported policy and ``policy.export_module()`` on the same random inputs (module docstring)."""
    path = Path(path)
    if isinstance(policy, DiffusionPolicy):
        policy = _teacher_as_ddim(policy, int(read_metadata(path)["num_inference_steps"]))
    module = policy.export_module()
    session = _session(path)
    gen = torch.Generator().manual_seed(seed)
    worst = dict.fromkeys(POLICY_OUTPUTS, 0.0)
    for start in range(0, samples, batch):
        inputs = random_inputs(policy, min(batch, samples - start), gen)
        with _eval_mode(module):
            ref = [t.numpy() for t in module(*inputs.values())]
        out = session.run(list(POLICY_OUTPUTS), {k: v.numpy() for k, v in inputs.items()})
        for key, got, want in zip(POLICY_OUTPUTS, out, ref, strict=True):
            worst[key] = max(worst[key], float(np.abs(got - want).max()))
    return ParityReport(samples, worst)


def check_denoiser_parity(policy: BasePolicy, path: str | Path, samples: int = 1000, seed: int = 0) -> ParityReport:
    """The exported U-Net against the torch one on random samples, timesteps and observations."""
    module = policy.denoiser_module()
    session = _session(Path(path))
    gen = torch.Generator().manual_seed(seed)
    c = policy.config
    obs = _random_obs(policy, (samples, c.n_obs_steps, c.obs_dim), gen)
    sample = torch.randn((samples, c.horizon, c.action_dim), generator=gen)
    t = torch.randint(0, c.num_train_timesteps, (samples,), generator=gen)
    with _eval_mode(module):
        ref = module(sample, t, obs).numpy()
    (out,) = session.run(None, {"sample": sample.numpy(), "timestep": t.numpy(), "obs": obs.numpy()})
    return ParityReport(samples, {"eps": float(np.abs(out - ref).max())})


# -- checkpoints ----------------------------------------------------------------------------------------
@dataclass
class ExportResult:
    policy_path: Path
    policy_sha256: str
    parity: ParityReport | None
    contract: Contract
    denoiser_path: Path | None = None
    denoiser_sha256: str | None = None
    denoiser_parity: ParityReport | None = None


def _commit(extra: dict[str, Any]) -> str:
    card = extra.get("card") if isinstance(extra.get("card"), dict) else {}
    for source in (extra, card):
        for key in ("training_commit", "commit", "git_commit"):
            if isinstance(source.get(key), str) and source[key]:
                return source[key]
    return "unknown"


def export_checkpoint(
    directory: str | Path,
    out: str | Path | None = None,
    *,
    ood_threshold: float | None = None,
    metadata_extra: dict[str, Any] | None = None,
    parity_samples: int = 1000,
    teacher_steps: int = DEFAULT_TEACHER_STEPS,
    contract: Contract | None = None,
) -> ExportResult:
    """Export a checkpoint directory (``policy.onnx``; the teacher also ``denoiser.onnx``) and check parity.

    ``weights_sha256`` is the sha256 of the directory's ``model.safetensors``, the commit and (unless given)
    the OOD threshold come from the checkpoint's provenance, the contract (unless given) from its config.
    ``parity_samples = 0`` skips the parity check.
    """
    directory = Path(directory)
    policy = load_policy(directory)
    contract = contract or policy_contract(policy)
    provenance = load_extra(directory)
    extra = {"training_commit": _commit(provenance), **(metadata_extra or {})}
    extra["weights_sha256"] = file_sha256(directory / WEIGHTS)
    if ood_threshold is None:
        ood_threshold = provenance.get("ood_threshold")  # calibrated by `koopman-distill student`
    if ood_threshold is not None:
        extra["ood_threshold"] = float(ood_threshold)
    out = Path(out) if out is not None else directory / "policy.onnx"
    export_policy(policy, out, extra, contract=contract, teacher_steps=teacher_steps)
    parity = check_parity(policy, out, parity_samples) if parity_samples > 0 else None
    result = ExportResult(out, file_sha256(out), parity, contract)
    if policy.method == "teacher":
        den = out.with_name("denoiser.onnx")
        extra.pop("ood_threshold", None)
        export_teacher_denoiser(policy, den, extra, contract=contract)
        result.denoiser_path, result.denoiser_sha256 = den, file_sha256(den)
        if parity_samples > 0:
            result.denoiser_parity = check_denoiser_parity(policy, den, parity_samples)
    return result
