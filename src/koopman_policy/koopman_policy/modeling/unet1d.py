"""1-D temporal U-Net with FiLM conditioning, the Diffusion Policy denoiser.

The action chunk is a sequence of ``horizon`` steps with ``action_dim`` channels; the diffusion step and
the flattened observation history condition every residual block through a per-channel scale and bias.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

from koopman_policy.modeling.layers import SinusoidalEmbedding


@dataclass
class UnetConfig:
    """The denoiser's architecture and the diffusion steps its step embedding reads: the fields the teacher's
    config and a student built on the teacher's network share, so that one can take the other's weights."""

    down_dims: tuple[int, ...] = (32, 64, 128)
    kernel_size: int = 5
    n_groups: int = 8
    step_embed_dim: int = 64
    num_train_timesteps: int = 100


class ConvNormMish(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int, groups: int) -> None:
        super().__init__(nn.Conv1d(cin, cout, kernel, padding=kernel // 2), nn.GroupNorm(groups, cout), nn.Mish())


class FiLMResBlock(nn.Module):
    """Two conv blocks; the condition predicts a scale and a bias for the first one's output."""

    def __init__(self, cin: int, cout: int, cond_dim: int, kernel: int, groups: int) -> None:
        super().__init__()
        self.block1 = ConvNormMish(cin, cout, kernel, groups)
        self.block2 = ConvNormMish(cout, cout, kernel, groups)
        self.film = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, 2 * cout))
        self.skip = nn.Conv1d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, bias = self.film(cond).unsqueeze(-1).chunk(2, dim=1)
        h = self.block1(x) * scale + bias
        return self.block2(h) + self.skip(x)


class ConditionalUnet1D(nn.Module):
    """Denoiser ``eps(x_t, t, cond)`` over chunks shaped ``(B, horizon, action_dim)``."""

    def __init__(
        self,
        action_dim: int,
        cond_dim: int,
        down_dims: tuple[int, ...] = (64, 128, 256),
        kernel_size: int = 5,
        n_groups: int = 8,
        step_embed_dim: int = 64,
    ) -> None:
        super().__init__()
        self.step_embed = nn.Sequential(
            SinusoidalEmbedding(step_embed_dim),
            nn.Linear(step_embed_dim, 4 * step_embed_dim),
            nn.Mish(),
            nn.Linear(4 * step_embed_dim, step_embed_dim),
        )
        film_dim = step_embed_dim + cond_dim
        dims = [action_dim, *down_dims]
        block = lambda cin, cout: FiLMResBlock(cin, cout, film_dim, kernel_size, n_groups)  # noqa: E731
        self.down = nn.ModuleList()
        for i, (cin, cout) in enumerate(itertools.pairwise(dims)):
            last = i == len(down_dims) - 1
            self.down.append(
                nn.ModuleList(
                    [block(cin, cout), block(cout, cout), nn.Identity() if last else nn.Conv1d(cout, cout, 3, 2, 1)]
                )
            )
        mid = down_dims[-1]
        self.mid = nn.ModuleList([block(mid, mid), block(mid, mid)])
        self.up = nn.ModuleList(
            nn.ModuleList([block(2 * cin, cout), block(cout, cout), nn.ConvTranspose1d(cout, cout, 4, 2, 1)])
            for cout, cin in zip(reversed(down_dims[:-1]), reversed(down_dims[1:]), strict=True)
        )
        self.final = nn.Sequential(
            ConvNormMish(down_dims[0], down_dims[0], kernel_size, n_groups), nn.Conv1d(down_dims[0], action_dim, 1)
        )

    @classmethod
    def from_config(cls, action_dim: int, cond_dim: int, config: UnetConfig) -> ConditionalUnet1D:
        return cls(action_dim, cond_dim, down_dims=tuple(config.down_dims), kernel_size=config.kernel_size,
                   n_groups=config.n_groups, step_embed_dim=config.step_embed_dim)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(sample, timestep, cond))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        """The output block: features ``(B, down_dims[0], horizon)`` -> ``(B, horizon, action_dim)``."""
        return self.final(features).transpose(1, 2)

    def features(self, sample: torch.Tensor, timestep: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Everything before the output block: ``(B, down_dims[0], horizon)`` (a Koopman student's latent)."""
        if timestep.dim() == 0:
            timestep = timestep.expand(sample.shape[0])
        film = torch.cat([self.step_embed(timestep), cond], dim=-1)
        x = sample.transpose(1, 2)
        skips = []
        for res1, res2, downsample in self.down:
            x = res2(res1(x, film), film)
            skips.append(x)
            x = downsample(x)
        skips.pop(0)  # the finest level's features reach the output through the up path
        for res in self.mid:
            x = res(x, film)
        for res1, res2, upsample in self.up:
            x = torch.cat([x, skips.pop()], dim=1)
            x = upsample(res2(res1(x, film), film))
        return x
