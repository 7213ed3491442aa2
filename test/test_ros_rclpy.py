"""rclpy from the venv works: a real publisher and subscriber exchange a JointState over DDS."""

from __future__ import annotations

import threading

import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from sensor_msgs.msg import JointState

from koopman_control.testing import ros_context, wait_until


def test_joint_state_round_trip_over_dds() -> None:
    # Two contexts = two DDS participants: the message crosses the transport, not an in-process shortcut.
    ctx_pub, ctx_sub = ros_context(), ros_context()
    pub_node = Node("test_js_pub", context=ctx_pub)
    sub_node = Node("test_js_sub", context=ctx_sub)
    got: list[JointState] = []
    sub_node.create_subscription(JointState, "/test_rclpy/joint_states", got.append, 10)
    pub = pub_node.create_publisher(JointState, "/test_rclpy/joint_states", 10)
    ex = SingleThreadedExecutor(context=ctx_sub)
    ex.add_node(sub_node)
    th = threading.Thread(target=ex.spin, daemon=True)
    th.start()
    try:
        wait_until(lambda: pub.get_subscription_count() > 0, 10.0, what="DDS discovery of the subscriber")
        msg = JointState()
        msg.header.stamp.sec, msg.header.stamp.nanosec = 12, 345
        msg.name = [f"joint_{i}" for i in range(1, 8)]
        msg.position = [0.1 * i for i in range(7)]
        msg.velocity = [-0.2 * i for i in range(7)]

        def sent_and_received() -> bool:
            pub.publish(msg)
            return bool(got)

        wait_until(sent_and_received, 10.0, interval=0.05, what="the JointState to arrive")
        m = got[0]
        assert list(m.name) == list(msg.name)
        assert list(m.position) == list(msg.position)
        assert list(m.velocity) == list(msg.velocity)
        assert (m.header.stamp.sec, m.header.stamp.nanosec) == (12, 345)
    finally:
        ex.shutdown()
        th.join(2.0)
        pub_node.destroy_node()
        sub_node.destroy_node()
        rclpy.shutdown(context=ctx_pub)
        rclpy.shutdown(context=ctx_sub)
