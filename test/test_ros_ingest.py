"""The ingest nodes through topics: observations at the policy rate from a 500 Hz joint-state stream;
NaN, stale and implausible input stop the flow (reported on /diagnostics, and downstream with an observation
without points) and it resumes with a fresh history; camera frames from the sim become normalised image
observations."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PointStamped
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Header
from trajectory_msgs.msg import JointTrajectory

from koopman_control.nodes.state_ingest_node import StateIngestNode
from koopman_control.ros import convert, qos
from koopman_control.ros.base import Spinner
from koopman_control.testing import ros_context, wait_until

JOINTS = [f"joint_{i}" for i in range(1, 8)]


class FakeArm:
    """Publishes /joint_states at 500 Hz from its own participant, with injectable faults."""

    def __init__(self, ctx) -> None:
        self.node = Node("fake_arm", context=ctx)
        self.js = self.node.create_publisher(JointState, "/joint_states", qos.SENSOR_PUB)
        self.fault: str | None = None
        self.obs: list[tuple[int, JointTrajectory]] = []
        self.diag: list[DiagnosticArray] = []
        self.node.create_subscription(JointTrajectory, "/policy/observation",
                                      lambda m: self.obs.append((time.time_ns(), m)), qos.CONTROL)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self.diag.append, 10)
        start = time.time_ns()
        ann = Header(frame_id="episode_1")
        ann.stamp = convert.to_time(start)
        self.node.create_publisher(Header, "/task/episode", qos.LATCHED).publish(ann)
        for topic, xyz in (("/task/target", (0.6, -0.02, 0.17)), ("/task/pillar", (0.41, -0.01, 0.15))):
            pub = self.node.create_publisher(PointStamped, topic, qos.LATCHED)
            msg = PointStamped()
            msg.header.stamp = convert.to_time(start)
            msg.point.x, msg.point.y, msg.point.z = xyz
            pub.publish(msg)
        self.ex = SingleThreadedExecutor(context=ctx)
        self.ex.add_node(self.node)
        self._stop = threading.Event()
        self.threads = [threading.Thread(target=self.ex.spin, daemon=True),
                        threading.Thread(target=self._loop, daemon=True)]
        for t in self.threads:
            t.start()

    def _loop(self) -> None:
        k = 0
        t_next = time.monotonic()
        while not self._stop.is_set():
            t_next += 0.002
            time.sleep(max(0.0, t_next - time.monotonic()))
            k += 1
            stamp = time.time_ns()
            q = np.full(7, 0.001 * k)
            if self.fault == "nan":
                q[3] = np.nan
            elif self.fault == "huge":
                q[3] = 1e9
            elif self.fault == "stale":
                stamp -= 300_000_000
            elif self.fault == "silent":
                continue
            self.js.publish(convert.joint_state(stamp, JOINTS, q, np.zeros(7)))

    def status(self) -> str:
        for arr in reversed(self.diag):
            for st in arr.status:
                if st.name.endswith("/state_ingest"):
                    return {kv.key: kv.value for kv in st.values}.get("status", "")
        return ""

    def close(self) -> None:
        self._stop.set()
        self.ex.shutdown()
        for t in self.threads:
            t.join(2.0)
        self.node.destroy_node()


@pytest.fixture
def ingest() -> Iterator[tuple[StateIngestNode, FakeArm]]:
    ctx_node, ctx_arm = ros_context(), ros_context()
    node = StateIngestNode(context=ctx_node, parameter_overrides=[Parameter("policy_rate", value=20.0)])
    spin = Spinner(node.spin_nodes(), ctx_node)
    arm = FakeArm(ctx_arm)
    try:
        wait_until(lambda: len(arm.obs) >= 3, 15.0, what="observations from the ingest")
        yield node, arm
    finally:
        arm.close()
        spin.shutdown()
        node.close()
        rclpy.shutdown(context=ctx_node)
        rclpy.shutdown(context=ctx_arm)


def test_observations_at_policy_rate_with_history(ingest) -> None:
    _, arm = ingest
    n0 = len(arm.obs)
    wait_until(lambda: len(arm.obs) >= n0 + 20, 3.0, what="20 observations")
    got = arm.obs[n0:n0 + 20]
    rate = (len(got) - 1) / ((got[-1][0] - got[0][0]) / 1e9)
    assert 15 < rate < 25, f"{rate:.1f} observations/s, expected 20"
    _, hist, names, stamps = convert.observation_from_msg(got[-1][1])
    assert hist.shape == (2, 20) and names[:2] == ["q_joint_1", "q_joint_2"] and names[14] == "target_x"
    assert abs((stamps[1] - stamps[0]) / 1e6 - 50) < 3  # one policy period apart
    assert hist[1, 0] > hist[0, 0]  # newest last
    np.testing.assert_allclose(hist[1, 14:], [0.6, -0.02, 0.17, 0.41, -0.01, 0.15], atol=1e-6)
    assert got[-1][1].header.frame_id == "episode_1"
    lat_ms = [(rx - convert.from_time(m.header.stamp)) / 1e6 for rx, m in got]
    assert np.median(lat_ms) < 20


@pytest.mark.parametrize("fault", ["nan", "huge", "stale", "silent"])
def test_bad_input_stops_observations_then_resumes(ingest, fault: str) -> None:
    node, arm = ingest
    n0 = len(arm.obs)
    arm.fault = fault
    n = wait_until(lambda: next((k + 1 for k, (_, m) in enumerate(arm.obs) if k >= n0 and not m.points), None),
                   2.0, what="the observation without points that tells the policy to hold")
    wait_until(lambda: time.time_ns() - arm.obs[n - 1][0] > 500_000_000, 2.0, what="half a second to pass")
    assert len(arm.obs) == n, f"observations kept flowing with {fault} input"
    want = "stale" if fault in ("stale", "silent") else "invalid"
    assert node.builder.status.value == want and node.builder.reason
    wait_until(lambda: arm.status() == want, 3.0, what=f"/diagnostics to report {want}")
    arm.fault = None
    wait_until(lambda: len(arm.obs) > n, 2.0, what="observations to resume")
    _, hist, _, stamps = convert.observation_from_msg(arm.obs[n][1])
    assert stamps[0] != stamps[1] and np.isfinite(hist).all()  # a fresh history, not the old one re-sent
    assert stamps[0] > convert.from_time(arm.obs[n - 1][1].header.stamp) + 400_000_000


@pytest.mark.skipif(os.environ.get("MUJOCO_GL", "egl") not in ("egl", "osmesa"),
                    reason="offscreen rendering needs MUJOCO_GL=egl or osmesa")
def test_camera_frames_become_normalised_image_observations() -> None:
    from koopman_control.bringup import Stack
    from koopman_control.stack import StackArgs

    ctx, ctx_probe = ros_context(), ros_context()
    probe = Node("image_probe", context=ctx_probe)
    frames: list[Image] = []
    obs: list[Image] = []
    probe.create_subscription(Image, "/camera/image_raw", frames.append, qos.SENSOR_SUB)
    probe.create_subscription(Image, "/policy/image_observation", obs.append, qos.CONTROL)
    ex = SingleThreadedExecutor(context=ctx_probe)
    ex.add_node(probe)
    th = threading.Thread(target=ex.spin, daemon=True)
    th.start()
    overrides = {"sim": {"camera_rate": 20.0}, "camera_ingest": {"width": 64, "height": 48}}
    stack = Stack.from_args(StackArgs(use_camera=True, teacher_fallback=False), overrides=overrides, context=ctx)
    try:
        sim = stack["sim"]
        try:
            wait_until(lambda: len(obs) >= 3 or sim.camera_error, 30.0, what="image observations")
        except TimeoutError:
            pytest.fail(f"no image observations; camera error: {sim.camera_error!r}, frames: {len(frames)}")
        if sim.camera_error:
            pytest.skip(sim.camera_error)
        f = frames[-1]
        assert (f.height, f.width, f.encoding) == (96, 128, "rgb8")
        o = obs[-1]
        assert (o.height, o.width, o.encoding) == (2 * 48, 64, "32FC3")
        arr = np.frombuffer(bytes(o.data), dtype="<f4").reshape(2, 48, 64, 3)
        assert np.isfinite(arr).all() and arr.min() >= 0.0 and arr.max() <= 1.0 and arr.std() > 0.01
    finally:
        stack.close()
        ex.shutdown()
        th.join(2.0)
        probe.destroy_node()
        rclpy.shutdown(context=ctx)
        rclpy.shutdown(context=ctx_probe)
