"""Small shared layers: MLPs and timestep embeddings."""

from __future__ import annotations

import math

import torch
from torch import nn


def mlp(in_dim: int, hidden: int, out_dim: int, depth: int, act: type[nn.Module] = nn.SiLU) -> nn.Sequential:
    """``depth`` hidden layers of width ``hidden`` with Swish (SiLU), as in KDM's low-dimensional nets."""
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(depth):
        layers += [nn.Linear(dim, hidden), act()]
        dim = hidden
    layers.append(nn.Linear(dim, out_dim))
    return nn.Sequential(*layers)


class SinusoidalEmbedding(nn.Module):
    """Transformer-style embedding of a scalar time.

    ``scale`` stretches the input first: diffusion steps (0..99) need none, while a progress ``s`` in [0, 1]
    needs ``scale`` ~ 100, or every frequency sees an angle near zero and all times embed alike.
    """

    def __init__(self, dim: int, max_period: float = 10_000.0, scale: float = 1.0) -> None:
        super().__init__()
        half = dim // 2
        freqs = scale * torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        args = t.float().reshape(-1, 1) * self.freqs.reshape(1, -1)
        return torch.cat([args.sin(), args.cos()], dim=-1)
