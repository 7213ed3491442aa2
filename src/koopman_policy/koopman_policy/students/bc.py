"""Behaviour-cloning reference: one-step regression of the teacher's chunk from the observation alone.

With no noise input the best a squared loss can do is the mean of the teacher's modes, so on a bimodal
task this student averages left and right into the pillar: the failure the other students avoid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from koopman_policy.modeling.layers import mlp
from koopman_policy.students.common import OneStepStudent, StudentConfig


@dataclass
class BCConfig(StudentConfig):
    depth: int = 4


class BCPolicy(OneStepStudent):
    method = "bc"
    config_class = BCConfig
    config: BCConfig
    uses_noise = False

    def __init__(self, config: BCConfig) -> None:
        super().__init__(config)
        self.head = mlp(config.cond_embed_dim, config.hidden_dim, self.chunk_dim, config.depth)

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        obs_n, _, x_clean = self.unpack(batch)
        return F.mse_loss(self.head(self.cond_encoder(obs_n)), x_clean)

    def sample_normalized(self, obs_n: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.head(self.cond_encoder(obs_n))
        return self.to_chunk(x), torch.zeros(x.shape[0], device=x.device)
