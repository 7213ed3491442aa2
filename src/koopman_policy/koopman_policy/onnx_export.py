"""Export policies to self-describing ONNX files for the serving runtime.

A policy file has inputs ``obs`` ``(B, n_obs_steps, obs_dim)`` and ``noise`` ``(B, horizon, action_dim)``
(both float32, raw observation units, standard-normal noise) and outputs ``action`` ``(B, horizon,
action_dim)`` in raw units and ``ood_score`` ``(B,)``; the batch axis is dynamic. Everything the runtime
needs beyond the graph travels in ONNX ``metadata_props`` as JSON-encoded values (see
:data:`POLICY_KEYS`), so a deployed file never needs the training code or the checkpoint beside it.

``noise`` is a graph input for every method: the TorchScript exporter drops inputs that no node reads
(``bc`` ignores its noise), so :func:`export_policy` re-declares a dropped ``noise`` as an unused graph
input after export. The runtime therefore always feeds the same two inputs.

The teacher has no one-step graph. Its ``policy.onnx`` is DDIM-k (default 10, eta = 0) unrolled into one
graph, deterministic given the noise, and :func:`export_teacher_denoiser` writes the U-Net alone
(``sample``, ``timestep``, ``obs`` -> ``eps``) with the scheduler settings, for a numpy loop that runs
DDIM-k or DDPM without torch (:class:`koopman_policy.onnx_policy.OnnxDenoiserLoop`).

The TorchScript-based exporter is used (``dynamo=False``): it needs no extra packages and traces these
fixed-shape MLPs and the U-Net exactly.
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

OPSET = 17
FORMAT_VERSION = 1
PARITY_TOL = 1e-4
DEFAULT_TEACHER_STEPS = 10

POLICY_INPUTS = ("obs", "noise")
POLICY_OUTPUTS = ("action", "ood_score")
DENOISER_INPUTS = ("sample", "timestep", "obs")
DENOISER_OUTPUTS = ("eps",)

#: Metadata every exported file carries (values JSON-encoded strings in ``metadata_props``).
POLICY_KEYS = (
    "format_version", "kind", "method", "obs_dim", "action_dim", "horizon", "n_obs_steps", "n_action_steps",
    "control_dt", "obs_layout", "obs_names", "action_names", "obs_low", "obs_high", "action_low",
    "action_high", "action_limit_low", "action_limit_high", "training_commit", "weights_sha256", "uses_noise",
    "config",
)
#: Added to a teacher denoiser's metadata: what a numpy DDIM/DDPM loop needs.
SCHEDULER_KEYS = (
    "num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "clip_sample", "clip_sample_range",
    "prediction_type", "set_alpha_to_one", "steps_offset", "timestep_spacing",
)
#: Keys metadata_extra may not override: they describe the graph itself.
_PROTECTED = frozenset(
    {"format_version", "kind", "method", "obs_dim", "action_dim", "horizon", "n_obs_steps", "obs_low", "obs_high",
     "action_low", "action_high", "weights_sha256", "uses_noise", "config", *SCHEDULER_KEYS}
)
OBS_LAYOUT = "(batch, n_obs_steps, obs_dim) float32, raw units, oldest observation first"


@dataclass
class ParityReport:
    """Largest ONNX Runtime vs PyTorch differences over ``samples`` random inputs."""

    samples: int
    max_abs: dict[str, float]

    @property
    def worst(self) -> float:
        return max(self.max_abs.values())

    @property
    def ok(self) -> bool:
        return self.worst <= PARITY_TOL


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def state_dict_sha256(policy: torch.nn.Module) -> str:
    """Hash of the weights as a checkpoint would store them (safetensors bytes are deterministic)."""
    state = {k: v.detach().cpu().contiguous() for k, v in policy.state_dict().items()}
    return hashlib.sha256(safetensors_bytes(state)).hexdigest()


def _names(names: list[str], dim: int, prefix: str) -> list[str]:
    return list(names) if len(names) == dim else [f"{prefix}_{i}" for i in range(dim)]


def policy_metadata(policy: BasePolicy, metadata_extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The metadata dictionary (decoded values) :func:`export_policy` writes for ``policy``."""
    c = policy.config
    obs_low, obs_high = (t.detach().cpu().float().tolist() for t in policy.obs_normalizer.bounds())
    act_low, act_high = (t.detach().cpu().float().tolist() for t in policy.action_normalizer.bounds())
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "kind": "policy",
        "method": policy.method,
        "obs_dim": c.obs_dim,
        "action_dim": c.action_dim,
        "horizon": c.horizon,
        "n_obs_steps": c.n_obs_steps,
        "n_action_steps": c.n_action_steps,
        "control_dt": c.control_dt,
        "obs_layout": OBS_LAYOUT,
        "obs_names": _names(c.obs_names, c.obs_dim, "obs"),
        "action_names": _names(c.action_names, c.action_dim, "action"),
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
    }
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
    teacher_steps: int = DEFAULT_TEACHER_STEPS,
) -> Path:
    """Write ``policy.export_module()`` as ONNX with metadata; returns the path.

    ``metadata_extra`` adds or overrides non-structural keys: ``training_commit``, ``ood_threshold``,
    ``action_limit_low``/``action_limit_high`` (joint limits), ``weights_sha256`` is computed here unless
    exporting through :func:`export_checkpoint`. The teacher is exported as DDIM-``teacher_steps``.
    Image policies get their three-input graph (:mod:`koopman_policy.vision_export`).
    """
    if getattr(policy, "image_inputs", False):
        from koopman_policy.vision_export import export_image_policy

        return export_image_policy(policy, path, metadata_extra, teacher_steps=teacher_steps)
    path = Path(path)
    extra = dict(metadata_extra or {})
    sha = extra.pop("weights_sha256", None)
    meta = policy_metadata(policy, extra)
    if sha is not None:
        meta["weights_sha256"] = sha
    if policy.method == "teacher":
        policy = _teacher_as_ddim(policy, teacher_steps)
        meta.update(sampler="ddim", num_inference_steps=teacher_steps)
    c = policy.config
    obs = torch.zeros(2, c.n_obs_steps, c.obs_dim)
    noise = torch.zeros(2, c.horizon, c.action_dim)
    dynamic = {name: {0: "batch"} for name in (*POLICY_INPUTS, *POLICY_OUTPUTS)}
    _trace(policy.export_module(), (obs, noise), path, POLICY_INPUTS, POLICY_OUTPUTS, dynamic)
    shapes = {"obs": ["batch", c.n_obs_steps, c.obs_dim], "noise": ["batch", c.horizon, c.action_dim]}
    _write_metadata(path, meta, POLICY_INPUTS, shapes)
    return path


