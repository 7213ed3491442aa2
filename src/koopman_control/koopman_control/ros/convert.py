"""numpy <-> ROS message conversion. Times are integer nanoseconds of the node's (system) clock.

Float arrays go in as ``array('d')``: the generated message setters take those without checking every
element, which makes building a 15-point chunk several times cheaper than from Python lists.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

import numpy as np
from builtin_interfaces.msg import Duration, Time
from sensor_msgs.msg import Image, JointState
from trajectory_msgs.msg import JointTrajectory, JointTrajectoryPoint

from koopman_control.core.chunk import ActionChunk
from koopman_control.core.episodes import parse_episode
from koopman_control.core.observation import NS, Observation
from koopman_policy.contract import Feature, read_field


def message_class(type_name: str) -> type:
    """The rclpy class of a ROS type name such as ``geometry_msgs/msg/PoseStamped``."""
    import importlib

    pkg, kind, name = type_name.split("/")
    try:
        return getattr(importlib.import_module(f"{pkg}.{kind}"), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"message type {type_name} is not available here: {err}") from None


def vector_from_msg(msg: object, feature: Feature, rx_ns: int) -> tuple[int, np.ndarray]:
    """(stamp, values) of a vector feature's message: the header stamp, or the receive time without one."""
    stamp = from_time(msg.header.stamp) if feature.stamped else rx_ns  # type: ignore[attr-defined]
    return stamp, np.array([read_field(msg, f, feature.wrap_center) for f in feature.fields], dtype=np.float64)


def vector_msg(feature: Feature, stamp_ns: int, values: Sequence[float], frame_id: str = "") -> object:
    """A message of the feature's type carrying ``values`` in its fields (the sim publishes task inputs so)."""
    msg = message_class(feature.type)()
    if feature.stamped:
        msg.header.stamp = to_time(stamp_ns)  # type: ignore[attr-defined]
        msg.header.frame_id = frame_id  # type: ignore[attr-defined]
    for path, v in zip(feature.fields, values, strict=True):
        if path == "yaw":
            pose = getattr(msg, "pose", msg)
            if hasattr(pose, "theta"):
                pose.theta = float(v)
            else:
                pose.orientation.z, pose.orientation.w = float(np.sin(v / 2)), float(np.cos(v / 2))
            continue
        *parents, leaf = path.split(".")
        obj = msg
        for p in parents:
            obj = getattr(obj, p)
        if "[" in leaf:  # an array element, e.g. data[2]
            name, index = leaf[:-1].split("[")
            arr = list(getattr(obj, name))
            arr += [0.0] * (int(index) + 1 - len(arr))
            arr[int(index)] = float(v)
            setattr(obj, name, arr)
        else:
            setattr(obj, leaf, float(v))
    return msg


