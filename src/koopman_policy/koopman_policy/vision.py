"""Image-conditioned policies: a small CNN over camera frames plus the joint state.

The camera policies are given neither the target nor the pillar position; they must see them. Their
observation history is a mapping ``{"image": (B, To, H, W, 3), "state": (B, To, state_dim)}``:

* ``image``: RGB frames of a fixed camera (``config.camera``), oldest first, either ``uint8`` or ``float32``
  in [0, 1] (``uint8 / 255``: what ``koopman_control``'s ``ImageNormalizer`` emits with mean 0, std 1). The
  training data keeps ``uint8`` (a quarter of the memory); the exported graph takes the float form.
* ``state``: raw ``[q(7), qd(7)]``, normalised by the policy's ``obs_normalizer`` (``obs_dim`` is the state
  width, ``obs_names`` its names).

Only :meth:`ImageConditioned.encode_obs` reads images, so the image variants of the teacher and of the
dynamic Koopman student reuse their parents' models, losses and samplers unchanged. Per observation step
the conditioning is ``[state_n, keypoints]``.

Encoder (trained from scratch, no ImageNet weights): three 'same'-padded convolutions (5x5 stride 2,
3x3 stride 2, 3x3 stride 1) with GroupNorm and SiLU, then a spatial softmax that turns each of ``keypoints``
feature maps into its expected (x, y) image coordinate. Spatial softmax (as in Levine et al. and
Diffusion Policy's robomimic encoder) keeps *where* things are, which is all this task needs from the
image: target, pillar and hand positions. The two stride-2 layers make it 3.4x cheaper to train than a
single one (59 vs 202 ms per fwd+bwd of 128 64x64 frames on one core of the development VM), with a 16x16
keypoint map whose soft-argmax still resolves sub-cell positions. GroupNorm instead of BatchNorm: no running
statistics, so training and evaluation behave the same and the EMA copy needs no recalibration. No random
crop or shift augmentation: the camera is fixed, and absolute image position *is* the target's position.

Auxiliary read-out (``aux_names``, ``aux_loss_weight``): during training only, a linear head must recover
the target and pillar positions from each frame's keypoints. Trained on the diffusion loss alone, the
encoder left the target's height poorly resolved (a quadratic probe of the first teacher's keypoints: 1.35 cm
mean error in z against a 1.8 cm spread, while success needs the hand within 2 cm), and that teacher reached
the target in 4 % of the episodes. The head is not part of the exported graph and the policy is never
given these values: it still has to see them.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from koopman_policy.base import BasePolicy, ImageExportModule
from koopman_policy.normalizer import Normalizer
from koopman_policy.onnx_format import IMAGE_LAYOUT, IMAGE_POLICY_INPUTS, STATE_LAYOUT
from koopman_policy.students.dkoopman import DKoopmanConfig, DKoopmanPolicy
from koopman_policy.teacher import DiffusionConfig, DiffusionPolicy, TeacherDenoiser

IMAGE_KEY = "image"
STATE_KEY = "state"
AUX_KEY = "aux"
#: Precomputed keypoints ``(B, To, 2K)`` in place of ``image``: training a student whose encoder is frozen.
KEYPOINTS_KEY = "keypoints"

ImageObs = Mapping[str, torch.Tensor]


@dataclass
class VisionFields:
    """Config fields every image policy adds (all defaulted, so they mix into any policy config)."""

    image_height: int = 64
    image_width: int = 64
    camera: str = "workspace"
    vision_dims: tuple[int, ...] = (16, 32, 32)
    keypoints: int = 32
    freeze_vision: bool = False  # students: keep the encoder copied from the teacher fixed
    # Training-only supervision of the encoder: quantities (names of task observation columns) a linear head
    # must read off each frame's keypoints, weighted into the loss. Never an input: the exported graph does
    # not contain the head, and at run time the policy still sees only frames and the joint state.
    aux_names: list[str] = field(default_factory=list)
    aux_loss_weight: float = 0.0


class SpatialSoftmax(nn.Module):
    """``(N, C, h, w)`` feature maps -> ``(N, 2K)`` expected (x, y) in [-1, 1] of K learned keypoint maps."""

    def __init__(self, channels: int, keypoints: int, height: int, width: int) -> None:
        super().__init__()
        self.project = nn.Conv2d(channels, keypoints, 1)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
        self.register_buffer("grid", torch.stack([xs.flatten(), ys.flatten()], dim=1))  # (h*w, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attention = torch.softmax(self.project(x).flatten(2), dim=-1)  # (N, K, h*w)
        return (attention @ self.grid).flatten(1)  # (N, K*2): x0, y0, x1, y1, ...


class ImageEncoder(nn.Module):
    """RGB ``(N, 3, H, W)`` in [0, 1] -> ``(N, 2 * keypoints)`` keypoint coordinates."""

    def __init__(self, height: int, width: int, dims: tuple[int, ...] = (16, 32, 32), keypoints: int = 32) -> None:
        super().__init__()
        if height < 8 or width < 8:
            raise ValueError(f"image encoder: frames must be at least 8x8, got {height}x{width}")
        if len(dims) < 1 or any(d < 1 or d % 8 for d in dims) or keypoints < 1:
            raise ValueError(f"image encoder: vision_dims must be multiples of 8 (GroupNorm), got {dims}")
        layers: list[nn.Module] = []
        cin, h, w = 3, height, width
        for i, cout in enumerate(dims):
            kernel, stride = (5, 2) if i == 0 else (3, 2 if i == 1 else 1)
            layers += [nn.Conv2d(cin, cout, kernel, stride, kernel // 2), nn.GroupNorm(8, cout), nn.SiLU()]
            cin = cout
            h, w = (h - 1) // stride + 1, (w - 1) // stride + 1
        self.conv = nn.Sequential(*layers)
        self.pool = SpatialSoftmax(cin, keypoints, h, w)
        self.out_dim = 2 * keypoints

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(rgb * 2.0 - 1.0))


class ImageConditioned(BasePolicy):
    """Mixin (first base) that makes a policy see ``{"image", "state"}`` observations; see the module doc."""

    image_inputs: ClassVar[bool] = True

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.image_encoder = ImageEncoder(config.image_height, config.image_width, tuple(config.vision_dims),
                                          config.keypoints)
        if config.freeze_vision:
            self.image_encoder.requires_grad_(False)
        n_aux = len(config.aux_names)
        self.aux_head = nn.Linear(self.image_encoder.out_dim, n_aux) if n_aux else None
        self.aux_normalizer = Normalizer(n_aux) if n_aux else None
        self._features: torch.Tensor | None = None  # the last encode_obs's keypoints, for the auxiliary loss
        self._image_queue: deque[torch.Tensor] = deque(maxlen=config.n_obs_steps)

    @property
    def cond_dim(self) -> int:
        c = self.config
        return c.n_obs_steps * (c.obs_dim + 2 * c.keypoints)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.config.image_height, self.config.image_width, 3)

    def encode_obs(self, obs_history: ImageObs) -> torch.Tensor:  # type: ignore[override]
        """``{"image", "state"}`` history -> ``(B, To * (state_dim + 2K))``, per step ``[state_n, keypoints]``."""
        state = obs_history[STATE_KEY]
        if KEYPOINTS_KEY in obs_history:  # precomputed by encode_frames with this (frozen) encoder
            feats = obs_history[KEYPOINTS_KEY]
        else:
            image = obs_history[IMAGE_KEY]
            frames = image.float() / 255.0 if image.dtype == torch.uint8 else image
            b, t = frames.shape[:2]
            feats = self.image_encoder(frames.flatten(0, 1).permute(0, 3, 1, 2)).unflatten(0, (b, t))
        self._features = feats
        return torch.cat([self.obs_normalizer.normalize(state), feats], dim=-1).flatten(1)

    def check_obs(self, obs_history: ImageObs) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """Validated, batched ``{"image", "state"}``; raises ValueError naming what is wrong."""
        c = self.config
        if not isinstance(obs_history, Mapping) or set(obs_history) != {IMAGE_KEY, STATE_KEY}:
            got = sorted(obs_history) if isinstance(obs_history, Mapping) else type(obs_history).__name__
            raise ValueError(f"{self.method}: observation must be a mapping with keys 'image' and 'state', got {got}")
        image = torch.as_tensor(obs_history[IMAGE_KEY])
        state = torch.as_tensor(obs_history[STATE_KEY])
        if state.dim() == 2:
            state, image = state.unsqueeze(0), image.unsqueeze(0)
        want_img = (c.n_obs_steps, *self.image_shape)
        if state.dim() != 3 or tuple(state.shape[1:]) != (c.n_obs_steps, c.obs_dim):
            raise ValueError(f"{self.method}: state history must have shape (B, {c.n_obs_steps}, {c.obs_dim}), "
                             f"got {tuple(obs_history[STATE_KEY].shape)}")
        if image.dim() != 5 or tuple(image.shape[1:]) != want_img or image.shape[0] != state.shape[0]:
            raise ValueError(f"{self.method}: image history must have shape (B, {', '.join(map(str, want_img))}) "
                             f"with the state's batch, got {tuple(obs_history[IMAGE_KEY].shape)}")
        if not torch.isfinite(state).all():
            raise ValueError(f"{self.method}: state history contains NaN or inf")
        if image.dtype != torch.uint8:
            image = image.float()
            if not torch.isfinite(image).all():
                raise ValueError(f"{self.method}: image history contains NaN or inf")
            lo, hi = float(image.min()), float(image.max())
            if lo < -1e-3 or hi > 1.0 + 1e-3:
                raise ValueError(f"{self.method}: float images must lie in [0, 1] (uint8 / 255), got [{lo:.3g}, "
                                 f"{hi:.3g}]; was a mean/std normalisation applied?")
        return {IMAGE_KEY: image, STATE_KEY: state.float()}

    @torch.no_grad()
    def predict_action(  # type: ignore[override]
        self, obs_history: ImageObs, noise: torch.Tensor | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        obs = self.check_obs(obs_history)
        if noise is None:
            noise = self.sample_noise(obs[STATE_KEY].shape[0], generator)
        x0, _ = self.sample_normalized(self.encode_obs(obs), noise.float())
        return self.action_normalizer.unnormalize(x0)

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The parent's loss with ``obs`` built from the batch's ``image`` and ``state`` tensors, plus (with
        ``aux_names``) ``aux_loss_weight`` times the MSE of the keypoints' linear read-out of ``batch["aux"]``
        ``(B, To, len(aux_names))``, normalised like the actions."""
        if KEYPOINTS_KEY in batch:
            if not self.config.freeze_vision:
                raise ValueError(f"{self.method}: precomputed keypoints need freeze_vision (the encoder must not "
                                 "train)")
            obs = {KEYPOINTS_KEY: batch[KEYPOINTS_KEY], STATE_KEY: batch[STATE_KEY]}
        else:
            obs = {IMAGE_KEY: batch[IMAGE_KEY], STATE_KEY: batch[STATE_KEY]}
        loss = super().compute_loss({**batch, "obs": obs})  # type: ignore[dict-item]
        if self.aux_head is not None and self.config.aux_loss_weight > 0:
            if AUX_KEY not in batch:
                raise ValueError(f"{self.method}: aux_names {self.config.aux_names} need batch['aux']")
            target = self.aux_normalizer.normalize(batch[AUX_KEY])
            loss = loss + self.config.aux_loss_weight * F.mse_loss(self.aux_head(self._features), target)
        return loss

    @torch.no_grad()
    def encode_frames(self, frames: torch.Tensor, batch: int = 512) -> torch.Tensor:
        """Keypoints ``(N, 2K)`` of single frames ``(N, H, W, 3)`` (uint8 or float in [0, 1]), in chunks."""
        out = []
        for i in range(0, len(frames), batch):
            f = frames[i : i + batch]
            f = f.float() / 255.0 if f.dtype == torch.uint8 else f.float()
            out.append(self.image_encoder(f.permute(0, 3, 1, 2)))
        return torch.cat(out)

    def fit_aux(self, aux: torch.Tensor) -> None:
        """Fit the auxiliary targets' normaliser (``(..., len(aux_names))`` raw values)."""
        if self.aux_normalizer is None:
            raise ValueError(f"{self.method}: no aux_names configured")
        self.aux_normalizer.fit(aux)

    @torch.no_grad()
    def read_aux(self, obs_history: ImageObs) -> torch.Tensor:
        """The auxiliary head's raw read-out ``(B, To, len(aux_names))``: what the encoder says it sees."""
        if self.aux_head is None:
            raise ValueError(f"{self.method}: no aux_names configured")
        self.encode_obs(self.check_obs(obs_history))
        return self.aux_normalizer.unnormalize(self.aux_head(self._features))

    def reset(self) -> None:
        super().reset()
        self._image_queue.clear()

    @torch.no_grad()
    def select_action(  # type: ignore[override]
        self, obs: ImageObs, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """One action for one frame ``(H, W, 3)`` and state ``(state_dim,)``; replans when the queue runs dry."""
        c = self.config
        image, state = torch.as_tensor(obs[IMAGE_KEY]), torch.as_tensor(obs[STATE_KEY])
        if tuple(image.shape) != self.image_shape or tuple(state.shape) != (c.obs_dim,):
            raise ValueError(f"{self.method}: expected one frame {self.image_shape} and state ({c.obs_dim},), "
                             f"got {tuple(image.shape)} and {tuple(state.shape)}")
        for queue, item in ((self._image_queue, image), (self._obs_queue, state)):
            queue.extend([item] * (c.n_obs_steps if not queue else 1))
        if not self._action_queue:
            hist = {IMAGE_KEY: torch.stack(list(self._image_queue)), STATE_KEY: torch.stack(list(self._obs_queue))}
            chunk = self.predict_action(hist, generator=generator)[0]
            start = c.n_obs_steps - 1
            self._action_queue.extend(chunk[start : start + c.n_action_steps])
        return self._action_queue.popleft()

    # -- export -----------------------------------------------------------------------------------------
    def export_module(self) -> nn.Module:
        return ImageExportModule(self)

    def export_example_inputs(self, batch: int = 2) -> dict[str, torch.Tensor]:
        """Inputs, in graph order, for tracing (``image`` float in [0, 1], raw ``state``, ``noise``)."""
        c = self.config
        return {
            IMAGE_KEY: torch.zeros(batch, c.n_obs_steps, *self.image_shape),
            STATE_KEY: torch.zeros(batch, c.n_obs_steps, c.obs_dim),
            "noise": torch.zeros(batch, c.horizon, c.action_dim),
        }

    def image_metadata(self) -> dict[str, Any]:
        """What a runtime needs to feed the graph: input names, frame size and scaling, camera."""
        c = self.config
        return {
            "inputs": list(IMAGE_POLICY_INPUTS),
            "image_height": c.image_height,
            "image_width": c.image_width,
            "image_channels": 3,
            "image_layout": IMAGE_LAYOUT,
            "image_mean": [0.0, 0.0, 0.0],
            "image_std": [1.0, 1.0, 1.0],
            "camera": c.camera,
            "obs_layout": STATE_LAYOUT,
        }


# -- the two image policies ------------------------------------------------------------------------------
@dataclass
class ImageDiffusionConfig(DiffusionConfig, VisionFields):
    obs_dim: int = 14


class ImageDiffusionPolicy(ImageConditioned, DiffusionPolicy):
    """The diffusion teacher conditioned on frames + joint state (``method = "teacher_image"``)."""

    method = "teacher_image"
    config_class = ImageDiffusionConfig
    config: ImageDiffusionConfig

    def denoiser_module(self) -> nn.Module:
        return ImageTeacherDenoiser(self)


class ImageTeacherDenoiser(TeacherDenoiser):
    """The U-Net with an image observation: ``(sample, timestep, image, state) -> eps``."""

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, image: torch.Tensor,  # type: ignore[override]
                state: torch.Tensor) -> torch.Tensor:
        return self.policy.model(sample, timestep, self.policy.encode_obs({IMAGE_KEY: image, STATE_KEY: state}))


