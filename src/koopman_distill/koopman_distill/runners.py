"""Any policy behind one numpy interface for evaluation, visits and replay.

Policies are loaded by :func:`koopman_policy.loader.open_policy` (the one loader of serving, evaluation and
replay), backend ``auto`` by default: a student through ONNX Runtime when it is exported (what the robot runs),
a diffusion teacher with its checkpoint through PyTorch with its configured sampler, the checkpoint of anything
never exported. ``predict_action`` takes the policy's observation inputs in graph order, then the noise: the raw
history ``obs (To, Do)`` of a state policy, or ``image (To, h, w, 3)`` (float in [0, 1]) and ``state (To, Do)``
of a camera policy (``image_size`` is not None), each batched with a leading ``B`` if wanted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from koopman_policy.base import BasePolicy
from koopman_policy.loader import LoadedPolicy, open_policy


class Runner(Protocol):
    name: str
    method: str
    horizon: int
    n_obs_steps: int
    n_action_steps: int
    obs_dim: int
    action_dim: int
    obs_names: tuple[str, ...]
    control_dt: float
    num_parameters: int
    backend: str
    card: Path | None
    image_size: tuple[int, int] | None  # camera policies: the frames they see (height, width)
    camera: str | None  # the simulated camera rendering them
    sampler: str | None  # a teacher's ("ddim-10"); None for one-step students

    def predict_action(self, *inputs: np.ndarray) -> np.ndarray: ...


@dataclass
class TorchRunner:
    name: str
    policy: BasePolicy
    card: Path | None = None
    backend: str = "torch"

    def __post_init__(self) -> None:
        c = self.policy.config
        self.method = self.policy.method
        self.horizon, self.n_obs_steps, self.n_action_steps = c.horizon, c.n_obs_steps, c.n_action_steps
        self.obs_dim, self.action_dim = c.obs_dim, c.action_dim
        self.obs_names, self.control_dt = tuple(c.obs_names), c.control_dt
        self.num_parameters = self.policy.num_parameters()
        image = getattr(self.policy, "image_inputs", False)
        self.image_size = (c.image_height, c.image_width) if image else None
        self.camera = c.camera if image else None
        self.sampler = f"{c.sampler}-{c.num_inference_steps}" if hasattr(c, "sampler") else None

    @torch.no_grad()
    def predict_action(self, *inputs: np.ndarray) -> np.ndarray:
        *observation, noise = (torch.from_numpy(np.asarray(x, np.float32)) for x in inputs)
        squeeze = observation[-1].dim() == 2
        if squeeze:
            observation, noise = [x[None] for x in observation], noise[None]
        obs: Any = observation[0] if self.image_size is None else {"image": observation[0], "state": observation[1]}
        chunk = self.chunk(obs, noise).numpy()
        return chunk[0] if squeeze else chunk

    def chunk(self, obs: Any, noise: torch.Tensor) -> torch.Tensor:
        """The policy's action chunk for a batch of observations and noises."""
        return self.policy.predict_action(obs, noise)


FINISH_STEPS = 30  # the DDIM path the Push-T students distil (teacher-data --steps 30)


@dataclass(kw_only=True)
class TeacherFinishedRunner(TorchRunner):
    """A one-step student's chunk finished by the teacher (``koopman-distill eval --finish-progress``, a diagnosis).

    The student's chunk for each noise is put back on the teacher's DDIM-``steps`` path at ``progress`` with that
    noise and denoised over the remaining steps (``DiffusionPolicy.ddim_refine``): what ``teacher-data --refine``
    records for a student to learn, measured in closed loop. Not a serving path (it costs the teacher's steps).
    """

    teacher: Any  # a DiffusionPolicy (its ddim_refine)
    progress: float
    steps: int = FINISH_STEPS

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.finishable(self):
            raise ValueError(f"{self.name}: only a one-step student of state observations can be finished by the "
                             "teacher")
        self.sampler = f"finished by ddim-{self.steps} from {self.progress}"

    @classmethod
    def of(cls, student: TorchRunner, teacher: Any, progress: float) -> TeacherFinishedRunner:
        """``student``'s checkpoint, finished by ``teacher`` from ``progress``."""
        return cls(student.name, student.policy, student.card, teacher=teacher, progress=progress)

    @staticmethod
    def finishable(runner: Runner) -> bool:
        """A one-step student of state observations through PyTorch: the runners whose chunks can be finished."""
        return isinstance(runner, TorchRunner) and runner.sampler is None and runner.image_size is None

    def chunk(self, obs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        obs = self.policy.check_obs(obs)
        x0 = self.policy.sample_normalized(self.policy.encode_obs(obs), noise)[0]
        x0 = self.teacher.ddim_refine(self.teacher.encode_obs(obs), x0, noise, self.steps, self.progress)
        return self.teacher.action_normalizer.unnormalize(x0)


@dataclass
class OnnxRunner:
    """An exported file through its runtime (``OnnxPolicy``, or a teacher's ``OnnxDenoiserLoop``)."""

    name: str
    model: Any
    num_parameters: int
    card: Path | None = None
    backend: str = "onnx"

    def __post_init__(self) -> None:
        m = self.model.metadata
        self.method = m.method
        self.horizon, self.n_obs_steps, self.n_action_steps = m.horizon, m.n_obs_steps, m.n_action_steps
        self.obs_dim, self.action_dim = m.obs_dim, m.action_dim
        self.obs_names, self.control_dt = tuple(m.obs_names), m.control_dt
        self.image_size = self.model.image_size
        self.camera = m.image.camera if m.image is not None else None
        steps = getattr(self.model, "num_inference_steps", m.num_inference_steps)
        sampler = getattr(self.model, "sampler", m.sampler)
        self.sampler = f"{sampler}-{steps}" if sampler else None

    def predict_action(self, *inputs: np.ndarray) -> np.ndarray:
        return self.model.predict_action(*inputs)


def onnx_parameters(path: Path) -> int:
    """Float values stored in an ONNX graph, for an export without its checkpoint: the weights plus a few
    normaliser and schedule constants (the Gen3 teacher: 1,181,213 against its checkpoint's 1,181,127; an
    unrolled DDIM graph stores the U-Net's weights once)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return int(sum(np.prod(t.dims) for t in model.graph.initializer
                   if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 1 and np.prod(t.dims) > 1))


def runner_for(loaded: LoadedPolicy) -> Runner:
    """The runner of a loaded policy; an ONNX file counts the parameters its model card records (the
    checkpoint's), else those stored in the graph."""
    entry = loaded.entry
    if loaded.backend == "torch":
        return TorchRunner(entry.name, loaded.model, entry.card)
    params = entry.card_data().get("parameters")
    return OnnxRunner(entry.name, loaded.model, int(params) if params else onnx_parameters(loaded.source),
                      entry.card)


def load_runner(name_or_path: str, backend: str = "auto") -> Runner:
    """A catalogue name or path, resolved once (``backend`` as :func:`koopman_policy.loader.open_policy`)."""
    return runner_for(open_policy(name_or_path, backend))