def to_time(ns: int) -> Time:
    return Time(sec=int(ns // NS), nanosec=int(ns % NS))


def from_time(t: Time) -> int:
    return int(t.sec) * NS + int(t.nanosec)


def to_duration(ns: int) -> Duration:
    """Negative durations follow builtin_interfaces: sec floors, nanosec stays in [0, 1e9)."""
    return Duration(sec=int(ns // NS), nanosec=int(ns % NS))


def from_duration(d: Duration) -> int:
    return int(d.sec) * NS + int(d.nanosec)


def _f64(values: np.ndarray) -> array:
    out = array("d")
    out.frombytes(np.ascontiguousarray(values, dtype=np.float64).tobytes())
    return out


def joint_state(stamp_ns: int, names: Sequence[str], q: np.ndarray, qd: np.ndarray, frame_id: str = "") -> JointState:
    msg = JointState()
    msg.header.stamp = to_time(stamp_ns)
    msg.header.frame_id = frame_id
    msg.name = list(names)
    msg.position = _f64(q)
    msg.velocity = _f64(qd)
    return msg


def chunk_msg(stamp_ns: int, names: Sequence[str], offsets_s: np.ndarray, positions: np.ndarray,
              frame_id: str = "") -> JointTrajectory:
    """An action chunk: header.stamp = observation stamp, one point per step with its time_from_start."""
    msg = JointTrajectory()
    msg.header.stamp = to_time(stamp_ns)
    msg.header.frame_id = frame_id
    msg.joint_names = list(names)
    msg.points = [JointTrajectoryPoint(positions=_f64(pos), time_from_start=to_duration(round(float(off) * NS)))
                  for off, pos in zip(offsets_s, positions, strict=True)]
    return msg


def hold_msg(stamp_ns: int, names: Sequence[str], frame_id: str = "") -> JointTrajectory:
    """The hold command: a trajectory without points (``joint_trajectory_controller`` stops on one too)."""
    return chunk_msg(stamp_ns, names, np.zeros(0), np.zeros((0, len(names))), frame_id)


def chunk_from_msg(msg: JointTrajectory, joint_names: Sequence[str]) -> ActionChunk:
    """Reorder a JointTrajectory into ``joint_names`` order; raises ValueError for unusable messages (a hold
    command, with no points, is the caller's to recognise first)."""
    if not msg.points:
        raise ValueError("bad shape: a chunk without points")
    index = {n: i for i, n in enumerate(msg.joint_names)}
    missing = [n for n in joint_names if n not in index]
    if missing:
        raise ValueError(f"bad shape: chunk lacks joints {', '.join(missing)} (has {list(msg.joint_names)})")
    perm = [index[n] for n in joint_names]
    n = len(msg.joint_names)
    rows = []
    for k, p in enumerate(msg.points):
        if len(p.positions) != n:
            raise ValueError(f"bad shape: point {k} has {len(p.positions)} positions for {n} joints")
        rows.append(np.frombuffer(p.positions, dtype=np.float64) if isinstance(p.positions, array)
                    else np.asarray(p.positions, dtype=np.float64))
    pos = np.array(rows, dtype=np.float64)[:, perm]
    stamp = from_time(msg.header.stamp)
    times = np.array([stamp + from_duration(p.time_from_start) for p in msg.points], dtype=np.int64)
    return ActionChunk(stamp, times, pos, parse_episode(msg.header.frame_id))


def observation_msg(obs: Observation, names: Sequence[str], frame_id: str = "") -> JointTrajectory:
    """An observation history as a JointTrajectory: ``joint_names`` are the observation names, one point per
    history step (oldest first) whose ``positions`` are the observation vector and whose ``time_from_start``
    is its stamp relative to ``header.stamp`` (the newest step), i.e. zero or negative. No custom message
    type is needed, so the pip-only and the colcon-built stacks speak the same topics."""
    msg = JointTrajectory()
    msg.header.stamp = to_time(obs.stamp_ns)
    msg.header.frame_id = frame_id
    msg.joint_names = list(names)
    msg.points = [JointTrajectoryPoint(positions=_f64(row), time_from_start=to_duration(int(s) - obs.stamp_ns))
                  for s, row in zip(obs.stamps_ns, obs.history, strict=True)]
    return msg


def stop_observation_msg(stamp_ns: int, names: Sequence[str], frame_id: str = "") -> JointTrajectory:
    """An observation without steps: the ingest's inputs failed and no observation follows until they recover
    (the policy node holds the arm on it)."""
    msg = JointTrajectory()
    msg.header.stamp = to_time(stamp_ns)
    msg.header.frame_id = frame_id
    msg.joint_names = list(names)
    return msg


def observation_from_msg(msg: JointTrajectory) -> tuple[int, np.ndarray, list[str], np.ndarray]:
    """(stamp_ns, history (T, D) float32, names, step stamps); raises ValueError when malformed."""
    if not msg.points:
        raise ValueError("observation has no steps")
    d = len(msg.joint_names)
    if any(len(p.positions) != d for p in msg.points):
        raise ValueError(f"observation steps must each have {d} values")
    hist = np.array([np.frombuffer(p.positions, dtype=np.float64) if isinstance(p.positions, array)
                     else np.asarray(p.positions, dtype=np.float64) for p in msg.points], dtype=np.float32)
    stamp = from_time(msg.header.stamp)
    stamps = np.array([stamp + from_duration(p.time_from_start) for p in msg.points], dtype=np.int64)
    return stamp, hist, list(msg.joint_names), stamps


def image_msg(stamp_ns: int, rgb: np.ndarray, frame_id: str = "camera") -> Image:
    msg = Image()
    msg.header.stamp = to_time(stamp_ns)
    msg.header.frame_id = frame_id
    msg.height, msg.width = int(rgb.shape[0]), int(rgb.shape[1])
    msg.encoding = "rgb8"
    msg.is_bigendian = 0
    msg.step = int(rgb.shape[1] * 3)
    msg.data = np.ascontiguousarray(rgb, dtype=np.uint8).tobytes()
    return msg


def float_image_msg(stamp_ns: int, stacked: np.ndarray, frame_id: str = "camera") -> Image:
    """A normalised image history ``(T, H, W, 3)`` float32 as one ``32FC3`` image of height ``T * H`` (oldest
    frame on top): the policy reads one stamped message per tick."""
    t, h, w, c = stacked.shape
    msg = Image()
    msg.header.stamp = to_time(stamp_ns)
    msg.header.frame_id = frame_id
    msg.height, msg.width = int(t * h), int(w)
    msg.encoding = "32FC3"
    msg.is_bigendian = 0
    msg.step = int(w * c * 4)
    msg.data = np.ascontiguousarray(stacked, dtype="<f4").tobytes()
    return msg


def float_image_from_msg(msg: Image, steps: int) -> tuple[int, np.ndarray]:
    """Inverse of :func:`float_image_msg`: ``(stamp, history (steps, H, W, 3))``; ValueError when the message
    is not a ``32FC3`` history of ``steps`` frames."""
    if msg.encoding != "32FC3" or msg.height % steps or len(msg.data) != msg.height * msg.width * 12:
        raise ValueError(f"{msg.encoding} {msg.width}x{msg.height} is not a 32FC3 history of {steps} frames")
    hist = np.frombuffer(bytes(msg.data), dtype="<f4").reshape(steps, msg.height // steps, msg.width, 3)
    return from_time(msg.header.stamp), hist
