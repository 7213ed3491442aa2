"""KDM: one-step distillation through a linear Koopman operator in a learned latent space.

Noise encoder E_T, clean-sample encoder E_0 and decoder D are MLPs with Swish (as KDM's low-dimensional
nets). The operator is full (``z0 = K zT + b``) or decomposed (``P Λ P^-1``, |λ| < 1). The observation
conditions the map as a control term, ``z0 = K zT + B φ(obs)``, KDM's label term with a learned
observation embedding φ in place of the label. Training uses KDM's three losses with Gaussian latent
noise (σ = 0.4), all weighted 1:

    MSE(E_0(x0), K(E_T(xT) + ε) + Bφ) + MSE(x0, D(E_0(x0) + ε)) + MSE(x0, D(K(E_T(xT) + ε) + Bφ))

plus the eigen (inverse-consistency) loss for the decomposed operator.

Out-of-distribution score (a choice, measured in the evaluation): the relative latent residual
``|E_0(D(ẑ0)) - ẑ0|² / |ẑ0|²``. Training makes E_0∘D the identity on the latent states the operator
reaches for in-distribution observations, so a large residual flags an input the student was not
distilled on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from koopman_policy.modeling.koopman import DecomposedOperator, FullOperator
from koopman_policy.modeling.layers import mlp
from koopman_policy.students.common import OneStepStudent, StudentConfig


@dataclass
class KoopmanConfig(StudentConfig):
    latent_dim: int = 128
    encoder_depth: int = 4
    decoder_depth: int = 4
    latent_noise: float = 0.4
    operator_loss_weight: float = 1.0


@dataclass
class KDMConfig(KoopmanConfig):
    operator: str = "full"  # "full" or "decomposed"


class KoopmanStudent(OneStepStudent):
    """Encoders, control term, losses and OOD residual shared by KDM and the dynamic Koopman student."""

    config: KoopmanConfig

    def __init__(self, config: KoopmanConfig) -> None:
        super().__init__(config)
        c = config
        self.enc_noise = mlp(self.chunk_dim, c.hidden_dim, c.latent_dim, c.encoder_depth)
        self.enc_clean = mlp(self.chunk_dim, c.hidden_dim, c.latent_dim, c.encoder_depth)
        self.decoder = mlp(c.latent_dim, c.hidden_dim, self.chunk_dim, c.decoder_depth)
        self.control = nn.Linear(c.cond_embed_dim, c.latent_dim, bias=False)

    def propagate(self, z_noise: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def operator_regularizer(self) -> torch.Tensor:
        raise NotImplementedError

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        obs_n, x_noise, x_clean = self.unpack(batch)
        sigma = self.config.latent_noise
        cond = self.cond_encoder(obs_n)
        z_clean = self.enc_clean(x_clean)
        z_noise = self.enc_noise(x_noise)
        z_pred = self.propagate(z_noise + sigma * torch.randn_like(z_noise), cond)
        latent = F.mse_loss(z_pred, z_clean)
        recon = F.mse_loss(self.decoder(z_clean + sigma * torch.randn_like(z_clean)), x_clean)
        predict = F.mse_loss(self.decoder(z_pred), x_clean)
        return latent + recon + predict + self.config.operator_loss_weight * self.operator_regularizer()

    def sample_normalized(self, obs_n: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cond = self.cond_encoder(obs_n)
        z = self.propagate(self.enc_noise(noise.flatten(1)), cond)
        x = self.decoder(z)
        residual = (self.enc_clean(x) - z).pow(2).sum(-1) / z.pow(2).sum(-1).clamp_min(1e-6)
        return self.to_chunk(x), residual


class KDMPolicy(KoopmanStudent):
    method = "kdm"
    config_class = KDMConfig
    config: KDMConfig

    def __init__(self, config: KDMConfig) -> None:
        super().__init__(config)
        if config.operator == "full":
            self.operator: nn.Module = FullOperator(config.latent_dim)
        elif config.operator == "decomposed":
            self.operator = DecomposedOperator(config.latent_dim)
        else:
            raise ValueError(f"kdm: operator must be 'full' or 'decomposed', got {config.operator!r}")

    def propagate(self, z_noise: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.operator(z_noise) + self.control(cond)

    def operator_regularizer(self) -> torch.Tensor:
        return self.operator.regularizer()
