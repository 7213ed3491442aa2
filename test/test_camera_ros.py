"""The camera student in closed loop over real rclpy + DDS, through the stack's own nodes: sim_node renders the
camera the model names, camera_ingest_node turns frames into image observations, state_ingest_node gives the
state history, and policy_node serves ``camera_dkoopman`` (an image policy) and drives the simulated arm
through ``/policy/action_chunk``. The policy reads target and pillar only through the camera: its observation
names are the joint state alone, whatever else the state ingest adds.

The test's own participant watches the image observations (to check the frames are really rendered) and the
episode results.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import pytest
from conftest import Participant, wait_until
from sensor_msgs.msg import Image
from std_msgs.msg import String

from koopman_control.ros import convert, qos
from koopman_policy.catalog import resolve_policy

POLICY = "camera_dkoopman"
EPISODES = 6

try:
    ENTRY = resolve_policy(POLICY)
except ValueError:
    ENTRY = None

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("MUJOCO_GL", "egl") not in ("egl", "osmesa"),
                       reason="offscreen rendering needs MUJOCO_GL=egl or osmesa"),
    pytest.mark.skipif(ENTRY is None or ENTRY.onnx is None or not ENTRY.onnx.is_file(),
                       reason="the camera student is not shipped in models/"),
]


@dataclass
class Probe:
    image_means: list[float] = field(default_factory=list)
    image_shapes: set[tuple[int, int, str]] = field(default_factory=set)
    results: list[dict] = field(default_factory=list)

    def attach(self, p: Participant) -> None:
        p.node.create_subscription(Image, "/policy/image_observation", self._on_image, qos.CONTROL)
        p.node.create_subscription(String, "/task/episode_result", lambda m: self.results.append(json.loads(m.data)),
                                   qos.EVENTS)

    def _on_image(self, msg: Image) -> None:
        self.image_shapes.add((msg.height, msg.width, msg.encoding))
        _, hist = convert.float_image_from_msg(msg, 2)
        self.image_means.append(float(hist[-1].mean()))


@dataclass
class Run:
    probe: Probe
    policy: dict
    accepted: int
    refused: dict[str, int]
    camera_error: str


@pytest.fixture(scope="module")
def run(module_contexts, module_participant) -> Run:
    """``EPISODES`` episodes of the whole stack (no teacher: the student alone is measured)."""
    from koopman_control.bringup import Stack
    from koopman_control.stack import StackArgs

    overrides = {"sim": {"auto_reset": True, "seed": 3}}
    probe = Probe()
    probe.attach(module_participant("camera_probe"))
    stack = Stack.from_args(StackArgs(policy=POLICY, use_camera=True, teacher_fallback=False), overrides=overrides,
                            context=module_contexts())
    try:
        sim, pol = stack["sim"], stack["policy"]
        try:
            wait_until(lambda: len(sim.driver.results) >= EPISODES or sim.camera_error, 150.0, interval=0.2,
                       what=f"{EPISODES} episodes driven by the camera student")
        except TimeoutError:
            pytest.fail(f"{len(sim.driver.results)} episodes; policy {pol.metrics()}; camera: {sim.camera_error!r}, "
                        f"ingest: {stack['camera_ingest'].builder.reason!r}")
        stack.check()
        counters = sim.driver.executor.counters
        return Run(probe, pol.metrics(), counters.accepted, dict(counters.reject_reasons), sim.camera_error)
    finally:
        stack.close()


def test_camera_path_over_dds_drives_the_arm(run: Run) -> None:
    if run.camera_error:
        pytest.skip(run.camera_error)
    p, m = run.probe, run.policy
    assert m["policy"] == POLICY and m["fallback_events"] == 0 and not m["unhealthy"], m
    # The ingest sized the frames as the model was trained (from its ONNX metadata, through the stack).
    assert p.image_shapes == {(2 * 64, 64, "32FC3")}, p.image_shapes
    # The scene is mostly bright floor; a frame rendered without camera and light poses is nearly black.
    assert min(p.image_means) > 0.5, f"dark frames: min mean {min(p.image_means):.3f}"
    # Nothing the arm refuses, but for a chunk aged past 0.1 s on a loaded machine and, at most once per
    # episode boundary, the chunk in flight when the episode reset (its label is the old episode's).
    assert set(run.refused) <= {"stale", "outdated"}, run.refused
    assert run.refused.get("stale", 0) <= 2 and run.refused.get("outdated", 0) <= EPISODES, run.refused
    assert run.accepted >= m["published"] - m["holds"] - sum(run.refused.values())
    assert m["published"] >= 20 * EPISODES and m["compute_ms"]["p50"] < 20.0, m
    # Ticks without an image that belongs to them happen only while the camera restarts with an episode: its
    # first tick comes with the first joint sample after the reset, before a frame of the new scene exists.
    assert m["image_gaps"] <= 3 * (EPISODES + 1), m


def test_camera_student_reaches_targets_over_dds(run: Run) -> None:
    if run.camera_error:
        pytest.skip(run.camera_error)
    outcomes = [(r["success"], r["collision"], round(r["min_distance"], 3)) for r in run.probe.results[:EPISODES]]
    assert len(outcomes) == EPISODES
    assert sum(o[0] for o in outcomes) >= 3 and sum(o[1] for o in outcomes) <= 2, outcomes
