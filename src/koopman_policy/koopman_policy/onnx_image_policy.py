"""Serve an exported image policy (inputs ``image``, ``state``, ``noise``) with ONNX Runtime and numpy.

The same file checks, provider choice, session options, seeded noise and action queue as
:class:`koopman_policy.onnx_policy.OnnxPolicy`; only the observation differs: a history of frames
``(To, H, W, 3)`` (float32 in [0, 1], or uint8 which is scaled here) and of raw joint states
``(To, state_dim)``. The frame size and the camera come from the file's metadata (:attr:`image_size`,
:attr:`camera`), so the camera ingest configures itself from the model it serves.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np

from koopman_policy.onnx_export import POLICY_OUTPUTS
from koopman_policy.onnx_policy import ModelLoadError, _check_io, _OnnxModel

IMAGE_INPUTS = ("image", "state", "noise")


def is_image_policy(metadata_raw: dict[str, Any]) -> bool:
    """Whether decoded ONNX metadata describes a graph that takes camera frames."""
    inputs = metadata_raw.get("inputs")
    return isinstance(inputs, list) and "image" in inputs


class OnnxImagePolicy(_OnnxModel):
    """A camera ``policy.onnx`` in numpy: ``predict_action(image, state, noise=None)``."""

    kind = "policy"

    def _check_graph(self) -> None:
        m, raw = self.metadata, self.metadata.raw
        if not is_image_policy(raw):
            raise ModelLoadError(f"{self.path}: not an image policy (its inputs are obs, noise); load it with "
                                 "OnnxPolicy")
        try:
            self.image_size = (int(raw["image_height"]), int(raw["image_width"]))
            self.camera = str(raw["camera"])
            mean, std = (np.asarray(raw[k], np.float32) for k in ("image_mean", "image_std"))
        except (KeyError, TypeError, ValueError) as err:
            raise ModelLoadError(f"{self.path}: image metadata incomplete or malformed: {err!r}") from None
        if min(self.image_size) < 1 or mean.shape != (3,) or std.shape != (3,) or not (std > 0).all():
            raise ModelLoadError(f"{self.path}: bad image metadata: size {self.image_size}, mean {mean}, std {std}")
        self.image_mean, self.image_std = mean, std
        f32 = "tensor(float)"
        _check_io(
            self.session, self.path,
            {"image": (f32, (None, m.n_obs_steps, *self.image_size, 3)),
             "state": (f32, (None, m.n_obs_steps, m.obs_dim)), "noise": (f32, (None, m.horizon, m.action_dim))},
            {"action": (f32, (None, m.horizon, m.action_dim)), "ood_score": (f32, (None,))},
        )
        self._image_queue: deque[np.ndarray] = deque(maxlen=m.n_obs_steps)

    def _check_image(self, image: Any, batch: int) -> np.ndarray:
        m = self.metadata
        arr = np.asarray(image)
        if arr.dtype == np.uint8:
            arr = arr.astype(np.float32) / np.float32(255.0)
        arr = np.asarray(arr, dtype=np.float32)
        if arr.ndim == 4:
            arr = arr[None]
        want = (batch, m.n_obs_steps, *self.image_size, 3)
        if arr.shape != want:
            raise ValueError(f"{m.method}: image history must have shape {want[1:]} or {want}, got {np.shape(image)}")
        if not np.isfinite(arr).all():
            raise ValueError(f"{m.method}: image history contains NaN or inf")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < -1e-3 or hi > 1.0 + 1e-3:
            raise ValueError(f"{m.method}: images must lie in [0, 1] (uint8 / 255), got [{lo:.3g}, {hi:.3g}]")
        return arr

    def predict_action(self, image: Any, state: Any = None, noise: Any = None) -> np.ndarray:  # type: ignore[override]
        """Raw chunk ``(H, Da)`` for histories ``image (To, h, w, 3)``, ``state (To, S)``; batched with a leading B.

        A bad input raises ValueError and leaves the queues and ``last_ood_score`` as they were.
        """
        if state is None:
            raise ValueError(f"{self.metadata.method}: an image policy needs both the image and the state history")
        obs, single = self._check_obs(state)
        batch = obs.shape[0]
        frames = self._check_image(image, batch)
        eps = self.sample_noise(batch) if noise is None else self._check_noise(noise, batch)
        action, ood = self.session.run(list(POLICY_OUTPUTS), {"image": frames, "state": obs, "noise": eps})
        self.last_ood_score = float(ood[0]) if single else ood
        return action[0] if single else action

    def reset(self) -> None:
        super().reset()
        self._image_queue.clear()

    def select_action(self, image: Any, state: Any = None) -> np.ndarray:  # type: ignore[override]
        """One raw action for one frame ``(h, w, 3)`` and state ``(S,)``; replans when the queue is empty."""
        m = self.metadata
        frame = self._check_image(np.asarray(image)[None, None].repeat(m.n_obs_steps, 1), 1)[0, 0]
        s = np.asarray(state, dtype=np.float32)
        if s.shape != (m.obs_dim,) or not np.isfinite(s).all():
            raise ValueError(f"{m.method}: state must be {m.obs_dim} finite numbers, got shape {np.shape(state)}")
        for queue, item in ((self._image_queue, frame), (self._obs_queue, s)):
            queue.extend([item] * (m.n_obs_steps if not queue else 1))
        if not self._action_queue:
            chunk = self.predict_action(np.stack(self._image_queue), np.stack(self._obs_queue))
            self._action_queue.extend(chunk[m.executed_slice])
        return self._action_queue.popleft()
