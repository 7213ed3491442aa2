"""Serve exported policies with ONNX Runtime and numpy alone: no torch, no diffusers, no ``onnx`` package.

:class:`OnnxPolicy` runs a one-step ``policy.onnx`` (a student, or the teacher's DDIM-k unrolled into one graph)
behind the torch policies' interface: ``reset()``, ``predict_action``, ``select_action`` with an action queue,
``metadata`` and ``last_ood_score``. It serves state policies (graph inputs ``obs``, ``noise``) and camera policies
(``image``, ``state``, ``noise``) alike: the metadata's ``inputs`` name the graph's inputs, and the observation
inputs among them are ``predict_action``'s positional arguments in that order, the noise optional after them.
:class:`OnnxDenoiserLoop` runs the teacher's exported U-Net inside a numpy DDIM-k or DDPM loop that replicates
diffusers' step arithmetic. :func:`load_onnx` opens a file once and picks the runtime from its metadata ``kind``.

Every file must carry its observation and action contract (:mod:`koopman_policy.contract`), consistent with
its names and rate; a file exported before contracts is refused with the command that re-exports it.

Design choices, each for the control loop:

* Provider: TensorRT, then CUDA, then CPU, each tried by creating a real session. onnxruntime-gpu lists
  the GPU providers even where their libraries or the device are missing and then silently runs on CPU;
  the active provider is read back from the session, and every skipped provider leaves a reason in
  ``fallback_reasons`` (also logged).
* One intra-op thread by default, one inter-op thread, sequential execution: these graphs are a few
  small matrix products, so a thread pool buys nothing and its spinning workers take cores away from the
  control loop and the ROS executor. Graph optimisation is fully on.
* Batch-1 calls run through an IOBinding onto pre-allocated numpy buffers. Measured on the 2-core AMD
  EPYC development VM (default dkoopman, random weights, one pinned core, 3000 calls, including the
  noise draw): ``session.run`` with reused numpy arrays p50 0.060 ms / p99 0.126 ms, IOBinding p50
  0.055 ms / p99 0.114 ms, ``run_with_ort_values`` p50 0.087 ms / p99 0.153 ms. IOBinding is kept.
  Larger batches use ``session.run``.
* Noise comes from a seeded ``numpy.random.Generator``; ``reset()`` does not reseed, so episodes differ.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import onnxruntime as ort

from koopman_policy.contract import Contract, ContractError, ImageSpec, consistent
from koopman_policy.onnx_format import (
    DENOISER_INPUTS,
    DENOISER_OUTPUTS,
    IMAGE_POLICY_INPUTS,
    KINDS,
    POLICY_INPUTS,
    POLICY_KEYS,
    POLICY_OUTPUTS,
    REEXPORT_HINT,
    SCHEDULER_KEYS,
    file_sha256,
)

log = logging.getLogger(__name__)

PROVIDER_PREFERENCE = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
_MIN_RANGE = 1e-4  # as koopman_policy.normalizer
# Each provider's probe in this process (``_probe_provider``): why it cannot run, "" when it can.
_UNUSABLE_PROVIDERS: dict[str, str] = {}
ORT_DEFAULT_LOG_SEVERITY = 2  # ORT's process-wide logger starts at warning; the provider probe restores it
#: The graph inputs each kind of file may have.
_INPUTS = {"policy": (POLICY_INPUTS, IMAGE_POLICY_INPUTS), "denoiser": (DENOISER_INPUTS,)}


class ModelLoadError(ValueError):
    """An ONNX policy file that is missing, unreadable, incomplete or not the one expected."""


@dataclass
class PolicyMetadata:
    """What an exported file says about itself; arrays are float32."""

    kind: str
    method: str
    inputs: tuple[str, ...]
    obs_dim: int
    action_dim: int
    horizon: int
    n_obs_steps: int
    n_action_steps: int
    control_dt: float
    obs_layout: str
    obs_names: list[str]
    action_names: list[str]
    obs_low: np.ndarray
    obs_high: np.ndarray
    action_low: np.ndarray
    action_high: np.ndarray
    action_limit_low: np.ndarray
    action_limit_high: np.ndarray
    training_commit: str
    weights_sha256: str
    uses_noise: bool
    config: dict[str, Any]
    contract: Contract
    file_sha256: str
    ood_threshold: float | None = None
    sampler: str | None = None
    num_inference_steps: int | None = None
    scheduler: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def executed_slice(self) -> slice:
        """Steps of a chunk that are executed (the chunk starts at the oldest observation)."""
        start = self.n_obs_steps - 1
        return slice(start, start + self.n_action_steps)

    @property
    def image(self) -> ImageSpec | None:
        """The frames a camera policy sees (its contract's image feature); None for a state policy."""
        feature = self.contract.image
        return feature.image if feature is not None else None

    @classmethod
    def from_props(cls, props: dict[str, str], sha: str, path: Path) -> PolicyMetadata:
        try:
            raw = {k: json.loads(v) for k, v in props.items()}
        except json.JSONDecodeError as err:
            raise ModelLoadError(f"{path}: metadata value is not JSON: {err}") from None
        if raw.get("kind") not in KINDS:
            raise ModelLoadError(f"{path}: metadata kind {raw.get('kind')!r} is not one of {', '.join(KINDS)} "
                                 "(not exported by koopman_policy?)")
        if "contract" not in raw:
            raise ModelLoadError(f"{path}: no observation and action contract in its metadata (exported before "
                                 f"contracts); {REEXPORT_HINT}")
        required = POLICY_KEYS + (SCHEDULER_KEYS if raw["kind"] == "denoiser" else ())
        missing = [k for k in required if k not in raw]
        if missing:
            raise ModelLoadError(f"{path}: metadata lacks {', '.join(missing)}; {REEXPORT_HINT}")
        try:
            contract = Contract.from_dict(raw["contract"], f"{path}: metadata contract")
            vec = {k: np.asarray(raw[k], dtype=np.float32) for k in
                   ("obs_low", "obs_high", "action_low", "action_high", "action_limit_low", "action_limit_high")}
            meta = cls(
                kind=str(raw["kind"]), method=str(raw["method"]), inputs=tuple(raw["inputs"]),
                obs_dim=int(raw["obs_dim"]), action_dim=int(raw["action_dim"]), horizon=int(raw["horizon"]),
                n_obs_steps=int(raw["n_obs_steps"]), n_action_steps=int(raw["n_action_steps"]),
                control_dt=float(raw["control_dt"]), obs_layout=str(raw["obs_layout"]),
                obs_names=list(raw["obs_names"]), action_names=list(raw["action_names"]),
                training_commit=str(raw["training_commit"]), weights_sha256=str(raw["weights_sha256"]),
                uses_noise=bool(raw["uses_noise"]), config=dict(raw["config"]), contract=contract, file_sha256=sha,
                ood_threshold=None if raw.get("ood_threshold") is None else float(raw["ood_threshold"]),
                sampler=raw.get("sampler"),
                num_inference_steps=None if raw.get("num_inference_steps") is None
                else int(raw["num_inference_steps"]),
                scheduler={k: raw[k] for k in SCHEDULER_KEYS if k in raw},
                raw=raw, **vec,
            )
            consistent(contract, meta.obs_names, meta.action_names, meta.control_dt)
        except ContractError as err:
            raise ModelLoadError(f"{path}: {err}") from None
        except (TypeError, ValueError) as err:
            raise ModelLoadError(f"{path}: malformed metadata: {err}") from None
        for key, dim in (("obs_low", meta.obs_dim), ("obs_high", meta.obs_dim), ("obs_names", meta.obs_dim),
                         ("action_low", meta.action_dim), ("action_high", meta.action_dim),
                         ("action_limit_low", meta.action_dim), ("action_limit_high", meta.action_dim),
                         ("action_names", meta.action_dim)):
            if len(getattr(meta, key)) != dim:
                raise ModelLoadError(f"{path}: metadata {key} has {len(getattr(meta, key))} entries, expected {dim}")
        if meta.n_obs_steps < 1 or meta.n_obs_steps - 1 + meta.n_action_steps > meta.horizon:
            raise ModelLoadError(f"{path}: n_obs_steps/n_action_steps do not fit in horizon {meta.horizon}")
        if meta.inputs not in _INPUTS[meta.kind]:
            raise ModelLoadError(f"{path}: metadata inputs {list(meta.inputs)} are none of a {meta.kind} file's "
                                 f"{' or '.join(str(list(i)) for i in _INPUTS[meta.kind])}")
        if ("image" in meta.inputs) != (meta.image is not None):
            raise ModelLoadError(f"{path}: the graph inputs {list(meta.inputs)} and the contract's observation "
                                 f"features {[f.name for f in contract.observation]} disagree on an image")
        return meta


class MinMaxNormalizer:
    """numpy twin of :class:`koopman_policy.normalizer.Normalizer`, rebuilt from its bounds."""

    def __init__(self, low: np.ndarray, high: np.ndarray) -> None:
        span = (high - low).astype(np.float32)
        wide = span > _MIN_RANGE
        self.scale = np.where(wide, 2.0 / np.maximum(span, _MIN_RANGE), 1.0).astype(np.float32)
        self.offset = (-(high + low) / 2 * self.scale).astype(np.float32)

    def normalize(self, x: np.ndarray) -> np.ndarray:
        return x * self.scale + self.offset

    def unnormalize(self, x: np.ndarray) -> np.ndarray:
        return (x - self.offset) / self.scale


def session_options(intra_op_threads: int = 1) -> ort.SessionOptions:
    """Options for a control loop: few threads, sequential, fully optimised graph."""
    if intra_op_threads < 1:
        raise ValueError(f"intra_op_threads must be >= 1, got {intra_op_threads}")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3  # provider fallbacks are reported through `logging` instead
    return opts


def _probe_provider(provider: str) -> str | None:
    """Why ``provider`` cannot run anything in this process (None: it can), found once on a one-node graph.

    A GPU build lists its providers whether or not a device and its libraries are there; finding that out on
    the policy itself opened it once per unusable provider (the Push-T teacher's unrolled DDIM-30 graph takes
    about a minute per opening on two cores).
    """
    if provider not in _UNUSABLE_PROVIDERS:
        from onnx import TensorProto, helper  # protobuf only; no torch

        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        # A missing provider library is reported by ORT's process-wide logger at error level and by a printed
        # "EP Error" banner; the outcome goes to `logging` (create_session), so both are held back here.
        ort.set_default_logger_severity(4)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                active = ort.InferenceSession(model.SerializeToString(), opts,
                                              providers=[provider, "CPUExecutionProvider"]).get_providers()[0]
            _UNUSABLE_PROVIDERS[provider] = "" if active == provider else (
                f"{provider}: listed but could not be initialised (no device or missing libraries)")
        except Exception as err:  # ORT raises its own exception types
            _UNUSABLE_PROVIDERS[provider] = f"{provider}: could not be initialised: {str(err).splitlines()[0]}"
        finally:
            ort.set_default_logger_severity(ORT_DEFAULT_LOG_SEVERITY)
    return _UNUSABLE_PROVIDERS[provider] or None


def create_session(
    path: Path, providers: list[str] | tuple[str, ...] | None, opts: ort.SessionOptions
) -> tuple[ort.InferenceSession, str, list[str]]:
    """First provider (in preference order) that really runs the model; CPU is the last resort.

    Returns the session, the active provider and the reasons the earlier candidates were skipped.
    Raises :class:`ModelLoadError` if not even the CPU provider can open the file.
    """
    available = ort.get_available_providers()
    wanted = list(providers) if providers else list(PROVIDER_PREFERENCE)
    if "CPUExecutionProvider" not in wanted:
        wanted.append("CPUExecutionProvider")
    reasons: list[str] = []
    for provider in wanted:
        if provider not in available:
            reasons.append(f"{provider}: not in this onnxruntime build ({', '.join(available)})")
            continue
        if provider != "CPUExecutionProvider" and (reason := _probe_provider(provider)):
            reasons.append(reason)
            continue
        chain = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
        try:
            session = ort.InferenceSession(str(path), opts, providers=chain)
        except Exception as err:  # ORT raises its own exception types (Fail, InvalidProtobuf, ...)
            if provider == "CPUExecutionProvider":
                raise ModelLoadError(f"{path}: cannot be opened as an ONNX model: {err}") from None
            reasons.append(f"{provider}: session creation failed: {str(err).splitlines()[0]}")
            continue
        active = session.get_providers()[0]
        if active != provider:
            reasons.append(f"{provider}: could not run this model")
            continue
        for reason in reasons:
            log.info("%s: skipped %s", path.name, reason)
        if reasons:
            log.warning("%s: running on %s after %d fallback(s)", path.name, provider, len(reasons))
        return session, provider, reasons
    raise ModelLoadError(f"{path}: no usable execution provider ({'; '.join(reasons)})")


def _check_io(session: ort.InferenceSession, path: Path, expected: dict[str, tuple], outputs: dict[str, tuple]) -> None:
    """Inputs/outputs must be float32 (timestep int64) with the shapes the metadata promises."""
    for kind, args, want in (("input", session.get_inputs(), expected), ("output", session.get_outputs(), outputs)):
        got = {a.name: a for a in args}
        if set(got) != set(want):
            raise ModelLoadError(f"{path}: graph {kind}s are {sorted(got)}, expected {sorted(want)}")
        for name, (dtype, shape) in want.items():
            arg = got[name]
            if arg.type != dtype:
                raise ModelLoadError(f"{path}: {kind} {name!r} has type {arg.type}, expected {dtype}")
            dims = list(arg.shape)
            ok = len(dims) == len(shape) and all(
                want_d is None or d == want_d for d, want_d in zip(dims, shape, strict=False)
            )
            if not ok:
                raise ModelLoadError(
                    f"{path}: {kind} {name!r} has shape {dims}, metadata says {['batch', *shape[1:]]}"
                )


@dataclass
class OnnxFile:
    """An exported file, checked and opened once: its session, the provider it runs on and its metadata."""

    path: Path
    session: ort.InferenceSession
    provider: str
    fallback_reasons: list[str]
    metadata: PolicyMetadata

    @classmethod
    def open(cls, path: str | Path, providers: list[str] | tuple[str, ...] | None = None, intra_op_threads: int = 1,
             expected_sha256: str | None = None) -> OnnxFile:
        """Check the file (exists, sha256 when expected), create its session, read and check its metadata."""
        path = Path(path)
        if not path.exists():
            raise ModelLoadError(f"{path}: no such file")
        if not path.is_file():
            raise ModelLoadError(f"{path}: not a file")
        sha = file_sha256(path)
        if expected_sha256 is not None and sha != expected_sha256.strip().lower():
            raise ModelLoadError(f"{path}: sha256 {sha} does not match the expected {expected_sha256}")
        session, provider, reasons = create_session(path, providers, session_options(intra_op_threads))
        metadata = PolicyMetadata.from_props(session.get_modelmeta().custom_metadata_map, sha, path)
        return cls(path, session, provider, reasons, metadata)


class _OnnxModel:
    """An opened file of one kind, with the seeded noise and the observation and action queues of both runtimes.

    ``source`` is a path (opened here with ``providers``, ``intra_op_threads``, ``expected_sha256``) or an
    :class:`OnnxFile` :func:`load_onnx` has opened.
    """

    kind: ClassVar[str]
    #: Frame size (height, width) of a camera policy; None for a policy that observes no image.
    image_size: tuple[int, int] | None = None

    def __init__(
        self,
        source: str | Path | OnnxFile,
        providers: list[str] | tuple[str, ...] | None = None,
        intra_op_threads: int = 1,
        seed: int = 0,
        expected_sha256: str | None = None,
    ) -> None:
        opened = source if isinstance(source, OnnxFile) else OnnxFile.open(source, providers, intra_op_threads,
                                                                             expected_sha256)
        self.path, self.session, self.metadata = opened.path, opened.session, opened.metadata
        self.provider, self.fallback_reasons = opened.provider, opened.fallback_reasons
        if self.metadata.kind != self.kind:
            raise ModelLoadError(f"{self.path}: holds a {self.metadata.kind!r} graph, not a {self.kind!r} one; open "
                                 "it with load_onnx, which picks the runtime from the metadata")
        m = self.metadata
        #: The graph's observation inputs, in order: predict_action's positional arguments.
        self.observation_inputs: tuple[str, ...] = tuple(n for n in m.inputs if n not in ("noise", "sample",
                                                                                           "timestep"))
        self.rng = np.random.default_rng(seed)
        self.last_ood_score: float | np.ndarray | None = None
        self._queues = {name: deque(maxlen=m.n_obs_steps) for name in self.observation_inputs}
        self._action_queue: deque[np.ndarray] = deque()
        self._check_graph()

    def _check_graph(self) -> None:
        """Check the graph's inputs and outputs against the metadata and set up what this runtime needs."""
        raise NotImplementedError

    # -- validation ------------------------------------------------------------------------------------
    def _check_obs(self, obs_history: Any, name: str = "obs") -> tuple[np.ndarray, bool]:
        m = self.metadata
        what = "state history" if name == "state" else "observation history"
        obs = np.asarray(obs_history, dtype=np.float32)
        single = obs.ndim == 2
        if single:
            obs = obs[None]
        if obs.ndim != 3 or obs.shape[1:] != (m.n_obs_steps, m.obs_dim) or obs.shape[0] < 1:
            raise ValueError(
                f"{m.method}: {what} must have shape ({m.n_obs_steps}, {m.obs_dim}) or "
                f"(B, {m.n_obs_steps}, {m.obs_dim}), got {np.shape(obs_history)}"
            )
        if not np.isfinite(obs).all():
            raise ValueError(f"{m.method}: {what} contains NaN or inf")
        return obs, single

    def _check_image(self, image: Any, batch: int) -> np.ndarray:
        """Frames ``(To, h, w, 3)`` or ``(B, To, h, w, 3)``, uint8 or float in [0, 1] -> ``(B, To, h, w, 3)``."""
        m = self.metadata
        arr = _frames(image, m.method)
        if arr.ndim == 4:
            arr = arr[None]
        want = (batch, m.n_obs_steps, *self.image_size, 3)
        if arr.shape != want:
            raise ValueError(f"{m.method}: image history must have shape {want[1:]} or {want}, got {np.shape(image)}")
        return arr

    def _check_noise(self, noise: Any, batch: int) -> np.ndarray:
        m = self.metadata
        arr = np.asarray(noise, dtype=np.float32)
        if arr.ndim == 2:
            arr = arr[None]
        if arr.shape != (batch, m.horizon, m.action_dim):
            raise ValueError(
                f"{m.method}: noise must have shape ({m.horizon}, {m.action_dim}) or "
                f"({batch}, {m.horizon}, {m.action_dim}), got {np.shape(noise)}"
            )
        if not np.isfinite(arr).all():
            raise ValueError(f"{m.method}: noise contains NaN or inf")
        return arr

    def _split_noise(self, inputs: tuple[Any, ...], noise: Any) -> tuple[tuple[Any, ...], Any]:
        """The observation arrays and the noise of a call whose positional arguments follow the graph's inputs."""
        n = len(self.observation_inputs)
        if len(inputs) == n + 1 and noise is None:
            return inputs[:n], inputs[n]
        if len(inputs) != n:
            raise TypeError(f"{self.metadata.method}: predict_action takes {', '.join(self.observation_inputs)} "
                            f"(then optionally the noise), got {len(inputs)} positional arrays")
        return inputs, noise

    def sample_noise(self, batch: int = 1) -> np.ndarray:
        m = self.metadata
        return self.rng.standard_normal((batch, m.horizon, m.action_dim), dtype=np.float32)

    def predict_action(self, *inputs: Any, noise: Any = None) -> np.ndarray:
        raise NotImplementedError

    # -- closed loop -----------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the observation history and the queued actions (start of an episode)."""
        for queue in self._queues.values():
            queue.clear()
        self._action_queue.clear()
        self.last_ood_score = None

    def select_action(self, *observation: Any) -> np.ndarray:
        """One raw action ``(action_dim,)`` for one step of each observation input (a raw ``(obs_dim,)`` vector;
        for a camera policy a frame ``(h, w, 3)`` and the state); replans when the queue is empty. A bad
        observation raises ``ValueError`` before any state changes."""
        m = self.metadata
        if len(observation) != len(self.observation_inputs):
            raise TypeError(f"{m.method}: select_action takes one step of {', '.join(self.observation_inputs)}, "
                            f"got {len(observation)} arrays")
        steps = []
        for name, value in zip(self.observation_inputs, observation, strict=True):
            if name == "image":
                frame = _frames(value, m.method)
                if frame.shape != (*self.image_size, 3):
                    raise ValueError(f"{m.method}: a frame must have shape {(*self.image_size, 3)}, got "
                                     f"{np.shape(value)}")
            else:
                frame = np.asarray(value, dtype=np.float32)
                if frame.shape != (m.obs_dim,):
                    raise ValueError(f"{m.method}: {name} must have shape ({m.obs_dim},), got {np.shape(value)}")
                if not np.isfinite(frame).all():
                    raise ValueError(f"{m.method}: {name} contains NaN or inf")
            steps.append(frame)
        for name, step in zip(self.observation_inputs, steps, strict=True):
            queue = self._queues[name]
            queue.extend([step] * (m.n_obs_steps if not queue else 1))
        if not self._action_queue:
            chunk = self.predict_action(*(np.stack(self._queues[n]) for n in self.observation_inputs))
            self._action_queue.extend(chunk[m.executed_slice])
        return self._action_queue.popleft()

    @property
    def ood_exceeded(self) -> bool | None:
        """Whether the last score passed the file's ``ood_threshold`` (None without one or without a score)."""
        t = self.metadata.ood_threshold
        if t is None or self.last_ood_score is None:
            return None
        return bool(np.any(np.asarray(self.last_ood_score) > t))


def _frames(image: Any, method: str) -> np.ndarray:
    """Frames as float32 in [0, 1] (uint8 is divided by 255); ValueError for NaN or values outside [0, 1]."""
    arr = np.asarray(image)
    arr = arr.astype(np.float32) / np.float32(255.0) if arr.dtype == np.uint8 else arr.astype(np.float32, copy=False)
    if not np.isfinite(arr).all():
        raise ValueError(f"{method}: image history contains NaN or inf")
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if lo < -1e-3 or hi > 1.0 + 1e-3:
        raise ValueError(f"{method}: images must lie in [0, 1] (uint8 / 255), got [{lo:.3g}, {hi:.3g}]")
    return arr


class OnnxPolicy(_OnnxModel):
    """A one-step ``policy.onnx`` in numpy, state or camera policy: one ONNX call per chunk."""

    kind = "policy"

    def _check_graph(self) -> None:
        m = self.metadata
        f32 = "tensor(float)"
        image = m.image
        if image is not None:
            self.image_size = (image.height, image.width)
            #: The simulated camera whose frames the policy was trained on ("" for a real camera).
            self.camera = image.camera
        shapes = {"obs": (None, m.n_obs_steps, m.obs_dim), "state": (None, m.n_obs_steps, m.obs_dim),
                  "noise": (None, m.horizon, m.action_dim)}
        if self.image_size is not None:
            shapes["image"] = (None, m.n_obs_steps, *self.image_size, 3)
        _check_io(self.session, self.path, {name: (f32, shapes[name]) for name in m.inputs},
                  {"action": (f32, (None, m.horizon, m.action_dim)), "ood_score": (f32, (None,))})
        # Batch-1 buffers, bound once: a call copies its inputs in and reads the outputs back.
        self._inputs1 = {name: np.zeros((1, *shapes[name][1:]), np.float32) for name in m.inputs}
        self._action1 = np.zeros((1, m.horizon, m.action_dim), np.float32)
        self._ood1 = np.zeros((1,), np.float32)
        self._binding = self.session.io_binding()
        for name, buf in self._inputs1.items():
            self._binding.bind_cpu_input(name, buf)
        for name, buf in zip(POLICY_OUTPUTS, (self._action1, self._ood1), strict=True):
            self._binding.bind_output(name, "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)

    def predict_action(self, *inputs: Any, noise: Any = None) -> np.ndarray:
        """Raw chunk ``(H, Da)`` for one history, ``(B, H, Da)`` for a batch of them.

        The positional arguments are the graph's observation inputs in order (``metadata.inputs``): the raw
        history ``obs (To, Do)``, or for a camera policy ``image (To, h, w, 3)`` (uint8, or float in [0, 1]) and
        ``state (To, Do)``; each with a leading ``B`` for a batch. ``noise`` (standard normal, ``(H, Da)`` or
        ``(B, H, Da)``; positional after them or by keyword) defaults to the seeded generator's.
        ``last_ood_score`` becomes a float (one history) or a ``(B,)`` array. A bad input raises ValueError and
        leaves ``last_ood_score`` as it was.
        """
        observation, noise = self._split_noise(inputs, noise)
        named = dict(zip(self.observation_inputs, observation, strict=True))
        state_name = "state" if "state" in named else "obs"
        obs, single = self._check_obs(named[state_name], state_name)
        batch = obs.shape[0]
        feeds = {state_name: obs}
        if "image" in named:
            feeds["image"] = self._check_image(named["image"], batch)
        if batch == 1 and self.provider == "CPUExecutionProvider":
            for name, value in feeds.items():
                self._inputs1[name][...] = value
            if noise is None:
                self.rng.standard_normal(out=self._inputs1["noise"][0], dtype=np.float32)
            else:
                self._inputs1["noise"][...] = self._check_noise(noise, 1)
            self.session.run_with_iobinding(self._binding)
            action, ood = self._action1.copy(), self._ood1.copy()
        else:
            feeds["noise"] = self.sample_noise(batch) if noise is None else self._check_noise(noise, batch)
            action, ood = self.session.run(list(POLICY_OUTPUTS), feeds)
        self.last_ood_score = float(ood[0]) if single else ood
        return action[0] if single else action


# -- numpy diffusion schedulers -----------------------------------------------------------------------------
def alphas_cumprod(num_train_timesteps: int, beta_schedule: str, beta_start: float = 1e-4,
                   beta_end: float = 0.02) -> np.ndarray:
    """diffusers' cumulative alpha products in float32 (same betas, same dtype steps)."""
    n = num_train_timesteps
    if beta_schedule == "linear":
        betas = np.linspace(beta_start, beta_end, n, dtype=np.float32)
    elif beta_schedule == "scaled_linear":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float32) ** 2
    elif beta_schedule == "squaredcos_cap_v2":
        def bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = np.array([min(1 - bar((i + 1) / n) / bar(i / n), 0.999) for i in range(n)], dtype=np.float32)
    else:
        raise ModelLoadError(f"beta_schedule {beta_schedule!r} is not supported by the numpy loop")
    return np.cumprod(np.float32(1.0) - betas, dtype=np.float32)


class NumpyDiffusionScheduler:
    """DDPM (ancestral, fixed-small variance) and DDIM (eta = 0) steps as diffusers computes them."""

    def __init__(self, settings: dict[str, Any]) -> None:
        if settings.get("prediction_type") != "epsilon":
            raise ModelLoadError(f"prediction_type {settings.get('prediction_type')!r} unsupported (epsilon only)")
        if settings.get("timestep_spacing") != "leading":
            raise ModelLoadError(f"timestep_spacing {settings.get('timestep_spacing')!r} unsupported (leading only)")
        self.n = int(settings["num_train_timesteps"])
        self.acp = alphas_cumprod(self.n, settings["beta_schedule"], settings["beta_start"], settings["beta_end"])
        self.clip = float(settings["clip_sample_range"]) if settings["clip_sample"] else None
        self.final_acp = np.float32(1.0) if settings["set_alpha_to_one"] else self.acp[0]
        self.offset = int(settings["steps_offset"])

    def timesteps(self, num_steps: int) -> np.ndarray:
        if not 1 <= num_steps <= self.n:
            raise ValueError(f"number of inference steps must be in [1, {self.n}], got {num_steps}")
        ratio = self.n // num_steps
        return (np.arange(num_steps) * ratio).round()[::-1].astype(np.int64) + self.offset

    def _x0(self, eps: np.ndarray, x: np.ndarray, acp_t: np.float32) -> np.ndarray:
        x0 = (x - np.sqrt(1 - acp_t) * eps) / np.sqrt(acp_t)
        return np.clip(x0, -self.clip, self.clip) if self.clip is not None else x0

    def ddim_step(self, eps: np.ndarray, t: int, x: np.ndarray, num_steps: int) -> np.ndarray:
        prev = t - self.n // num_steps
        acp_t = self.acp[t]
        acp_prev = self.acp[prev] if prev >= 0 else self.final_acp
        x0 = self._x0(eps, x, acp_t)
        return np.sqrt(acp_prev) * x0 + np.sqrt(1 - acp_prev) * eps

    def ddpm_step(self, eps: np.ndarray, t: int, x: np.ndarray, prev: int, noise: np.ndarray | None) -> np.ndarray:
        acp_t = self.acp[t]
        acp_prev = self.acp[prev] if prev >= 0 else np.float32(1.0)
        beta_t, beta_prev = 1 - acp_t, 1 - acp_prev
        alpha_cur = acp_t / acp_prev
        beta_cur = 1 - alpha_cur
        x0 = self._x0(eps, x, acp_t)
        mean = (np.sqrt(acp_prev) * beta_cur / beta_t) * x0 + (np.sqrt(alpha_cur) * beta_prev / beta_t) * x
        if t > 0 and noise is not None:
            variance = max(beta_prev / beta_t * beta_cur, np.float32(1e-20))
            mean = mean + np.sqrt(variance) * noise
        return mean


class OnnxDenoiserLoop(_OnnxModel):
    """The teacher from its exported U-Net: DDIM-k (deterministic) or DDPM (ancestral) in numpy.

    One ONNX call per solver step, so DDPM-100 costs 100 U-Net evaluations: a reference, not a controller.
    """

    kind = "denoiser"

    def __init__(
        self,
        source: str | Path | OnnxFile,
        providers: list[str] | tuple[str, ...] | None = None,
        intra_op_threads: int = 1,
        seed: int = 0,
        expected_sha256: str | None = None,
        sampler: str = "ddim",
        num_inference_steps: int = 10,
    ) -> None:
        if sampler not in ("ddim", "ddpm"):
            raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}")
        super().__init__(source, providers, intra_op_threads, seed, expected_sha256)
        m = self.metadata
        self.action_normalizer = MinMaxNormalizer(m.action_low, m.action_high)
        self.scheduler = NumpyDiffusionScheduler(m.scheduler)
        self.sampler = sampler
        self.num_inference_steps = self.scheduler.n if sampler == "ddpm" else num_inference_steps
        self.scheduler.timesteps(self.num_inference_steps)  # validates the step count

    def _check_graph(self) -> None:
        m = self.metadata
        f32 = "tensor(float)"
        _check_io(
            self.session, self.path,
            {"sample": (f32, (None, m.horizon, m.action_dim)), "timestep": ("tensor(int64)", (None,)),
             "obs": (f32, (None, m.n_obs_steps, m.obs_dim))},
            {"eps": (f32, (None, m.horizon, m.action_dim))},
        )

    def eps(self, sample: np.ndarray, timestep: np.ndarray, obs: np.ndarray) -> np.ndarray:
        (out,) = self.session.run(list(DENOISER_OUTPUTS), dict(zip(DENOISER_INPUTS, (sample, timestep, obs),
                                                                    strict=True)))
        return out

    def predict_action(self, obs_history: Any, noise: Any = None, step_noise: Any = None) -> np.ndarray:  # type: ignore[override]
        """Raw chunk ``(H, Da)`` / ``(B, H, Da)`` from initial noise x_T (seeded when not given).

        ``step_noise`` ``(steps - 1, B, H, Da)`` fixes DDPM's per-step noise (the last step adds none);
        by default it is drawn from the seeded generator.
        """
        obs, single = self._check_obs(obs_history)
        batch = obs.shape[0]
        x = self.sample_noise(batch) if noise is None else self._check_noise(noise, batch)
        steps = self.scheduler.timesteps(self.num_inference_steps)
        if step_noise is not None:
            step_noise = np.asarray(step_noise, dtype=np.float32)
            if step_noise.shape != (len(steps) - 1, *x.shape):
                raise ValueError(f"step_noise must have shape {(len(steps) - 1, *x.shape)}, got {step_noise.shape}")
        t_buf = np.empty((batch,), np.int64)
        for i, t in enumerate(steps):
            t_buf.fill(t)
            eps = self.eps(x, t_buf, obs)
            if self.sampler == "ddim":
                x = self.scheduler.ddim_step(eps, int(t), x, self.num_inference_steps)
            else:
                prev = int(steps[i + 1]) if i + 1 < len(steps) else -1
                z = None
                if t > 0:
                    z = step_noise[i] if step_noise is not None else self.sample_noise(batch)
                x = self.scheduler.ddpm_step(eps, int(t), x, prev, z)
            x = x.astype(np.float32, copy=False)
        action = self.action_normalizer.unnormalize(x).astype(np.float32)
        self.last_ood_score = 0.0 if single else np.zeros(batch, np.float32)
        return action[0] if single else action


def load_onnx(
    path: str | Path,
    *,
    providers: list[str] | tuple[str, ...] | None = None,
    intra_op_threads: int = 1,
    seed: int = 0,
    expected_sha256: str | None = None,
    sampler: str = "ddim",
    num_inference_steps: int = 10,
) -> OnnxPolicy | OnnxDenoiserLoop:
    """Open an exported file once and serve it with the runtime its metadata ``kind`` names: a ``policy`` with
    :class:`OnnxPolicy`, a ``denoiser`` with :class:`OnnxDenoiserLoop` (``sampler``, ``num_inference_steps``)."""
    opened = OnnxFile.open(path, providers, intra_op_threads, expected_sha256)
    if opened.metadata.kind == "denoiser":
        return OnnxDenoiserLoop(opened, seed=seed, sampler=sampler, num_inference_steps=num_inference_steps)
    return OnnxPolicy(opened, seed=seed)
