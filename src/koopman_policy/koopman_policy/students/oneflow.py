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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from koopman_policy.base import BasePolicy
from koopman_policy.modeling.layers import SinusoidalEmbedding, mlp
from koopman_policy.modeling.unet1d import ConditionalUnet1D, UnetConfig
from koopman_policy.students.common import OneStepStudent, StudentConfig

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
        try:
            self.unet.load_state_dict(teacher.model.state_dict())
        except (AttributeError, RuntimeError) as err:
            raise ValueError(f"oneflow: the U-Net backbone cannot start from this teacher ({err}); "
                             "set down_dims/kernel_size/n_groups/step_embed_dim to the teacher's, "
                             "or teacher_init=false") from None
        return True

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

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        obs_n, x_noise, x_clean = self.unpack(batch)
        states = batch["states"].flatten(2)
        steps = states.shape[1] - 1
        cond = self.cond_encoder(obs_n)
        k = torch.randint(0, steps, (states.shape[0],), device=states.device)
        s = k.float() / steps
        x_s = states[torch.arange(states.shape[0]), k]
        zero = torch.zeros_like(s)
        # One pass for both terms: the path points at progress s, and the noise itself at progress 0.
        ends = self.step(torch.cat([x_s, x_noise]), torch.cat([s, zero]), torch.cat([cond, cond]))
        n = x_s.shape[0]
        flow = F.mse_loss(ends[:n], x_clean)  # = |(1 - s)(u - u*)|², u* the secant velocity
        terminal = F.mse_loss(ends[n:], x_clean)
        loss = flow + self.config.terminal_loss_weight * terminal
        if self.config.demo_loss_weight > 0:
            if "demo_obs" not in batch:
                raise ValueError("oneflow: demo_loss_weight > 0 needs demonstration windows in the batch "
                                 "(koopman-distill student --demos)")
            loss = loss + self.config.demo_loss_weight * self.demo_loss(batch["demo_obs"], batch["demo_action"])
        return loss

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
