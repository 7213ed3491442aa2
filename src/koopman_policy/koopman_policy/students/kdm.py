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

``obs_in: all`` (a structural change, for Push-T): the observation embedding also enters both encoders and the
decoder beside the chunk or latent, so the operator propagates a latent already conditioned on the state. With
the control term alone the students miss even the mean push at an observation (``koopman-distill fidelity`` on
held-out teacher histories, normalised units: dkoopman's chunk averaged over noises 0.197 from the teacher's,
behaviour cloning's 0.045); with ``all`` 0.037. ``latent_noise``: KDM's σ = 0.4 is 13 times the spread of the
teacher's chunks over noises in the clean latent (0.03 per dimension, against 0.33 over observations), so the
decoder learns to ignore which push the noise chose; σ = 0 raised dkoopman's spread over noises from 0.20 to
0.49 of the teacher's. Both together: paired error 0.319 -> 0.059, Push-T mean max coverage 0.119 -> 0.364
(seeds 2000-2049; docs/experiments.md, "Push-T").

``encoder: unet`` (a structural change, shipped in Push-T's dkoopman, where the MLP encoders above average the
pushes: 0.09–0.10 mean max coverage against the teacher's 0.69, results/eval_pusht.json): E_T and E_0 are the
teacher's U-Net up to its output block, read at the last and the first diffusion step and started from the
teacher's weights; D is that output block; the latent is its (channels x horizon) feature map; the operator (here
and in dkoopman) starts at the identity with no control term, so the untrained student is the teacher's network
called once, the start that made oneflow work on Push-T. The latent residual would need a second U-Net call, so
this variant reports no OOD score (as oneflow). Measured on Push-T (dkoopman, σ = 0, 6000 steps): paired error to
the teacher 0.030 on held-out histories (the MLP students' 0.059, oneflow's 0.038) and 0.493 mean max coverage on
the choice seeds 2000-2049 on the DDIM-30 chunks; on its own chunks finished by the teacher (below) 0.660 on seeds
2000-2099 against the MLP dkoopman's 0.571, at 0.88 ms per decision on one core (oneflow 0.78, the MLP dkoopman
0.13, ``koopman-distill bench`` on an idle machine; an earlier run of it gave 1.59 and 1.26 ms).

``spread_loss_weight`` (measured on Push-T, off in the shipped students): an energy score (``energy_score``)
beside KDM's losses, for students whose chunks vary less over the noise than the teacher's (0.75 of its variance).
At weight 0.3 the spread rose to 0.81 and the paired error from 0.059 to 0.076, mean max coverage 0.460 against
0.418 on seeds 2000-2099 (within the noise of 100 episodes); at 1.0 spread 0.81, paired 0.122, coverage 0.323.

What the shipped Push-T Koopman students learn (a change of target, not of structure): the chunk a first student
of the same recipe produces for each noise, finished by the teacher from progress 0.7 of its DDIM-30 path
(``koopman-distill teacher-data --refine``). For the MLP dkoopman that composite scores 0.736 on seeds 2000-2099,
above the teacher's own DDIM-30 (0.654); the MLP dkoopman trained on it 0.571 against 0.418, its spread 1.01 of the
teacher's; a second round 0.579; the U-Net dkoopman 0.660 (docs/experiments.md, "Koopman students on Push-T").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from koopman_policy.base import BasePolicy
from koopman_policy.modeling.koopman import DecomposedOperator, FullOperator
from koopman_policy.modeling.layers import mlp
from koopman_policy.modeling.unet1d import ConditionalUnet1D, UnetConfig
from koopman_policy.students.common import OneStepStudent, StudentConfig, load_teacher_unet

ENCODERS = ("mlp", "unet")
OBS_INPUTS = ("control", "all")


