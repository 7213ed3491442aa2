"""CDR payloads of the stack's messages built without rclpy (``rosbags`` serialiser, kilted definitions).

Used to write bags from plain Python (offline simulated runs, tests) with the same layout the nodes publish:
see :mod:`koopman_control.ros.convert` for the conventions (chunk stamp = observation stamp, observation
history as a JointTrajectory with ``time_from_start <= 0``, ``episode_<id>`` in the observation's frame_id).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from koopman_control.bag.topics import typestore
from koopman_control.core.observation import NS


def _types() -> Any:
    return typestore().types


def _time(ns: int) -> Any:
    return _types()["builtin_interfaces/msg/Time"](sec=int(ns // NS), nanosec=int(ns % NS))


def _duration(ns: int) -> Any:
    return _types()["builtin_interfaces/msg/Duration"](sec=int(ns // NS), nanosec=int(ns % NS))


def _header(stamp_ns: int, frame_id: str = "") -> Any:
    return _types()["std_msgs/msg/Header"](stamp=_time(stamp_ns), frame_id=frame_id)


def serialize(msg: Any, msgtype: str) -> bytes:
    return bytes(typestore().serialize_cdr(msg, msgtype))


def joint_state(stamp_ns: int, names: Sequence[str], q: np.ndarray, qd: np.ndarray) -> bytes:
    m = _types()["sensor_msgs/msg/JointState"](
        header=_header(stamp_ns), name=list(names), position=np.asarray(q, np.float64),
        velocity=np.asarray(qd, np.float64), effort=np.zeros(0, np.float64))
    return serialize(m, "sensor_msgs/msg/JointState")


def point_stamped(stamp_ns: int, xyz: Sequence[float], frame_id: str = "base_link") -> bytes:
    t = _types()
    p = t["geometry_msgs/msg/Point"](x=float(xyz[0]), y=float(xyz[1]), z=float(xyz[2]))
    return serialize(t["geometry_msgs/msg/PointStamped"](header=_header(stamp_ns, frame_id), point=p),
                     "geometry_msgs/msg/PointStamped")


def episode(episode_id: int, start_ns: int) -> bytes:
    """An episode announcement (koopman_control.core.episodes): stamp = its start, frame_id = episode_<id>."""
    from koopman_control.core.episodes import episode_label

    return serialize(_header(start_ns, episode_label(episode_id)), "std_msgs/msg/Header")


def string(text: str) -> bytes:
    return serialize(_types()["std_msgs/msg/String"](data=str(text)), "std_msgs/msg/String")


def trajectory(stamp_ns: int, names: Sequence[str], offsets_ns: Sequence[int], rows: np.ndarray,
               frame_id: str = "") -> bytes:
    """A JointTrajectory with one point per row at ``stamp + offset`` (positions only)."""
    t = _types()
    pt = t["trajectory_msgs/msg/JointTrajectoryPoint"]
    empty = np.zeros(0, np.float64)
    points = [pt(positions=np.asarray(r, np.float64), velocities=empty, accelerations=empty, effort=empty,
                 time_from_start=_duration(int(o))) for o, r in zip(offsets_ns, rows, strict=True)]
    m = t["trajectory_msgs/msg/JointTrajectory"](header=_header(stamp_ns, frame_id), joint_names=list(names),
                                                 points=points)
    return serialize(m, "trajectory_msgs/msg/JointTrajectory")
