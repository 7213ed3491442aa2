"""The camera student in closed loop over real rclpy + DDS: sim_node renders the ``workspace`` camera,
camera_ingest_node turns frames into image observations, state_ingest_node (``use_task`` off: joint state
only) gives the state history, and the student drives the simulated arm through ``/policy/action_chunk``.

The policy node does not consume ``/policy/image_observation`` yet, so a small bridge node here plays its
part for an image policy: it pairs each state observation with the newest image observation, runs
:class:`OnnxImagePolicy` (noise drawn once per episode) and publishes the chunk as the policy node does.
Target and pillar reach the policy only through the camera.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from sensor_msgs.msg import Image
from std_msgs.msg import String
from trajectory_msgs.msg import JointTrajectory

from koopman_control.core.chunk import published_points
from koopman_control.core.observation import NS
from koopman_control.nodes.policy_node import episode_of
from koopman_control.ros import convert, qos
from koopman_control.testing import ros_context, wait_until
from koopman_policy.onnx_image_policy import OnnxImagePolicy

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "models" / "gen3_camera_dkoopman" / "policy.onnx"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("MUJOCO_GL", "egl") not in ("egl", "osmesa"),
                       reason="offscreen rendering needs MUJOCO_GL=egl or osmesa"),
    pytest.mark.skipif(not MODEL.is_file(), reason="the camera student is not shipped in models/"),
]


class ImagePolicyBridge:
    """State observation + newest image observation -> OnnxImagePolicy -> action chunk (one per tick)."""

    def __init__(self, ctx, path: Path, max_pair_gap_s: float = 0.15) -> None:
        self.policy = OnnxImagePolicy(path, providers=["CPUExecutionProvider"])  # as the policy node serves
        self.node = Node("camera_policy_bridge", context=ctx)
        self.pub = self.node.create_publisher(JointTrajectory, "/policy/action_chunk", qos.CONTROL)
        self.node.create_subscription(Image, "/policy/image_observation", self._on_image, qos.CONTROL)
        self.node.create_subscription(JointTrajectory, "/policy/observation", self._on_state, qos.CONTROL)
        self.results: list[dict] = []
        self.node.create_subscription(String, "/task/episode_result",
                                      lambda m: self.results.append(json.loads(m.data)), qos.EVENTS)
        self.max_gap_ns = round(max_pair_gap_s * NS)
        self.image: tuple[int, np.ndarray] | None = None
        self.episode = -1
        self.noise: np.ndarray | None = None
        self.chunks = 0
        self.unpaired = 0
        self.compute_ms: list[float] = []

    def _on_image(self, msg: Image) -> None:
        m = self.policy.metadata
        h, w = self.policy.image_size
        assert (msg.encoding, msg.height, msg.width) == ("32FC3", m.n_obs_steps * h, w)
        hist = np.frombuffer(bytes(msg.data), dtype="<f4").reshape(m.n_obs_steps, h, w, 3)
        self.image = (convert.from_time(msg.header.stamp), hist)

    def _on_state(self, msg: JointTrajectory) -> None:
        stamp, hist, names, _ = convert.observation_from_msg(msg)
        m = self.policy.metadata
        assert names == m.obs_names  # joint state only: the ingest was told not to add target and pillar
        if self.image is None or abs(stamp - self.image[0]) > self.max_gap_ns:
            self.unpaired += 1
            return
        episode = episode_of(msg.header.frame_id)
        if episode != self.episode:
            self.episode = episode
            self.noise = np.random.default_rng([0, episode]).standard_normal((m.horizon, m.action_dim),
                                                                               dtype=np.float32)
        t0 = time.perf_counter()
        chunk = self.policy.predict_action(self.image[1], hist, self.noise)
        self.compute_ms.append((time.perf_counter() - t0) * 1e3)
        offsets, points = published_points(chunk, m.n_obs_steps, m.control_dt)
        self.pub.publish(convert.chunk_msg(stamp, m.action_names, offsets, points.astype(np.float64)))
        self.chunks += 1


@pytest.mark.xfail(strict=False, reason="known gap: the camera student succeeds in 0.72 of gym episodes, but this "
                   "path replans on every tick, which these chunk policies do not survive reliably")
def test_camera_student_closed_loop_over_dds() -> None:
    from koopman_control.bringup import Stack
    from koopman_control.stack import StackArgs, build_stack

    policy = OnnxImagePolicy(MODEL, providers=["CPUExecutionProvider"])
    (h, w), camera = policy.image_size, policy.camera
    overrides = {
        "sim": {"camera_name": camera, "camera_width": w, "camera_height": h, "camera_rate": 20.0,
                "auto_reset": True, "seed": 3},
        "state_ingest": {"use_task": False},
        "camera_ingest": {"width": w, "height": h},
    }
    specs = [s for s in build_stack(StackArgs(use_camera=True, teacher_fallback=False), overrides=overrides)
             if s.name != "policy"]  # the bridge below plays the policy node for the image policy
    ctx, ctx_bridge = ros_context(), ros_context()
    bridge = ImagePolicyBridge(ctx_bridge, MODEL)
    ex = SingleThreadedExecutor(context=ctx_bridge)
    ex.add_node(bridge.node)
    th = threading.Thread(target=ex.spin, daemon=True)
    th.start()
    stack = Stack(specs, context=ctx)
    try:
        sim, images = stack["sim"], stack["camera_ingest"]
        try:
            wait_until(lambda: len(bridge.results) >= 3 or sim.camera_error, 120.0, interval=0.2,
                       what="three episodes driven by the camera student")
        except TimeoutError:
            pytest.fail(f"{len(bridge.results)} episodes, {bridge.chunks} chunks, {bridge.unpaired} unpaired "
                        f"state observations; camera: {sim.camera_error!r}, ingest: {images.builder.reason!r}")
        if sim.camera_error:
            pytest.skip(sim.camera_error)
        counters = sim.driver.executor.counters
        assert counters.rejected == 0 and counters.accepted >= bridge.chunks - 2
        assert bridge.chunks >= 20 and np.median(bridge.compute_ms) < 20.0
        assert bridge.unpaired <= 3 * len(bridge.results)  # only at episode starts, before frames resume
        outcomes = bridge.results[:3]
        assert sum(r["success"] for r in outcomes) >= 2, outcomes
    finally:
        stack.close()
        ex.shutdown()
        th.join(2.0)
        bridge.node.destroy_node()
        rclpy.shutdown(context=ctx)
        rclpy.shutdown(context=ctx_bridge)
