"""What every one-step student shares: the teacher-data batch layout and the observation encoder.

A teacher-data batch holds raw ``obs`` ``(B, To, Do)`` and ``states`` ``(B, K + 1, H, Da)``: the teacher's
deterministic (DDIM) trajectory in normalised action space, ``states[:, 0]`` the noise x_T it started from
and ``states[:, -1]`` its final chunk x_0. Progress along the trajectory is ``s_k = k / K`` in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from koopman_policy.base import BasePolicy, PolicyConfig
from koopman_policy.modeling.layers import mlp


@dataclass
class StudentConfig(PolicyConfig):
    hidden_dim: int = 256
    cond_embed_dim: int = 64


class OneStepStudent(BasePolicy):
    config: StudentConfig

    def __init__(self, config: StudentConfig) -> None:
        super().__init__(config)
        self.cond_encoder = mlp(self.cond_dim, config.hidden_dim, config.cond_embed_dim, depth=1)

    def init_from_teacher(self, teacher: BasePolicy) -> bool:
        """Take what the teacher's weights offer before training; True if anything was taken."""
        return False

    def unpack(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Flat normalised obs ``(B, To*Do)``, flat noise x_T and flat teacher chunk x_0 ``(B, H*Da)``."""
        obs_n = self.encode_obs(batch["obs"])
        states = batch["states"]
        return obs_n, states[:, 0].flatten(1), states[:, -1].flatten(1)

    def to_chunk(self, flat: torch.Tensor) -> torch.Tensor:
        return flat.unflatten(-1, (self.config.horizon, self.config.action_dim))


def load_teacher_unet(unet: nn.Module, teacher: BasePolicy, method: str) -> bool:
    """Copy the teacher's denoiser weights into a student's U-Net of the same architecture."""
    try:
        unet.load_state_dict(teacher.model.state_dict())
    except (AttributeError, RuntimeError) as err:
        raise ValueError(f"{method}: the U-Net cannot start from this teacher ({err}); set down_dims/kernel_size/"
                         "n_groups/step_embed_dim to the teacher's, or teacher_init=false") from None
    return True