def export_teacher_denoiser(
    policy: BasePolicy, path: str | Path, metadata_extra: dict[str, Any] | None = None
) -> Path:
    """Write the teacher's U-Net (``sample`` normalised, ``timestep`` int64, ``obs`` raw -> ``eps``).

    The scheduler settings go into the metadata so that DDIM-k and DDPM run from numpy alone.
    """
    if policy.method != "teacher":
        raise ValueError(f"only the teacher has a denoiser, got method {policy.method!r}")
    path = Path(path)
    extra = dict(metadata_extra or {})
    sha = extra.pop("weights_sha256", None)
    meta = policy_metadata(policy, extra)
    if sha is not None:
        meta["weights_sha256"] = sha
    sched = policy.ddim.config  # type: ignore[attr-defined]
    meta.update(
        kind="denoiser",
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


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Decoded ``metadata_props`` of an ONNX file (no session needed)."""
    model = onnx.load(str(path), load_external_data=False)
    return {p.key: json.loads(p.value) for p in model.metadata_props}


# -- parity ---------------------------------------------------------------------------------------------
def _random_obs(policy: BasePolicy, n: int, gen: torch.Generator) -> torch.Tensor:
    """Raw observations spread over (and a little beyond) the normaliser's range."""
    low, high = policy.obs_normalizer.bounds()
    u = torch.rand((n, policy.config.n_obs_steps, policy.config.obs_dim), generator=gen) * 1.2 - 0.1
    return low + u * (high - low)


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def check_parity(policy: BasePolicy, path: str | Path, samples: int = 1000, seed: int = 0,
                 batch: int = 1000) -> ParityReport:
    """Run the exported policy and ``policy.export_module()`` on the same random obs and noise."""
    if getattr(policy, "image_inputs", False):
        from koopman_policy.vision_export import check_image_parity

        return check_image_parity(policy, path, samples, seed)
    path = Path(path)
    meta = read_metadata(path)
    if policy.method == "teacher":
        policy = _teacher_as_ddim(policy, int(meta["num_inference_steps"]))
    module = policy.export_module()
    session = _session(path)
    gen = torch.Generator().manual_seed(seed)
    low, high = (t.numpy() for t in policy.action_normalizer.bounds())
    half_range = (high - low) / 2
    worst = {"action": 0.0, "ood_score": 0.0}
    for start in range(0, samples, batch):
        n = min(batch, samples - start)
        obs = _random_obs(policy, n, gen)
        noise = torch.randn((n, policy.config.horizon, policy.config.action_dim), generator=gen)
        with _eval_mode(module):
            ref = [t.numpy() for t in module(obs, noise)]
        out = session.run(list(POLICY_OUTPUTS), {"obs": obs.numpy(), "noise": noise.numpy()})
        # Actions are compared in the policy's normalised units ([-1, 1] over the training range), so the one
        # tolerance means the same for joint targets in rad and Push-T targets in px.
        act_err = float((np.abs(out[0] - ref[0]) / half_range).max())
        # The OOD score is a ratio that can be large: compare it relative to its own size.
        ood_err = float((np.abs(out[1] - ref[1]) / np.maximum(1.0, np.abs(ref[1]))).max())
        worst = {"action": max(worst["action"], act_err), "ood_score": max(worst["ood_score"], ood_err)}
    return ParityReport(samples, worst)


def check_denoiser_parity(policy: BasePolicy, path: str | Path, samples: int = 1000, seed: int = 0) -> ParityReport:
    """The exported U-Net against the torch one on random samples, timesteps and observations."""
    module = policy.denoiser_module()
    session = _session(Path(path))
    gen = torch.Generator().manual_seed(seed)
    c = policy.config
    obs = _random_obs(policy, samples, gen)
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
) -> ExportResult:
    """Export a checkpoint directory (``policy.onnx``; the teacher also ``denoiser.onnx``) and check parity.

    ``weights_sha256`` is the sha256 of the directory's ``model.safetensors``, the commit and (unless given)
    the OOD threshold come from the checkpoint's provenance. ``parity_samples = 0`` skips the parity check.
    """
    directory = Path(directory)
    policy = load_policy(directory)
    provenance = load_extra(directory)
    extra = {"training_commit": _commit(provenance), **(metadata_extra or {})}
    extra["weights_sha256"] = file_sha256(directory / WEIGHTS)
    if ood_threshold is None:
        ood_threshold = provenance.get("ood_threshold")  # calibrated by `koopman-distill student`
    if ood_threshold is not None:
        extra["ood_threshold"] = float(ood_threshold)
    out = Path(out) if out is not None else directory / "policy.onnx"
    export_policy(policy, out, extra, teacher_steps=teacher_steps)
    parity = check_parity(policy, out, parity_samples) if parity_samples > 0 else None
    result = ExportResult(out, file_sha256(out), parity)
    if policy.method == "teacher":
        den = out.with_name("denoiser.onnx")
        extra.pop("ood_threshold", None)
        export_teacher_denoiser(policy, den, extra)
        result.denoiser_path, result.denoiser_sha256 = den, file_sha256(den)
        if parity_samples > 0:
            result.denoiser_parity = check_denoiser_parity(policy, den, parity_samples)
    return result
