"""Koopman operators acting on a latent vector.

``FullOperator`` is KDM's unconstrained ``z0 = K zT + b``. ``DecomposedOperator`` is KDM's ``K = P Λ P^-1``
with complex-conjugate eigenpairs ``λ = exp(-exp(ν)) · exp(i · exp(θ))`` (so ``|λ| < 1``), realised as 2x2
rotation-scaling blocks on the modal coordinates. ``FactorizedDynamicOperator`` is the dynamic Koopman layer:
the same factorisation whose modal gains depend on the current latent state and the observation,
``K(z, s) = P diag(λ ⊙ g(z, s)) P^-1``.
"""

from __future__ import annotations

import torch
from torch import nn

from koopman_policy.modeling.layers import mlp


class FullOperator(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.linear(z)

    def regularizer(self) -> torch.Tensor:
        return self.linear.weight.new_zeros(())

    @torch.no_grad()
    def start_near_identity(self) -> None:
        """K = I, b = 0: a student whose encoder and head come from a trained network starts as that network."""
        self.linear.weight.copy_(torch.eye(self.linear.in_features))
        self.linear.bias.zero_()


class _ModalFactorization(nn.Module):
    """P, P^-1 and the eigenvalue parameters shared by the two factorised operators."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"a factorised Koopman operator needs an even latent size, got {dim}")
        modes = dim // 2
        p = torch.linalg.qr(torch.randn(dim, dim))[0]
        self.P = nn.Parameter(p)
        self.P_inv = nn.Parameter(p.T.clone())
        # |λ| = exp(-exp(ν)) starts near 0.9, angles small: a slightly contracting, slowly rotating flow.
        self.nu = nn.Parameter(torch.full((modes,), -2.25) + 0.1 * torch.randn(modes))
        self.theta = nn.Parameter(torch.log(torch.rand(modes) * 0.5 + 1e-2))

    @torch.no_grad()
    def start_near_identity(self) -> None:
        """|λ| = exp(-exp(-4)) ≈ 0.98 and angles ≈ 0.0025 rad: K ≈ 0.98 I (see ``FullOperator``'s)."""
        self.nu.fill_(-4.0)
        self.theta.fill_(-6.0)

    def radius_angle(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.exp(-torch.exp(self.nu)), torch.exp(self.theta)

    def apply(self, z: torch.Tensor, radius: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
        """``P · blockdiag(r_k R(θ_k)) · P^-1 · z``; ``radius`` may carry a batch dimension."""
        m = (z @ self.P_inv.T).unflatten(-1, (-1, 2))
        a, b = m[..., 0], m[..., 1]
        cos, sin = torch.cos(angle), torch.sin(angle)
        rotated = torch.stack([cos * a - sin * b, sin * a + cos * b], dim=-1) * radius.unsqueeze(-1)
        return rotated.flatten(-2) @ self.P.T

    def inverse_consistency(self) -> torch.Tensor:
        eye = torch.eye(self.P.shape[0], device=self.P.device)
        return ((self.P_inv @ self.P - eye) ** 2).mean() + ((self.P @ self.P_inv - eye) ** 2).mean()


class DecomposedOperator(_ModalFactorization):
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        radius, angle = self.radius_angle()
        return self.apply(z, radius, angle)

    def regularizer(self) -> torch.Tensor:
        return self.inverse_consistency()


class FactorizedDynamicOperator(_ModalFactorization):
    """State-dependent modal gains ``g(z, s) ∈ (0, 2)`` scale each eigenvalue's radius.

    The spectral regulariser penalises effective radii ``|λ_k| g_k`` above one, so that one (or J)
    applications stay contracting where the data do not ask otherwise.
    """

    def __init__(self, dim: int, cond_dim: int, gain_hidden: int = 128) -> None:
        super().__init__(dim)
        self.gain_net = mlp(dim + cond_dim, gain_hidden, dim // 2, depth=1)
        nn.init.zeros_(self.gain_net[-1].weight)
        nn.init.zeros_(self.gain_net[-1].bias)
        self._last_radius: torch.Tensor | None = None

    def forward(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        radius, angle = self.radius_angle()
        gains = 2.0 * torch.sigmoid(self.gain_net(torch.cat([z, cond], dim=-1)))
        effective = radius * gains
        self._last_radius = effective
        return self.apply(z, effective, angle)

    def regularizer(self) -> torch.Tensor:
        spectral = torch.relu(self._last_radius - 1.0).pow(2).mean() if self._last_radius is not None else 0.0
        return self.inverse_consistency() + spectral
