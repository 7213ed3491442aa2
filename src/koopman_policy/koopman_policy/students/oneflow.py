"""OneFlow-DP style student: a velocity field aligned with the teacher's probability-flow ODE.

The paper is brief on the parametrisation; the choice made here: the student's field ``u(x, s, obs)`` is
the secant velocity of the teacher's PF-ODE (its deterministic DDIM trajectory) from any intermediate
point ``x_s`` to the trajectory's end, so that one Euler step ``x_s + (1 - s) u(x_s, s)`` lands on the
teacher's chunk. The flow-matching loss trains it at every stored intermediate point of the same
trajectories (score alignment along the path, not only at the end points); the auxiliary terminal action
loss is that same step taken from the noise, ``|x_T + u(x_T, 0) - x_0|²``, the query made at inference.
Different noises are carried along different teacher paths, which keeps the teacher's modes apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from koopman_policy.modeling.layers import SinusoidalEmbedding, mlp
from koopman_policy.students.common import OneStepStudent, StudentConfig


@dataclass
class OneFlowConfig(StudentConfig):
    depth: int = 4
    time_embed_dim: int = 32
    terminal_loss_weight: float = 1.0


class OneFlowPolicy(OneStepStudent):
    method = "oneflow"
    config_class = OneFlowConfig
    config: OneFlowConfig

    def __init__(self, config: OneFlowConfig) -> None:
        super().__init__(config)
        self.time_embed = SinusoidalEmbedding(config.time_embed_dim, max_period=100.0, scale=100.0)
        in_dim = self.chunk_dim + config.cond_embed_dim + config.time_embed_dim
        self.velocity = mlp(in_dim, config.hidden_dim, self.chunk_dim, config.depth)

    def field(self, x: torch.Tensor, s: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.velocity(torch.cat([x, cond, self.time_embed(s)], dim=-1))

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        obs_n, x_noise, x_clean = self.unpack(batch)
        states = batch["states"].flatten(2)
        steps = states.shape[1] - 1
        cond = self.cond_encoder(obs_n)
        k = torch.randint(0, steps, (states.shape[0],), device=states.device)
        s = k.float() / steps
        x_s = states[torch.arange(states.shape[0]), k]
        target = (x_clean - x_s) / (1.0 - s).unsqueeze(-1)
        flow = F.mse_loss(self.field(x_s, s, cond), target)
        zero = torch.zeros(x_noise.shape[0], device=x_noise.device)
        terminal = F.mse_loss(x_noise + self.field(x_noise, zero, cond), x_clean)
        return flow + self.config.terminal_loss_weight * terminal

    def sample_normalized(self, obs_n: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = noise.flatten(1)
        zero = torch.zeros(x.shape[0], device=x.device)
        x = x + self.field(x, zero, self.cond_encoder(obs_n))
        return self.to_chunk(x), torch.zeros_like(zero)