@dataclass
class KoopmanConfig(StudentConfig, UnetConfig):
    latent_dim: int = 128  # the MLP encoders'; the U-Net's latent is down_dims[0] x horizon
    encoder_depth: int = 4
    decoder_depth: int = 4
    latent_noise: float = 0.4
    operator_loss_weight: float = 1.0
    encoder: str = "mlp"  # "mlp" or "unet" (the teacher's U-Net features, see the module docstring)
    obs_in: str = "control"  # MLP encoders: "control" (KDM's control term only) or "all" (see the module docstring)
    teacher_init: bool = True  # U-Net encoder only, as are the UnetConfig fields (the teacher's defaults)
    spread_loss_weight: float = 0.0  # the energy-score term (see the module docstring); 0 = KDM's losses only


@dataclass
class KDMConfig(KoopmanConfig):
    operator: str = "full"  # "full" or "decomposed"


def energy_score(free: torch.Tensor, other: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``|free - target| - |free - other| / 2`` per row, averaged, in per-dimension RMS units.

    ``free`` is a student chunk at a noise drawn independently of ``target`` (the teacher's chunk at the same
    observation) and ``other`` a second student chunk at another noise: an unbiased estimate of the energy score,
    a proper scoring rule, whose expectation is least when the student's chunks over noises are distributed as
    the teacher's. The square root is smoothed so that its gradient stays finite at zero.
    """

    def dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return ((a - b).pow(2).mean(-1) + 1e-8).sqrt()

    return (dist(free, target) - 0.5 * dist(free, other)).mean()


class KoopmanStudent(OneStepStudent):
    """Encoders, control term, losses and OOD residual shared by KDM and the dynamic Koopman student."""

    config: KoopmanConfig

    def __init__(self, config: KoopmanConfig) -> None:
        super().__init__(config)
        c = config
        if c.encoder not in ENCODERS:
            raise ValueError(f"{self.method}: encoder must be one of {ENCODERS}, got {c.encoder!r}")
        if c.obs_in not in OBS_INPUTS:
            raise ValueError(f"{self.method}: obs_in must be one of {OBS_INPUTS}, got {c.obs_in!r}")
        if not math.isfinite(c.spread_loss_weight) or c.spread_loss_weight < 0:
            raise ValueError(f"{self.method}: spread_loss_weight must be finite and >= 0, got {c.spread_loss_weight!r}")
        if c.encoder == "unet":
            self.cond_encoder = nn.Identity()  # the U-Net's FiLM layers read the normalised history itself
            self.unet = ConditionalUnet1D.from_config(c.action_dim, self.cond_dim, c)
        else:
            extra = c.cond_embed_dim if c.obs_in == "all" else 0
            self.enc_noise = mlp(self.chunk_dim + extra, c.hidden_dim, c.latent_dim, c.encoder_depth)
            self.enc_clean = mlp(self.chunk_dim + extra, c.hidden_dim, c.latent_dim, c.encoder_depth)
            self.decoder = mlp(c.latent_dim + extra, c.hidden_dim, self.chunk_dim, c.decoder_depth)
        self.control = nn.Linear(self.cond_width, self.latent_size, bias=False)
        if c.encoder == "unet":
            nn.init.zeros_(self.control.weight)  # start as the teacher's network: no control term yet

    @property
    def latent_size(self) -> int:
        c = self.config
        return c.down_dims[0] * c.horizon if c.encoder == "unet" else c.latent_dim

    @property
    def cond_width(self) -> int:
        """Width of the observation conditioning the operator and the control term read."""
        return self.cond_dim if self.config.encoder == "unet" else self.config.cond_embed_dim

    @property
    def has_ood_score(self) -> bool:
        """The latent residual needs a second encoder pass: cheap for the MLPs, a second U-Net call (twice the
        latency) for the U-Net encoder, which therefore reports no score."""
        return self.config.encoder == "mlp"

    def init_from_teacher(self, teacher: BasePolicy) -> bool:
        """Start the U-Net encoder and head from the teacher's denoiser; the MLPs have nothing to take."""
        if self.config.encoder != "unet" or not self.config.teacher_init:
            return False
        return load_teacher_unet(self.unet, teacher, self.method)

    def encode_noise(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """E_T: flat noise ``(B, H*Da)`` -> latent; the U-Net reads it at the last diffusion step."""
        if self.config.encoder == "unet":
            return self._unet_features(x, self.config.num_train_timesteps - 1, cond)
        return self.enc_noise(self._with_obs(x, cond))

    def encode_clean(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """E_0: flat clean chunk -> latent; the U-Net reads it at diffusion step 0."""
        if self.config.encoder == "unet":
            return self._unet_features(x, 0, cond)
        return self.enc_clean(self._with_obs(x, cond))

    def decode(self, z: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """D: latent -> flat chunk; for the U-Net encoder its output block (a light action head)."""
        if self.config.encoder == "unet":
            return self.unet.head(z.unflatten(-1, (self.config.down_dims[0], self.config.horizon))).flatten(1)
        return self.decoder(self._with_obs(z, cond))

    def _with_obs(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The MLP's input, with the observation embedding beside it when ``obs_in`` is "all"."""
        return torch.cat([x, cond], dim=-1) if self.config.obs_in == "all" else x

    def _unet_features(self, x: torch.Tensor, step: int, cond: torch.Tensor) -> torch.Tensor:
        t = torch.full_like(x[:, 0], step)  # batch-sized from the data: the ONNX graph keeps the batch axis
        return self.unet.features(self.to_chunk(x), t, cond).flatten(1)

    def propagate(self, z_noise: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def operator_regularizer(self) -> torch.Tensor:
        raise NotImplementedError

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        obs_n, x_noise, x_clean = self.unpack(batch)
        sigma = self.config.latent_noise
        cond = self.cond_encoder(obs_n)
        z_clean = self.encode_clean(x_clean, cond)
        z_noise = self.encode_noise(x_noise, cond)
        z_pred = self.propagate(z_noise + sigma * torch.randn_like(z_noise), cond)
        latent = F.mse_loss(z_pred, z_clean)
        recon = F.mse_loss(self.decode(z_clean + sigma * torch.randn_like(z_clean), cond), x_clean)
        x_pred = self.decode(z_pred, cond)
        predict = F.mse_loss(x_pred, x_clean)
        loss = latent + recon + predict + self.config.operator_loss_weight * self.operator_regularizer()
        if self.config.spread_loss_weight > 0:
            z_free = self.propagate(self.encode_noise(torch.randn_like(x_noise), cond), cond)
            loss = loss + self.config.spread_loss_weight * energy_score(self.decode(z_free, cond), x_pred, x_clean)
        return loss

    def sample_normalized(self, obs_n: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cond = self.cond_encoder(obs_n)
        flat = noise.flatten(1)
        z = self.propagate(self.encode_noise(flat, cond), cond)
        x = self.decode(z, cond)
        if not self.has_ood_score:  # zeros shaped from the input, so that the ONNX graph keeps the batch axis
            return self.to_chunk(x), torch.zeros_like(flat[:, 0])
        residual = (self.encode_clean(x, cond) - z).pow(2).sum(-1) / z.pow(2).sum(-1).clamp_min(1e-6)
        return self.to_chunk(x), residual


class KDMPolicy(KoopmanStudent):
    method = "kdm"
    config_class = KDMConfig
    config: KDMConfig

    def __init__(self, config: KDMConfig) -> None:
        super().__init__(config)
        if config.operator == "full":
            self.operator: FullOperator | DecomposedOperator = FullOperator(self.latent_size)
        elif config.operator == "decomposed":
            self.operator = DecomposedOperator(self.latent_size)
        else:
            raise ValueError(f"kdm: operator must be 'full' or 'decomposed', got {config.operator!r}")
        if config.encoder == "unet":
            self.operator.start_near_identity()

    def propagate(self, z_noise: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.operator(z_noise) + self.control(cond)

    def operator_regularizer(self) -> torch.Tensor:
        return self.operator.regularizer()
