"""Camera frames -> normalised image observations at the policy rate.

Frames arrive at the camera's rate; at each policy tick the newest frame (if fresh) is resized, normalised
and appended to a history of ``n_obs_steps`` frames spaced like the model's (``history_spacing_s``, see
:meth:`ImageObservationBuilder.tick`). A missing, stale or malformed frame stops the flow,
exactly like the state observations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from koopman_control.core.episodes import EpisodeTimeline
from koopman_control.core.observation import NS, InputStatus, Observation, ObservationHistory

CHANNELS = {"rgb8": 3, "bgr8": 3, "rgba8": 4, "bgra8": 4, "mono8": 1}


def decode(encoding: str, height: int, width: int, step: int, data: bytes | np.ndarray) -> np.ndarray:
    """A ``sensor_msgs/Image`` buffer as an (H, W, 3) uint8 RGB array; raises ValueError for what it cannot read."""
    if encoding not in CHANNELS:
        raise ValueError(f"unsupported image encoding {encoding!r}; supported: {', '.join(CHANNELS)}")
    c = CHANNELS[encoding]
    if height <= 0 or width <= 0 or step < width * c:
        raise ValueError(f"bad image geometry {height}x{width} step {step} for {encoding}")
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.view(np.uint8)
    if buf.size < height * step:
        raise ValueError(f"image buffer has {buf.size} bytes, {height * step} expected")
    img = buf[: height * step].reshape(height, step)[:, : width * c].reshape(height, width, c)
    if encoding in ("bgr8", "bgra8"):
        img = img[..., 2::-1]
    elif c == 4:
        img = img[..., :3]
    elif c == 1:
        img = np.repeat(img, 3, axis=2)
    return img


def resize_bilinear(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize (half-pixel centres, as OpenCV/torchvision), float32 out; numpy only."""
    h, w = img.shape[:2]
    if (h, w) == (height, width):
        return img.astype(np.float32)
    ys = np.clip((np.arange(height) + 0.5) * h / height - 0.5, 0, h - 1)
    xs = np.clip((np.arange(width) + 0.5) * w / width - 0.5, 0, w - 1)
    y0 = np.floor(ys).astype(int)
    x0 = np.floor(xs).astype(int)
    y1 = np.minimum(y0 + 1, h - 1)
    x1 = np.minimum(x0 + 1, w - 1)
    wy = (ys - y0)[:, None, None].astype(np.float32)
    wx = (xs - x0)[None, :, None].astype(np.float32)
    f = img.astype(np.float32)
    top = f[y0][:, x0] * (1 - wx) + f[y0][:, x1] * wx
    bot = f[y1][:, x0] * (1 - wx) + f[y1][:, x1] * wx
    return top * (1 - wy) + bot * wy


class ImageNormalizer:
    """uint8 RGB -> float32 ``(x / 255 - mean) / std`` per channel at a fixed size."""

    def __init__(self, height: int, width: int, mean: Sequence[float] = (0.0, 0.0, 0.0),
                 std: Sequence[float] = (1.0, 1.0, 1.0)) -> None:
        if height <= 0 or width <= 0:
            raise ValueError(f"output size must be positive, got {height}x{width}")
        self.height, self.width = int(height), int(width)
        self.mean = np.asarray(mean, dtype=np.float32).reshape(1, 1, -1)
        self.std = np.asarray(std, dtype=np.float32).reshape(1, 1, -1)
        if self.mean.size != 3 or self.std.size != 3 or not (self.std > 0).all():
            raise ValueError("mean and std need 3 values each and std must be positive")

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        out = resize_bilinear(rgb, self.height, self.width) / 255.0
        return ((out - self.mean) / self.std).astype(np.float32)


class ImageObservationBuilder:
    """Newest frame at each policy tick -> normalised history ``(n_obs_steps, H, W, 3)``."""

    def __init__(self, normalizer: ImageNormalizer, n_obs_steps: int, policy_rate_hz: float,
                 max_frame_age_s: float = 0.2, history_spacing_s: float | None = None) -> None:
        self.normalizer = normalizer
        self.history = ObservationHistory(n_obs_steps, 1.0 / policy_rate_hz, spacing_s=history_spacing_s)
        self.max_age_ns = round(max_frame_age_s * NS)
        self.status = InputStatus.WAITING
        self.reason = "no frame yet"
        self.episode = 0
        self.timeline = EpisodeTimeline()
        self._frame: tuple[int, np.ndarray] | None = None  # (stamp, decoded rgb), normalised lazily at a tick
        self._last_used_stamp: int | None = None
        self._img: np.ndarray | None = None  # the newest frame, normalised
        self._pad_next = True
        self.emitted = 0
        self.faults = 0

    def announce_episode(self, episode: int, start_ns: int) -> None:
        """An episode announcement: frames stamped from ``start_ns`` on are its own (core.episodes)."""
        self.timeline.announce(episode, start_ns)

    def on_frame(self, stamp_ns: int, rgb: np.ndarray | None, error: str | None = None) -> None:
        if error is not None or rgb is None:
            self._fault(InputStatus.INVALID, error or "undecodable frame")
            self._frame = None
            return
        self._frame = (stamp_ns, rgb)

    def tick(self, now_ns: int) -> Observation | None:
        """At a policy tick: the newest fresh frame extends the history; stale frames stop the flow.

        When the history steps span one tick, a tick without a new frame sends nothing and adds nothing (the
        camera must keep up with the policy rate). When they span several (a 100 Hz controller, a 20 Hz
        camera, a 0.1 s history), every tick records the newest frame at its tick time, so each history step
        is the newest frame at that step's time, as in training at the model's rate; an observation is sent
        only when a new frame arrived, stamped with that frame's capture time.
        """
        if self._frame is None:
            if self.status is InputStatus.WAITING:
                return None
            self._fault(self.status, self.reason)
            return None
        stamp, rgb = self._frame
        age = now_ns - stamp
        if age > self.max_age_ns:
            self._fault(InputStatus.STALE,
                        f"newest frame is {age / 1e6:.0f} ms old (limit {self.max_age_ns / 1e6:.0f} ms)")
            return None
        episode = self.timeline.episode_at(stamp)
        if episode < self.episode:  # a frame taken before the running episode began: wait for a new one
            return None
        if episode != self.episode:
            self.episode = episode
            self.history.clear()
            self._pad_next = True
        new = stamp != self._last_used_stamp
        if new:
            img = self.normalizer(rgb)
            if not np.isfinite(img).all():
                self._fault(InputStatus.INVALID, "frame normalised to NaN/inf")
                return None
            self._last_used_stamp, self._img = stamp, img
        elif self.history.stride == 1 or self._pad_next:
            # The camera is slower than the policy rate (nothing is re-sent as new), or a new episode
            # starts: its history starts from a frame that arrived after the episode did.
            return None
        obs = self.history.push(stamp if self.history.stride == 1 else now_ns, self._img, self.episode,
                                pad=self._pad_next)
        self._pad_next = False
        self.status, self.reason = InputStatus.OK, "ok"
        if obs is None or not new:
            return None
        self.emitted += 1
        return replace(obs, stamp_ns=stamp)

    def _fault(self, status: InputStatus, reason: str) -> None:
        if self.status not in (InputStatus.STALE, InputStatus.INVALID):
            self.faults += 1
        self.status, self.reason = status, reason
        self.history.clear()
