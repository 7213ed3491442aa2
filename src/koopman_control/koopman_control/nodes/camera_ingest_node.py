"""Camera frames -> normalised image observations at the policy rate on ``/policy/image_observation``.

Each message is one ``sensor_msgs/Image`` with encoding ``32FC3``: the history of ``n_obs_steps`` frames,
resized to ``height x width`` and normalised ``(x/255 - mean) / std``, stacked vertically oldest first
(image height = n_obs_steps * height); ``header.stamp`` is the newest frame's capture stamp and
``header.frame_id`` is ``episode_<id>``, as on the state observations. The frames are ``history_period``
apart, the models' control period, at any policy rate. When that is one policy period the camera must run
at least at the policy rate: a tick without a new, fresh frame stops the flow instead of re-sending an old
frame as new. At a faster policy rate an observation goes out with each new frame.
"""

from __future__ import annotations

from typing import Any

from sensor_msgs.msg import Image
from std_msgs.msg import Header

from koopman_control import topics
from koopman_control.core.episodes import episode_label, parse_episode
from koopman_control.core.image import ImageNormalizer, ImageObservationBuilder, decode
from koopman_control.core.observation import InputStatus
from koopman_control.ros import convert, qos
from koopman_control.ros.base import ERROR, OK, WARN, KoopmanNode, ParameterError, run_node

NAME = "camera_ingest"


class CameraIngestNode(KoopmanNode):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NAME, **kwargs)
        p = {
            "policy_rate": self.declare("policy_rate", 10.0, "image observation rate (Hz)"),
            "n_obs_steps": self.declare("n_obs_steps", 2, "frames per observation"),
            "width": self.declare("width", 96, "output width (px)"),
            "height": self.declare("height", 96, "output height (px)"),
            "mean": self.declare("mean", [0.0, 0.0, 0.0], "per-channel mean after /255"),
            "std": self.declare("std", [1.0, 1.0, 1.0], "per-channel std after /255"),
            "max_frame_age": self.declare("max_frame_age", 0.2, "frames older than this are stale (s)"),
            "history_period": self.declare("history_period", 0.0, "time between history frames (s): the "
                                                                  "policies' control period; 0 = one policy period"),
        }
        self.p = p
        try:
            norm = ImageNormalizer(p["height"], p["width"], [float(v) for v in p["mean"]],
                                   [float(v) for v in p["std"]])
            self.builder = ImageObservationBuilder(norm, p["n_obs_steps"], p["policy_rate"], p["max_frame_age"],
                                                   history_spacing_s=p["history_period"] or None)
        except (ValueError, TypeError) as err:
            raise ParameterError(f"camera_ingest: {err}") from None
        self.pub = self.create_publisher(Image, topics.IMAGE_OBSERVATION, qos.CONTROL)
        self.create_subscription(Header, topics.EPISODE, self._on_episode, qos.LATCHED)
        self.create_subscription(Image, topics.CAMERA, self._on_image, qos.SENSOR_SUB)
        self.create_timer(1.0 / p["policy_rate"], self._tick)
        self._last_status = InputStatus.WAITING
        self.start_diagnostics()

    def declare(self, name: str, default: Any, description: str, *, read_only: bool = False) -> Any:
        if isinstance(default, list) and default and isinstance(default[0], float):
            from rcl_interfaces.msg import ParameterDescriptor

            return list(self.declare_parameter(name, default, ParameterDescriptor(description=description)).value)
        return super().declare(name, default, description, read_only=read_only)

    def _on_episode(self, msg: Header) -> None:
        episode = parse_episode(msg.frame_id)
        if episode is not None:
            self.builder.announce_episode(episode, convert.from_time(msg.stamp))

    def _on_image(self, msg: Image) -> None:
        stamp = convert.from_time(msg.header.stamp)
        try:
            rgb = decode(msg.encoding, msg.height, msg.width, msg.step, bytes(msg.data))
        except ValueError as err:
            self.builder.on_frame(stamp, None, str(err))
            return
        self.builder.on_frame(stamp, rgb)

    def _tick(self) -> None:
        obs = self.builder.tick(self.get_clock().now().nanoseconds)
        if obs is not None:
            self.pub.publish(convert.float_image_msg(obs.stamp_ns, obs.history, episode_label(obs.episode)))
        st = self.builder.status
        if st is not self._last_status and st in (InputStatus.STALE, InputStatus.INVALID):
            self.get_logger().error(f"image observations stopped: {self.builder.reason}")
        self._last_status = st

    def diagnostics(self) -> list[tuple[str, int, str, dict[str, Any]]]:
        b = self.builder
        level = {InputStatus.OK: OK, InputStatus.WAITING: WARN}.get(b.status, ERROR)
        return [("", level, b.reason, {"status": b.status.value, "emitted": b.emitted, "faults": b.faults})]


def main(args: list[str] | None = None) -> int:
    return run_node(CameraIngestNode, args)


if __name__ == "__main__":
    raise SystemExit(main())