@dataclass
class ImageDKoopmanConfig(DKoopmanConfig, VisionFields):
    obs_dim: int = 14


class ImageDKoopmanPolicy(ImageConditioned, DKoopmanPolicy):
    """The dynamic Koopman student conditioned on frames + joint state (``method = "dkoopman_image"``)."""

    method = "dkoopman_image"
    config_class = ImageDKoopmanConfig
    config: ImageDKoopmanConfig

    def init_vision_from(self, teacher: ImageConditioned) -> None:
        """Start from the teacher's encoder: the features it learned to act on are a good first guess."""
        c, t = self.config, teacher.config
        mine = (c.image_height, c.image_width, tuple(c.vision_dims), c.keypoints)
        theirs = (t.image_height, t.image_width, tuple(t.vision_dims), t.keypoints)
        if mine != theirs:
            raise ValueError(f"{self.method}: encoder {mine} differs from the teacher's {theirs}")
        self.image_encoder.load_state_dict(teacher.image_encoder.state_dict())
        if self.aux_head is not None and list(c.aux_names) == list(t.aux_names):
            self.aux_head.load_state_dict(teacher.aux_head.state_dict())
            self.aux_normalizer.load_state_dict(teacher.aux_normalizer.state_dict())


IMAGE_POLICIES: tuple[type[BasePolicy], ...] = (ImageDiffusionPolicy, ImageDKoopmanPolicy)
