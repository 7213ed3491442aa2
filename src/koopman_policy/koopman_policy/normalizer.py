"""Per-dimension min-max normalisation to [-1, 1], stored inside each policy.

Keeping the statistics as buffers of the policy (not of the dataset) means a checkpoint or an
ONNX export carries everything needed to turn raw observations into actions.
"""

from __future__ import annotations

import torch
from torch import nn

_MIN_RANGE = 1e-4


class Normalizer(nn.Module):
    """Maps raw values to [-1, 1] per dimension; constant dimensions map to 0.

    A dimension whose range is below ``_MIN_RANGE`` (for example the pillar height, fixed by the task)
    keeps unit scale around its midpoint so that noise on it is not amplified.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("scale", torch.ones(dim))
        self.register_buffer("offset", torch.zeros(dim))

    @torch.no_grad()
    def fit(self, data: torch.Tensor) -> Normalizer:
        flat = data.reshape(-1, data.shape[-1]).float()
        lo, hi = flat.min(0).values, flat.max(0).values
        span = hi - lo
        wide = span > _MIN_RANGE
        scale = torch.where(wide, 2.0 / span.clamp_min(_MIN_RANGE), torch.ones_like(span))
        mid = (hi + lo) / 2
        self.scale.copy_(scale)
        self.offset.copy_(-mid * scale)
        return self

    def set_stats(self, low: torch.Tensor, high: torch.Tensor) -> Normalizer:
        """Fit from explicit bounds, as stored in a model's metadata."""
        return self.fit(torch.stack([torch.as_tensor(low), torch.as_tensor(high)]))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.offset

    def unnormalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.offset) / self.scale

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw values that map to -1 and +1."""
        return self.unnormalize(-torch.ones_like(self.scale)), self.unnormalize(torch.ones_like(self.scale))
