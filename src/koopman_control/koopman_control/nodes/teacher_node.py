"""The diffusion teacher, serving fallback chunks on ``/teacher/action_chunk``.

Served from its ONNX export (DDIM-k unrolled into one graph, or the denoiser in a numpy DDIM loop when only
that exists). ``standby: on_demand`` computes only while the policy node is in ``teacher_fallback`` mode
(read from the latched ``/policy/mode``): on the switch it immediately answers the observation the student
failed on, so the takeover costs one teacher call plus two hops, well inside one 10 Hz period, and the
teacher takes no CPU from the student while it is healthy. ``standby: hot`` answers every observation (a
chunk is then already waiting when the student fails, at the price of a teacher call per tick).
Chunks use the same stamp, timing, episode label and noise as the policy node's; the policy node adopts one
only for an observation of the current episode (see :mod:`koopman_control.nodes.policy_node`).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from rcl_interfaces.msg import SetParametersResult
from std_msgs.msg import String
from trajectory_msgs.msg import JointTrajectory

from koopman_control import topics
from koopman_control.core.chunk import published_points
from koopman_control.core.episodes import episode_label, parse_episode
from koopman_control.core.policy_runner import PolicyLoadError, PolicyRunner
from koopman_control.core.stats import SampleStats
from koopman_control.core.supervisor import Mode
from koopman_control.nodes.policy_node import load_runner
from koopman_control.ros import convert, qos
from koopman_control.ros.base import ERROR, OK, KoopmanNode, run_node

NAME = "teacher"


class TeacherNode(KoopmanNode):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NAME, **kwargs)
        self.declare("policy", "teacher", "catalogue name or path of the teacher")
        self.declare("catalog_root", "", "directory holding config/policies.yaml ('' = search)", read_only=True)
        self.declare("standby", "on_demand", "on_demand: compute only in teacher_fallback mode; hot: always")
        self.declare("seed", 0, "noise seed (same convention as the policy node)")
        self.declare("noise", "decision", "decision: a fresh draw per chunk; episode: one draw per episode")
        self.declare("intra_op_threads", 1, "ONNX Runtime intra-op threads", read_only=True)
        self.declare("providers", "CPUExecutionProvider", "ONNX Runtime providers, comma-separated ('' = auto)")
        self.declare("teacher_steps", 10, "DDIM steps when served from the denoiser")
        self.declare("limit_margin", 0.0, "tolerance (rad) beyond the joint limits")
        if self.param("standby") not in ("on_demand", "hot"):
            from koopman_control.ros.base import ParameterError

            raise ParameterError(f"standby must be 'on_demand' or 'hot', got {self.param('standby')!r}")
        self.runner: PolicyRunner | None = None
        self.load_error = ""
        try:
            self.runner = load_runner(self, self.param("policy"))
        except PolicyLoadError as err:
            self.load_error = str(err)
            self.get_logger().error(f"teacher unavailable, no fallback chunks will be served: {err}")
        self.mode = Mode.STUDENT
        self._last_obs: tuple | None = None
        self._last_served = -1
        self.latency = SampleStats()
        self.compute = SampleStats()
        self.served = 0
        self.failures = 0
        self.last_failure = ""
        self.pub = self.create_publisher(JointTrajectory, topics.TEACHER_CHUNK, qos.TEACHER)
        self.create_subscription(String, topics.MODE, self._on_mode, qos.LATCHED)
        self.create_subscription(JointTrajectory, topics.OBSERVATION, self._on_observation, qos.CONTROL)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.start_diagnostics()

    def _active(self) -> bool:
        return self.param("standby") == "hot" or self.mode is Mode.FALLBACK

    def _on_mode(self, msg: String) -> None:
        try:
            self.mode = Mode(msg.data)
        except ValueError:
            return
        if self._active() and self._last_obs is not None:
            self._serve(*self._last_obs)

    def _on_observation(self, msg: JointTrajectory) -> None:
        if not msg.points:  # the ingest stopped: nothing current to answer
            self._last_obs = None
            return
        try:
            stamp, hist, names, _ = convert.observation_from_msg(msg)
        except ValueError as err:
            self.fault("malformed observation", f"malformed observation ignored: {err}", "error")
            return
        self._last_obs = (stamp, hist, names, parse_episode(msg.header.frame_id) or 0)
        if self._active():
            self._serve(*self._last_obs)

    def _serve(self, stamp: int, hist: np.ndarray, names: list[str], episode: int) -> None:
        runner = self.runner
        if runner is None or stamp <= self._last_served:
            return
        runner.new_episode(episode)
        res = runner.step(hist, names, stamp_ns=stamp)
        self.compute.add(res.compute_s * 1e3)
        if res.chunk is None:
            self.failures += 1
            self.last_failure = res.health.reason
            self.fault(f"failed {res.health.kind}", f"teacher failed: {res.health.reason}", "error")
            return
        m = runner.meta
        offsets, points = published_points(res.chunk, m.n_obs_steps, m.control_dt)
        self.pub.publish(convert.chunk_msg(stamp, m.action_names, offsets, points.astype(np.float64),
                                           episode_label(episode)))
        self._last_served = stamp
        self.served += 1
        self.latency.add((time.time_ns() - stamp) / 1e6)

    def _on_set_parameters(self, params: list) -> SetParametersResult:
        for prm in params:
            if prm.name == "standby" and prm.value not in ("on_demand", "hot"):
                return SetParametersResult(successful=False, reason="standby must be 'on_demand' or 'hot'")
            if prm.name == "policy":
                try:
                    runner = load_runner(self, str(prm.value))
                except PolicyLoadError as err:
                    return SetParametersResult(successful=False, reason=str(err))
                self.runner, self.load_error = runner, ""
        return SetParametersResult(successful=True)

    def metrics(self) -> dict[str, Any]:
        return {"policy": self.runner.name if self.runner else None, "served": self.served,
                "failures": self.failures, "latency_ms": self.latency.summary(), "compute_ms": self.compute.summary(),
                **super().metrics()}

    def diagnostics(self) -> list[tuple[str, int, str, dict[str, Any]]]:
        if self.runner is None:
            return [("", ERROR, f"teacher unavailable: {self.load_error}", {})]
        c = self.compute.summary(last=100)
        return [("", OK, f"{self.param('standby')}, policy mode {self.mode.value}", {
            "served": self.served, "failures": self.failures, "last_failure": self.last_failure,
            "compute_p50_ms": c["p50"], "compute_p99_ms": c["p99"]})]


def main(args: list[str] | None = None) -> int:
    return run_node(TeacherNode, args)


if __name__ == "__main__":
    raise SystemExit(main())
