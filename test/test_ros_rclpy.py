"""rclpy from the venv works: a real publisher and subscriber exchange a JointState over DDS, and both executors
the nodes spin on serve topics, timers and parameter services."""

from __future__ import annotations

import io
import sys
import threading
import time

import pytest
import rclpy
from rcl_interfaces.srv import SetParameters
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from sensor_msgs.msg import JointState

from koopman_control.ros.base import EXECUTOR_ENV, EXECUTORS, Spinner, executor_kind, make_executor
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


@pytest.mark.parametrize("kind", EXECUTORS)
def test_spinner_serves_subscriptions_timers_and_parameters(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both executors the nodes may spin on (KOOPMAN_CONTROL_EXECUTOR) serve what the nodes use: a topic from
    another participant, a timer, and a parameter set through the node's parameter service."""
    monkeypatch.setenv(EXECUTOR_ENV, kind)
    if executor_kind() != kind:
        pytest.skip(f"this rclpy has no {kind} executor (the nodes spin on {executor_kind()!r})")
    ctx_node, ctx_peer = ros_context(), ros_context()
    node = Node("test_spinner_node", context=ctx_node)
    node.declare_parameter("gain", 1.0)
    peer = Node("test_spinner_peer", context=ctx_peer)
    got: list[JointState] = []
    ticks: list[float] = []
    node.create_subscription(JointState, "/test_spinner/joint_states", got.append, 10)
    node.create_timer(0.01, lambda: ticks.append(time.monotonic()))
    pub = peer.create_publisher(JointState, "/test_spinner/joint_states", 10)
    client = peer.create_client(SetParameters, "/test_spinner_node/set_parameters")
    spin = Spinner([node], ctx_node)
    ex_peer = SingleThreadedExecutor(context=ctx_peer)
    ex_peer.add_node(peer)
    try:
        wait_until(lambda: pub.get_subscription_count() > 0 and client.service_is_ready(), 10.0,
                   what="discovery of the spun node")

        def sent_and_received() -> bool:
            pub.publish(JointState(name=["joint_1"], position=[0.5]))
            return bool(got)

        wait_until(sent_and_received, 10.0, interval=0.05, what="the JointState to arrive")
        future = client.call_async(SetParameters.Request(parameters=[Parameter("gain", value=2.5).to_parameter_msg()]))
        ex_peer.spin_until_future_complete(future, timeout_sec=10.0)
        assert future.result() is not None and future.result().results[0].successful
        assert node.get_parameter("gain").value == 2.5
        wait_until(lambda: len(ticks) >= 10, 5.0, what="ten timer callbacks")
        assert list(got[0].position) == [0.5]
        assert not spin.errors
    finally:
        spin.shutdown()
        assert not any(th.is_alive() for th in spin.threads)
        ex_peer.shutdown()
        node.destroy_node()
        peer.destroy_node()
        rclpy.shutdown(context=ctx_node)
        rclpy.shutdown(context=ctx_peer)


def test_unknown_executor_is_refused_with_its_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(EXECUTOR_ENV, "multi")
    with pytest.raises(ValueError, match="'multi'"):
        executor_kind()


def test_events_executor_starts_under_a_replaced_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    """rclpy's EventsExecutor() enables faulthandler on sys.stderr; a stderr without a file descriptor (captured
    output, an embedding host) must not stop a node from spinning."""
    monkeypatch.setenv(EXECUTOR_ENV, "events")
    if executor_kind() != "events":
        pytest.skip("this rclpy has no EventsExecutor")
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    ctx = ros_context()
    try:
        ex = make_executor(ctx)
        assert type(ex).__name__ == "EventsExecutor"
        ex.shutdown()
    finally:
        rclpy.shutdown(context=ctx)
