"""QoS profiles of the stack's topics, in one place so every publisher and subscriber agrees."""

from rclpy.duration import Duration
from rclpy.qos import DurabilityPolicy, HistoryPolicy, LivelinessPolicy, QoSProfile, ReliabilityPolicy

# High-rate sensor streams: the newest sample matters, a lost one is replaced 2 ms later. Best-effort
# subscribers also match the reliable publishers of real drivers.
SENSOR_SUB = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=5, reliability=ReliabilityPolicy.BEST_EFFORT)
SENSOR_PUB = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=5, reliability=ReliabilityPolicy.RELIABLE)
# Control messages (observations, chunks): reliable, only the newest is worth anything.
CONTROL = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=2, reliability=ReliabilityPolicy.RELIABLE)
# The teacher's chunks: control, plus liveliness asserted by the teacher's process, so that the policy node learns
# within a second that the teacher is gone (killed, crashed) although it publishes only on demand.
TEACHER_LEASE_S = 1.0
TEACHER = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=2, reliability=ReliabilityPolicy.RELIABLE,
                     liveliness=LivelinessPolicy.AUTOMATIC, liveliness_lease_duration=Duration(seconds=TEACHER_LEASE_S))
# State that a late joiner must still get (task target, episode id, mode): latched.
LATCHED = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1, reliability=ReliabilityPolicy.RELIABLE,
                     durability=DurabilityPolicy.TRANSIENT_LOCAL)
EVENTS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=50, reliability=ReliabilityPolicy.RELIABLE,
                    durability=DurabilityPolicy.TRANSIENT_LOCAL)
