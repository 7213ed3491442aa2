"""The stack's topics as a bag sees them: name, ROS type, role and the QoS they are published with.

One table shared by the recorder (what to subscribe to, with which QoS), the player (what to publish, latched
or not), the reader (which types to expect) and the replay (which topics are inputs, which are outputs).
Names are :mod:`koopman_control.topics`' as the stack resolves them in the root namespace.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rosbags.typesys.store import Typestore

from koopman_control import topics as _t


def in_bag(topic: str) -> str:
    """A topic name as the stack resolves it in the root namespace, as a bag records it (relative names, as
    :mod:`koopman_control.topics` and contracts give them, get the leading slash)."""
    return "/" + topic.lstrip("/")


JOINT_STATES = f"/{_t.JOINT_STATES}"
TARGET = f"/{_t.TARGET}"
PILLAR = f"/{_t.PILLAR}"
EPISODE = f"/{_t.EPISODE}"
EPISODE_RESULT = f"/{_t.EPISODE_RESULT}"
CAMERA = f"/{_t.CAMERA}"
OBSERVATION = f"/{_t.OBSERVATION}"
ACTION_CHUNK = f"/{_t.ACTION_CHUNK}"
TEACHER_CHUNK = f"/{_t.TEACHER_CHUNK}"
MODE = f"/{_t.MODE}"
DIAGNOSTICS = _t.DIAGNOSTICS


@dataclass(frozen=True)
class TopicSpec:
    name: str
    msgtype: str  # rosbag2 spelling: pkg/msg/Type
    qos: str  # "sensor" | "control" | "latched" | "events" | "default": see koopman_control.ros.qos
    role: str  # "sensor": what the robot produces (played back live); "stack": what the stack computes
    required: bool = False  # the offline replay cannot run without it


STACK_TOPICS: dict[str, TopicSpec] = {t.name: t for t in (
    TopicSpec(JOINT_STATES, "sensor_msgs/msg/JointState", "sensor", "sensor", required=True),
    TopicSpec(TARGET, "geometry_msgs/msg/PointStamped", "latched", "sensor", required=True),
    TopicSpec(PILLAR, "geometry_msgs/msg/PointStamped", "latched", "sensor", required=True),
    TopicSpec(EPISODE, "std_msgs/msg/Header", "latched", "sensor"),
    TopicSpec(EPISODE_RESULT, "std_msgs/msg/String", "events", "sensor"),
    TopicSpec(CAMERA, "sensor_msgs/msg/Image", "sensor", "sensor"),
    TopicSpec(OBSERVATION, "trajectory_msgs/msg/JointTrajectory", "control", "stack"),
    TopicSpec(ACTION_CHUNK, "trajectory_msgs/msg/JointTrajectory", "control", "stack"),
    TopicSpec(TEACHER_CHUNK, "trajectory_msgs/msg/JointTrajectory", "control", "stack"),
    TopicSpec(MODE, "std_msgs/msg/String", "latched", "stack"),
    TopicSpec(DIAGNOSTICS, "diagnostic_msgs/msg/DiagnosticArray", "default", "stack"),
)}

# Recorded by default: everything but the camera (large; add it with --topics or --camera).
DEFAULT_RECORD = tuple(n for n in STACK_TOPICS if n != CAMERA)
# Played into a live stack: only what the robot side produces; the stack computes the rest itself.
PLAYBACK_TOPICS = tuple(n for n, t in STACK_TOPICS.items() if t.role == "sensor")


@cache
def typestore() -> Typestore:
    """Message definitions of ROS 2 kilted (the rclpy in use; jazzy's are identical for these types)."""
    from rosbags.typesys import Stores, get_typestore

    return get_typestore(Stores.ROS2_KILTED)


def has_header(msgtype: str) -> bool:
    """Whether the type starts with ``std_msgs/Header`` (its stamp then sits at CDR bytes 4..12)."""
    ts = typestore()
    if msgtype not in ts.types:
        return False
    fields = ts.get_msgdef(msgtype).fields
    return bool(fields) and fields[0][1][1] == "std_msgs/msg/Header"
