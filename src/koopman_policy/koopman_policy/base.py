"""The one interface every policy, teacher or student, implements.

Shapes: an observation history is ``(B, n_obs_steps, obs_dim)`` in raw units, an action chunk is
``(B, horizon, action_dim)`` in raw units. Of a chunk, the steps
``[n_obs_steps - 1, n_obs_steps - 1 + n_action_steps)`` are executed (Diffusion Policy's convention: the
chunk starts at the oldest observation). Internally every policy works in normalised space; the
normalisers live inside the policy so that a checkpoint or an ONNX file is self-contained.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from koopman_policy.normalizer import Normalizer
from koopman_policy.onnx_format import IMAGE_POLICY_INPUTS, POLICY_INPUTS


@dataclass
class PolicyConfig:
    """Fields shared by every policy; each method adds its own beside its model."""

    obs_dim: int = 20
    action_dim: int = 7
    horizon: int = 16
    n_obs_steps: int = 2
    n_action_steps: int = 8
    control_dt: float = 0.1
    obs_names: list[str] = field(default_factory=list)
    action_names: list[str] = field(default_factory=list)
    # The observation and action contract (koopman_policy.contract.Contract.to_dict()): what the names above
    # are on a robot. Recorded from the dataset; None in configs written before contracts existed.
    contract: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PolicyConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown config fields {sorted(unknown)}")
        values = {k: tuple(v) if isinstance(v, list) and k.endswith("_dims") else v for k, v in data.items()}
        return cls(**values)


class ExportModule(nn.Module):
    """The graph that ONNX export traces (``POLICY_INPUTS``): raw observations and noise in, raw chunk and OOD
    score out."""

    def __init__(self, policy: BasePolicy) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, obs: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.chunk(self.policy.encode_obs(obs), noise)

    def chunk(self, obs_n: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x0, ood = self.policy.sample_normalized(obs_n, noise)
        return self.policy.action_normalizer.unnormalize(x0), ood


class ImageExportModule(ExportModule):
    """A camera policy's graph (``IMAGE_POLICY_INPUTS``): frames in [0, 1], the raw joint state and noise in,
    the same outputs."""

    def forward(  # type: ignore[override]
        self, image: torch.Tensor, state: torch.Tensor, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        image_key, state_key, _ = IMAGE_POLICY_INPUTS
        return self.chunk(self.policy.encode_obs({image_key: image, state_key: state}), noise)


class BasePolicy(nn.Module):
    """Common plumbing: shape checks, normalisation, action queue, export wrapper.

    Subclasses implement :meth:`compute_loss` and :meth:`sample_normalized`.
    """

    method: ClassVar[str]
    config_class: ClassVar[type[PolicyConfig]] = PolicyConfig
    uses_noise: ClassVar[bool] = True

    def __init__(self, config: PolicyConfig) -> None:
        super().__init__()
        self.config = config
        self.obs_normalizer = Normalizer(config.obs_dim)
        self.action_normalizer = Normalizer(config.action_dim)
        self._obs_queue: deque[torch.Tensor] = deque(maxlen=config.n_obs_steps)
        self._action_queue: deque[torch.Tensor] = deque()

    @property
    def cond_dim(self) -> int:
        """Width of :meth:`encode_obs`'s output, the conditioning every model sees."""
        return self.config.n_obs_steps * self.config.obs_dim

    def encode_obs(self, obs_history: torch.Tensor) -> torch.Tensor:
        """Raw observation history ``(B, To, Do)`` -> flat conditioning ``(B, cond_dim)``.

        The one place observations enter a model: a policy with other inputs (images) overrides this
        and :attr:`cond_dim`, and everything else is unchanged.
        """
        return self.obs_normalizer.normalize(obs_history).flatten(1)

    @property
    def chunk_dim(self) -> int:
        return self.config.horizon * self.config.action_dim

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def fit_normalizers(self, obs: torch.Tensor, action: torch.Tensor) -> None:
        self.obs_normalizer.fit(obs)
        self.action_normalizer.fit(action)

    def copy_normalizers(self, other: BasePolicy) -> None:
        """Students act in the teacher's normalised space, so they share its statistics."""
        self.obs_normalizer.load_state_dict(other.obs_normalizer.state_dict())
        self.action_normalizer.load_state_dict(other.action_normalizer.state_dict())

    # -- training ---------------------------------------------------------------------------------
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Loss of a batch; ``forward`` so that DistributedDataParallel wraps training correctly."""
        return self.compute_loss(batch)

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def on_train_step(self) -> None:
        """Called by the training loop after each optimiser step (target networks update here)."""

    # -- inference --------------------------------------------------------------------------------
    def sample_normalized(self, obs_n: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Map encoded observations ``(B, cond_dim)`` and noise ``(B, H, Da)`` to a normalised chunk
        and a per-sample out-of-distribution score ``(B,)``."""
        raise NotImplementedError

    def check_obs(self, obs_history: torch.Tensor) -> torch.Tensor:
        c = self.config
        if obs_history.dim() == 2:
            obs_history = obs_history.unsqueeze(0)
        if obs_history.dim() != 3 or tuple(obs_history.shape[1:]) != (c.n_obs_steps, c.obs_dim):
            raise ValueError(
                f"{self.method}: observation history must have shape (B, {c.n_obs_steps}, {c.obs_dim}), "
                f"got {tuple(obs_history.shape)}"
            )
        if not torch.isfinite(obs_history).all():
            raise ValueError(f"{self.method}: observation history contains NaN or inf")
        return obs_history.float()

    def sample_noise(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        c = self.config
        return torch.randn((batch, c.horizon, c.action_dim), generator=generator)

    @torch.no_grad()
    def predict_action(
        self,
        obs_history: torch.Tensor,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Raw action chunk ``(B, horizon, action_dim)`` for a raw observation history."""
        obs_history = self.check_obs(obs_history)
        if noise is None:
            noise = self.sample_noise(obs_history.shape[0], generator)
        obs_n = self.encode_obs(obs_history)
        x0, _ = self.sample_normalized(obs_n, noise.float())
        return self.action_normalizer.unnormalize(x0)

    def reset(self) -> None:
        self._obs_queue.clear()
        self._action_queue.clear()

    @torch.no_grad()
    def select_action(self, obs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One action for one raw observation ``(obs_dim,)``; plans a new chunk when the queue runs dry."""
        c = self.config
        if not self._obs_queue:
            self._obs_queue.extend([obs] * c.n_obs_steps)
        else:
            self._obs_queue.append(obs)
        if not self._action_queue:
            chunk = self.predict_action(torch.stack(list(self._obs_queue)), generator=generator)[0]
            start = c.n_obs_steps - 1
            self._action_queue.extend(chunk[start : start + c.n_action_steps])
        return self._action_queue.popleft()

    def export_module(self) -> nn.Module:
        return ExportModule(self)

    def export_example_inputs(self, batch: int = 2) -> dict[str, torch.Tensor]:
        """The exported graph's inputs by name, in graph order (zeros, for tracing)."""
        c = self.config
        obs, noise = POLICY_INPUTS
        return {obs: torch.zeros(batch, c.n_obs_steps, c.obs_dim), noise: torch.zeros(batch, c.horizon, c.action_dim)}
