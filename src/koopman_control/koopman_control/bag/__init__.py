"""Rosbag2 recording, validation, offline replay evaluation and bag -> dataset conversion.

Bags are written and read with the pure-Python ``rosbags`` library (rosbag2 itself is not pip-installable),
in the standard rosbag2 layout (``metadata.yaml`` + one MCAP or sqlite3 file, CDR payloads, ROS 2 kilted
message definitions), so they open in ``ros2 bag info/play`` and in any MCAP tool. Nothing here imports
rclpy at module level: reading, replaying and converting bags work without a ROS installation.
"""

from koopman_control.bag.reader import (
    BagError,
    BagFormatError,
    BagTopicError,
    BagTruncatedError,
    BagTypeError,
    BagUnsortedError,
    RecordedRun,
    inspect_bag,
    load_run,
)
from koopman_control.bag.topics import STACK_TOPICS, TopicSpec

__all__ = [
    "STACK_TOPICS",
    "BagError",
    "BagFormatError",
    "BagTopicError",
    "BagTruncatedError",
    "BagTypeError",
    "BagUnsortedError",
    "RecordedRun",
    "TopicSpec",
    "inspect_bag",
    "load_run",
]
