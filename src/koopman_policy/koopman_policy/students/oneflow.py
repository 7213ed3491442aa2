"""OneFlow-DP style student: a velocity field aligned with the teacher's probability-flow ODE.

The paper is brief on the parametrisation; the choices made here. The student's field ``u(x, s, obs)`` is
the secant velocity of the teacher's PF-ODE (its deterministic DDIM trajectory, progress ``s`` in [0, 1])
from a point ``x_s`` to the trajectory's end, so that one Euler step ``x_s + (1 - s) u`` lands on the
teacher's chunk. It is parametrised through the end point, ``x_s + (1 - s) u = s x_s + (1 - s) F(x_s, s, obs)``
(``u = F - x_s``): a plain MLP asked for ``u`` directly must cancel the noise it is given to the last digit,
and what it fails to cancel leaks into the actions as jitter (measured on the Gen3 task: chunk MSE to the
teacher 0.025 in normalised units and collisions in almost every episode, against 0.0006 in this form).
The flow-matching loss is the velocity error scaled by the remaining time,
``|(1 - s)(u - u*)|²``, at every stored intermediate point of the same trajectories (score alignment along
the path, not only at its ends); the auxiliary terminal action loss is the step taken from the noise itself,
``|x_T + u(x_T, 0) - x_0|²``, the query made at inference. Different noises follow different teacher paths,
which keeps the teacher's modes apart.

Demonstrations (``demo_loss_weight`` > 0). The paper's student exceeds its teacher on Push-T, which the
teacher's paths alone cannot teach, so the terminal step may also be held to the demonstrated chunk: the
teacher's own training data, the other reading of "auxiliary action prediction loss". A plain regression
onto demonstrations would average their modes, as ``bc`` averages the teacher's (0.09 coverage on Push-T),
so the loss is nearest-of-K, implicit maximum likelihood: for each demonstration window the student draws
``demo_draws`` noises, and only the chunk nearest the demonstrated one is pulled toward it. Every
demonstration gets some draw that reaches it, and no draw is asked to reach the average. Off by default: on
Push-T it raised success but not coverage on held-out seeds (README).

Backbone. ``F`` is an MLP over ``[x, obs embedding, time embedding]`` (``backbone: mlp``, the default) or
the teacher's own 1-D U-Net (``backbone: unet``): the paper's student costs what one teacher call does
(2.5 GFLOPs against the teacher's 254.9 for 100 steps), so it is the teacher's network evaluated once.
The U-Net student takes the normalised observation history as its FiLM condition, as the teacher does,
reads progress ``s`` as the teacher's diffusion step ``(1 - s)(T - 1)``, and starts from the teacher's
weights (``teacher_init``): it already knows how the observation shapes the chunk and has to learn
only the jump to the end of the path. Measured on Push-T in the README's table.

Refinement (``refine_steps`` > 0): progressive self-distillation, one step learning what a trained student
does in several (as progressive distillation halves a sampler's steps). A trained student called once more
from its own end point pushes better than in one call: the end point x̂_0 is put back on the path at progress
``s = refine_progress`` with the same noise, ``sqrt(ᾱ_s) x̂_0 + sqrt(1 - ᾱ_s) x_T``, ᾱ_s the noise level the
teacher's DDIM trajectories have at s (``koopman-distill student`` reads it from the teacher data), and the
student jumps to the end again from there. The terminal step of a new student, started from the trained one
(``--init``, frozen as the source), then learns the source's chunk after ``refine_steps`` such jumps, for a
fresh noise every batch at the teacher data's histories. The paper's student exceeds its teacher on
Push-T, which the teacher's paths alone did not teach here. Measured on Push-T (README), seeds 2000-2199,
where s = 0.7 was chosen from 0.3-0.9: the source scores 0.61 in one call, 0.75 in two and 0.76 in three, the
student that learns three calls in one 0.73. Only the one-step query is trained: the path loss is dropped, so
the new student's field at intermediate progress drifts (two calls of a refined student score 0.64 on seeds
2000-2099), and it is no source for a further round.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from koopman_policy.base import BasePolicy
from koopman_policy.modeling.layers import SinusoidalEmbedding, mlp
from koopman_policy.modeling.unet1d import ConditionalUnet1D, UnetConfig
from koopman_policy.students.common import OneStepStudent, StudentConfig, load_teacher_unet

BACKBONES = ("mlp", "unet")


@dataclass
class OneFlowConfig(StudentConfig, UnetConfig):
    depth: int = 4
    time_embed_dim: int = 32
    terminal_loss_weight: float = 1.0
    backbone: str = "mlp"
    teacher_init: bool = True  # U-Net backbone only, as are the UnetConfig fields (the teacher's defaults)
    demo_loss_weight: float = 0.0  # > 0: batches carry demo_obs / demo_action (see the module docstring)
    demo_draws: int = 8
    refine_steps: int = 0  # > 0: learn the --init student's chunk after this many refining jumps (docstring)
    refine_progress: float = 0.7  # progress s at which a refining jump starts


class OneFlowPolicy(OneStepStudent):
    method = "oneflow"
    config_class = OneFlowConfig
    config: OneFlowConfig

    def __init__(self, config: OneFlowConfig) -> None:
        super().__init__(config)
        if config.demo_draws < 1:
            raise ValueError(f"oneflow: demo_draws must be at least 1, got {config.demo_draws}")
        if config.backbone not in BACKBONES:
            raise ValueError(f"oneflow: backbone must be one of {BACKBONES}, got {config.backbone!r}")
        if config.refine_steps < 0 or not 0.0 < config.refine_progress < 1.0:
            raise ValueError(f"oneflow: refine_steps must be >= 0 and refine_progress in (0, 1), got "
                             f"{config.refine_steps} and {config.refine_progress}")
        self._refinement: tuple[OneFlowPolicy, float] | None = None  # a plain attribute: never saved
        if config.backbone == "unet":
            self.cond_encoder = nn.Identity()  # the U-Net's FiLM layers read the normalised history itself
            self.unet = ConditionalUnet1D.from_config(config.action_dim, self.cond_dim, config)
        else:
            self.time_embed = SinusoidalEmbedding(config.time_embed_dim, max_period=100.0, scale=100.0)
            in_dim = self.chunk_dim + config.cond_embed_dim + config.time_embed_dim
            self.velocity = mlp(in_dim, config.hidden_dim, self.chunk_dim, config.depth)

    def init_from_teacher(self, teacher: BasePolicy) -> bool:
        """Start the U-Net backbone from the teacher's denoiser weights; the MLP has nothing to take."""
        if self.config.backbone != "unet" or not self.config.teacher_init:
            return False
        return load_teacher_unet(self.unet, teacher, self.method)

    def end_point(self, x: torch.Tensor, s: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``F(x, s, obs)``, the chunk the path through ``x`` at progress ``s`` ends on."""
        if self.config.backbone == "unet":
            t = (1.0 - s) * (self.config.num_train_timesteps - 1)
            return self.unet(self.to_chunk(x), t, cond).flatten(1)
        return self.velocity(torch.cat([x, cond, self.time_embed(s)], dim=-1))

    def field(self, x: torch.Tensor, s: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Velocity ``u(x, s) = F(x, s, obs) - x`` (see the module docstring)."""
        return self.end_point(x, s, cond) - x

    def step(self, x: torch.Tensor, s: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """One Euler step from progress ``s`` to the end: ``x + (1 - s) u(x, s)``."""
        return x + (1.0 - s).unsqueeze(-1) * self.field(x, s, cond)

    def attach_refinement_source(self, source: OneFlowPolicy, alpha_bar: float) -> None:
        """Freeze ``source``, the trained student whose refined chunks the terminal step learns; ``alpha_bar``
        is the noise level at ``refine_progress`` (see the module docstring)."""
        if self.config.refine_steps < 1:
            raise ValueError("oneflow: a refinement source is used only with refine_steps > 0")
        if not 0.0 < alpha_bar < 1.0:
            raise ValueError(f"oneflow: alpha_bar must lie in (0, 1), got {alpha_bar}")
        self._refinement = (source.eval().requires_grad_(False), alpha_bar)

    @torch.no_grad()
    def refined_end_point(self, obs_n: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """The source's end point for flat ``noise``, refined by ``refine_steps`` jumps from progress s."""
        if self._refinement is None:
            raise ValueError("oneflow: refine_steps > 0 needs a refinement source "
                             "(koopman-distill student --init, the trained student to refine)")
        source, alpha_bar = self._refinement
        cond = source.cond_encoder(obs_n)
        zero = noise.new_zeros(noise.shape[0])
        s = torch.full_like(zero, self.config.refine_progress)
        x0 = source.step(noise, zero, cond)
        for _ in range(self.config.refine_steps):
            x0 = source.step(alpha_bar**0.5 * x0 + (1.0 - alpha_bar) ** 0.5 * noise, s, cond)
        return x0

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        obs_n, x_noise, x_clean = self.unpack(batch)
        cond = self.cond_encoder(obs_n)
        if self.config.refine_steps > 0:
            noise = torch.randn_like(x_noise)
            target = self.refined_end_point(obs_n, noise)
            loss = F.mse_loss(self.step(noise, noise.new_zeros(noise.shape[0]), cond), target)
        else:
            loss = self.path_loss(batch["states"].flatten(2), cond, x_noise, x_clean)
        if self.config.demo_loss_weight > 0:
            if "demo_obs" not in batch:
                raise ValueError("oneflow: demo_loss_weight > 0 needs demonstration windows in the batch "
                                 "(koopman-distill student --demos)")
            loss = loss + self.config.demo_loss_weight * self.demo_loss(batch["demo_obs"], batch["demo_action"])
        return loss

    def path_loss(self, states: torch.Tensor, cond: torch.Tensor, x_noise: torch.Tensor,
                  x_clean: torch.Tensor) -> torch.Tensor:
        """The flow loss along the teacher's paths ``states (B, K + 1, H*Da)`` plus the weighted terminal step."""
        steps = states.shape[1] - 1
        k = torch.randint(0, steps, (states.shape[0],), device=states.device)
        s = k.float() / steps
        x_s = states[torch.arange(states.shape[0]), k]
        zero = torch.zeros_like(s)
        # One pass for both terms: the path points at progress s, and the noise itself at progress 0.
        ends = self.step(torch.cat([x_s, x_noise]), torch.cat([s, zero]), torch.cat([cond, cond]))
        n = x_s.shape[0]
        flow = F.mse_loss(ends[:n], x_clean)  # = |(1 - s)(u - u*)|², u* the secant velocity
        terminal = F.mse_loss(ends[n:], x_clean)
        return flow + self.config.terminal_loss_weight * terminal

    def demo_loss(self, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Nearest-of-K error to raw demonstrated chunks ``action (B, H, Da)`` for raw histories ``obs``."""
        cond = self.cond_encoder(self.encode_obs(obs))
        target = self.action_normalizer.normalize(action).flatten(1)
        b, k = target.shape[0], self.config.demo_draws
        noise = torch.randn(b * k, self.chunk_dim, device=target.device)
        zero = noise.new_zeros(b * k)
        with torch.no_grad():
            ends = self.step(noise, zero, cond.repeat_interleave(k, 0)).view(b, k, -1)
            nearest = ((ends - target[:, None]) ** 2).sum(-1).argmin(1)
        chosen = noise.view(b, k, -1)[torch.arange(b, device=target.device), nearest]
        return F.mse_loss(self.step(chosen, zero[:b], cond), target)

    def sample_normalized(self, obs_n: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = noise.flatten(1)
        zero = torch.zeros(x.shape[0], device=x.device)
        x = self.step(x, zero, self.cond_encoder(obs_n))
        return self.to_chunk(x), torch.zeros_like(zero)
