"""The serving path runs where torch cannot be imported: the state ingest, the policy node and the teacher node
(its unrolled DDIM graph, and its denoiser in the numpy DDIM loop), each started as ``python -m
koopman_control.nodes.<node> --ros-args ...`` in a process whose import system refuses torch, diffusers, the
``onnx`` package and ``safetensors.torch``, serve the shipped catalogue policies over real DDS.

The test publishes what a robot cell would (joint states, the task's target and pillar); the ingest turns them
into observations, which the policy and both teachers answer with chunks. Any refused import is printed by the
blocker, so one that a node swallowed still fails the test.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import CollectedProcess, wait_until
from geometry_msgs.msg import PointStamped
from sensor_msgs.msg import JointState
from std_msgs.msg import String
from trajectory_msgs.msg import JointTrajectory

from koopman_control import topics
from koopman_control.ros import qos
from koopman_control.ros.convert import to_time
from koopman_control.testing import session_domain_id
from koopman_sim import gen3

REPO = Path(__file__).resolve().parents[1]
BLOCKED = ("torch", "diffusers", "onnx", "safetensors.torch")
MARK = "BLOCKED IMPORT"
#: Runs a node module as ``python -m`` would, after installing a finder that refuses the blocked packages.
PRELUDE = f"""
import runpy, sys
class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name in {BLOCKED!r} or name.partition(".")[0] in {BLOCKED[:3]!r}:
            print("{MARK}", name, file=sys.stderr, flush=True)
            raise ImportError(f"{{name}} may not be imported on the serving path")
        return None
sys.meta_path.insert(0, NoTorch())
runpy.run_module(sys.argv.pop(1), run_name="__main__", alter_sys=True)
"""
DENOISER = REPO / "models" / "gen3_teacher" / "denoiser.onnx"
LOOP_CHUNK = "/teacher_loop/action_chunk"


class Node(CollectedProcess):
    """A node module in its own torch-free process; its output collected line by line."""

    def __init__(self, module: str, args: list[str], domain: int) -> None:
        self.label = " ".join([module, *(a for a in args if a.startswith("__node"))])
        super().__init__([sys.executable, "-c", PRELUDE, f"koopman_control.nodes.{module}", "--ros-args", *args],
                         domain, KOOPMAN_CONTROL_ROOT=str(REPO))

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._reader.join(5)
        return self.output


@pytest.fixture
def nodes():
    started: list[Node] = []
    yield started
    for node in reversed(started):
        node.stop()


def _points(msgs: list) -> list:
    return [m for _, m in msgs if m.points]


def test_ingest_policy_and_teachers_serve_without_torch(nodes, participant) -> None:
    domain = session_domain_id()
    nodes += [
        Node("state_ingest_node", [], domain),
        Node("policy_node", ["-p", "policy:=dkoopman", "-p", "teacher_fallback:=false"], domain),
        Node("teacher_node", ["-p", "policy:=teacher", "-p", "standby:=hot"], domain),
        Node("teacher_node", ["-r", "__node:=teacher_loop", "-r", f"/{topics.TEACHER_CHUNK}:={LOOP_CHUNK}",
                              "-p", f"policy:={DENOISER}", "-p", "standby:=hot", "-p", "teacher_steps:=10"], domain),
    ]
    probe = participant("torch_free_probe")
    observations = probe.record(f"/{topics.OBSERVATION}", JointTrajectory, qos.CONTROL)
    chunks = probe.record(f"/{topics.ACTION_CHUNK}", JointTrajectory, qos.CONTROL)
    teacher = probe.record(f"/{topics.TEACHER_CHUNK}", JointTrajectory, qos.TEACHER)
    loop = probe.record(LOOP_CHUNK, JointTrajectory, qos.TEACHER)
    modes = probe.record(f"/{topics.MODE}", String, qos.LATCHED)
    joints = probe.publisher(f"/{topics.JOINT_STATES}", JointState, qos.SENSOR_PUB)
    start = time.time_ns()
    for name, point in (("target", (0.58, -0.02, 0.16)), ("pillar", (0.41, -0.02, 0.15))):
        pub = probe.publisher(f"/task/{name}", PointStamped, qos.LATCHED)
        msg = PointStamped()
        msg.header.stamp = to_time(start)
        msg.point.x, msg.point.y, msg.point.z = point
        pub.publish(msg)
    state = JointState(name=list(gen3.JOINT_NAMES), position=[float(q) for q in gen3.HOME_Q],
                       velocity=[0.0] * len(gen3.JOINT_NAMES))

    def served() -> bool:
        state.header.stamp = to_time(time.time_ns())
        joints.publish(state)
        return bool(_points(chunks) and _points(teacher) and _points(loop))

    try:
        wait_until(served, 90.0, interval=0.01, what="chunks from the policy node and both teacher nodes")
    except TimeoutError:
        logs = "\n\n".join(f"--- {n.label}\n" + "\n".join(n.lines[-30:]) for n in nodes)
        pytest.fail(f"observations {len(observations)}, chunks {len(_points(chunks))}, teacher "
                    f"{len(_points(teacher))}, loop {len(_points(loop))}, modes {probe.messages(f'/{topics.MODE}')}"
                    f"\n{logs}")
    assert [m.data for _, m in modes][-1] == "student"
    obs = observations[-1][1]
    assert len(obs.joint_names) == 20 and len(obs.points) == 2
    for msgs in (chunks, teacher, loop):
        chunk = _points(msgs)[-1]
        assert chunk.joint_names == list(gen3.JOINT_NAMES)
        assert np.isfinite([p.positions for p in chunk.points]).all()
    logs = {n.label: n.stop() for n in nodes}
    for label, text in logs.items():
        assert MARK not in text, f"{label} tried to import a blocked package:\n{text}"
    assert all(n.proc.returncode == 0 for n in nodes), {n.label: n.proc.returncode for n in nodes}
