"""The multi-step diffusion teacher (Diffusion Policy, low-dimensional variant).

Choices, as in Diffusion Policy's low-dim Push-T setting unless noted: DDPM with 100 training steps and the
``squaredcos_cap_v2`` schedule, epsilon prediction, clipped samples, observation history as global FiLM
conditioning of a 1-D temporal U-Net. Channel sizes default to (32, 64, 128) instead of (256, 512, 1024)
so that the teacher trains on two CPU cores in minutes; the EMA copy is kept by the training loop. The
schedulers are diffusers' (DDPM for ancestral sampling, DDIM with eta = 0 for the deterministic
probability-flow sampler whose trajectories the students distil).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn
from torch.nn import functional as F

from koopman_policy.base import BasePolicy, PolicyConfig
from koopman_policy.modeling.unet1d import ConditionalUnet1D, UnetConfig


@dataclass
class DiffusionConfig(PolicyConfig, UnetConfig):
    beta_schedule: str = "squaredcos_cap_v2"
    clip_sample: bool = True
    sampler: str = "ddpm"  # "ddpm" (ancestral, num_train_timesteps steps) or "ddim" (deterministic)
    num_inference_steps: int = 100


@dataclass
class Trajectory:
    """A deterministic (DDIM, eta = 0) sampling trajectory in normalised action space.

    ``states[k]`` is the sample after ``k`` solver steps, ``states[0]`` the initial noise x_T and
    ``states[-1]`` the final chunk x_0; ``timesteps[k]`` is the diffusion step at which ``states[k]``
    lives (``-1`` marks the clean end point).
    """

    states: torch.Tensor  # (B, K + 1, H, Da)
    timesteps: torch.Tensor  # (K + 1,)


def refine_start(progress: float, num_steps: int) -> int:
    """The DDIM-``num_steps`` step at which a chunk re-enters the path at ``progress`` (``ddim_refine``); a progress
    that leaves no step before or after it is a ValueError, checked by the commands before any work."""
    k = progress * num_steps
    if not (math.isfinite(k) and 0 < round(k) < num_steps):
        raise ValueError(f"teacher: refine progress {progress} leaves no step of DDIM-{num_steps} to take "
                         f"(it must lie within (0, 1) by at least 1/{num_steps})")
    return round(k)


class DiffusionPolicy(BasePolicy):
    method = "teacher"
    config_class = DiffusionConfig
    config: DiffusionConfig

    def __init__(self, config: DiffusionConfig) -> None:
        super().__init__(config)
        if config.sampler not in ("ddpm", "ddim"):
            raise ValueError(f"teacher: sampler must be 'ddpm' or 'ddim', got {config.sampler!r}")
        self.model = ConditionalUnet1D.from_config(config.action_dim, self.cond_dim, config)
        sched = dict(
            num_train_timesteps=config.num_train_timesteps,
            beta_schedule=config.beta_schedule,
            clip_sample=config.clip_sample,
            prediction_type="epsilon",
        )
        self.ddpm = DDPMScheduler(**sched)
        self.ddim = DDIMScheduler(**sched, set_alpha_to_one=True, steps_offset=0)

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Epsilon-prediction loss; ``batch`` holds raw ``obs`` (B, To, Do) and ``action`` (B, H, Da)."""
        obs_n = self.encode_obs(batch["obs"])
        x0 = self.action_normalizer.normalize(batch["action"])
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
        noisy = self.ddpm.add_noise(x0, noise, t)
        return F.mse_loss(self.model(noisy, t, obs_n), noise)

    def sample_normalized(self, obs_n: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        if c.sampler == "ddim":
            x0 = self.ddim_trajectory(obs_n, noise, c.num_inference_steps).states[:, -1]
        else:
            x0 = self.ddpm_sample(obs_n, noise)
        return x0, torch.zeros(x0.shape[0])

    def ddpm_sample(self, obs_n: torch.Tensor, noise: torch.Tensor, generator: torch.Generator | None = None):
        """Ancestral DDPM over every training step (the reference teacher, DDPM-100)."""
        self.ddpm.set_timesteps(self.config.num_train_timesteps)
        x = noise
        for t in self.ddpm.timesteps:
            eps = self.model(x, t, obs_n)
            x = self.ddpm.step(eps, t, x, generator=generator).prev_sample
        return x

    def ddim_trajectory(self, obs_n: torch.Tensor, noise: torch.Tensor, num_steps: int) -> Trajectory:
        """Deterministic DDIM (eta = 0): a discretisation of the probability-flow ODE."""
        self.ddim.set_timesteps(num_steps)
        x = noise
        states = [x]
        for t in self.ddim.timesteps:
            eps = self.model(x, t, obs_n)
            x = self.ddim.step(eps, t, x, eta=0.0).prev_sample
            states.append(x)
        timesteps = torch.cat([self.ddim.timesteps.long(), torch.tensor([-1])])
        return Trajectory(torch.stack(states, dim=1), timesteps)

    def ddim_refine(self, obs_n: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, num_steps: int,
                    progress: float) -> torch.Tensor:
        """A chunk ``x0`` put back on the DDIM-``num_steps`` path at ``progress`` with its own noise
        (``sqrt(ᾱ) x0 + sqrt(1 - ᾱ) x_T``, ᾱ the noise level there) and denoised over the remaining steps.

        What a one-step student's chunk becomes when the teacher finishes it: the low-noise end of the path,
        where the teacher is most accurate, corrects the student's error (``teacher-data --refine``).
        """
        self.ddim.set_timesteps(num_steps)
        timesteps = self.ddim.timesteps[refine_start(progress, num_steps):]
        alpha_bar = self.ddim.alphas_cumprod[timesteps[0]]
        x = alpha_bar.sqrt() * x0 + (1.0 - alpha_bar).sqrt() * noise
        for t in timesteps:
            x = self.ddim.step(self.model(x, t, obs_n), t, x, eta=0.0).prev_sample
        return x

    def denoiser_module(self) -> nn.Module:
        return TeacherDenoiser(self)


class TeacherDenoiser(nn.Module):
    """The U-Net alone, raw observations in: what an ONNX denoiser loop calls once per step."""

    def __init__(self, policy: DiffusionPolicy) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        obs_n = self.policy.encode_obs(obs)
        return self.policy.model(sample, timestep, obs_n)
