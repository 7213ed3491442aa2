"""A stand-in for a ros2_control driver of the Gen3 (as ros2_kortex runs one): the MuJoCo Gen3 behind the
topics of ``joint_state_broadcaster`` and ``joint_trajectory_controller``, and the reach task's cell around it.

For trying and testing the stack's external-driver mode (``robot:=ros2_control``) without an arm or ros2_kortex.
On the topic level it does what those controllers do:

* ``joint_states`` (sensor_msgs/JointState) at ``feedback_rate``, continuous joints wrapped to ``(-pi, pi]``
  as ros2_kortex reports them;
* ``<controller>/joint_trajectory`` (trajectory_msgs/JointTrajectory): a new trajectory replaces the current one;
  it starts at ``header.stamp`` (zero: on receipt), points at their ``time_from_start``, positions interpolated
  linearly from the state at its start (``interpolation_method: splines``, the controller's default, with
  positions only) or each segment's end point taken at once (``none``), the last point held; joints may come
  in any order but all must be given; no points: hold where the arm is; ``cmd_timeout`` (0 = off, the
  controller's default) stops the arm when no trajectory came for that long;
* the cell: the task's target and pillar on ``task/target`` and ``task/pillar`` (latched, as a perception node
  would publish them) and the episode's result on ``task/episode_result`` when the hand reaches the target,
  hits the pillar or runs out of time, counted from the first trajectory (the stack takes a while to start).
  One episode per start (``seed``); ``~/reset_episode`` starts another.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import numpy as np
from geometry_msgs.msg import PointStamped
from sensor_msgs.msg import JointState
from std_msgs.msg import String
from std_srvs.srv import Trigger
from trajectory_msgs.msg import JointTrajectory

from koopman_control import topics
from koopman_control.core.realtime import PeriodicLoop
from koopman_control.ros import convert, qos
from koopman_control.ros.base import OK, WARN, KoopmanNode, ParameterError, run_node

NAME = "ros2_control_standin"


def wrap(q: np.ndarray, continuous: np.ndarray) -> np.ndarray:
    """Continuous joints to (-pi, pi], as a joint_state_broadcaster reports a ros2_kortex arm's."""
    out = np.asarray(q, dtype=np.float64).copy()
    c = continuous
    out[c] = np.pi - np.remainder(np.pi - out[c], 2 * np.pi)
    return out


class Ros2ControlStandinNode(KoopmanNode):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NAME, **kwargs)
        import gen3_description as gen3
        from koopman_sim.arm import Gen3Arm
        from koopman_sim.tasks.reach_obstacle import ReachObstacleTask

        p = {
            "controller_topic": self.declare("controller_topic", "/joint_trajectory_controller/joint_trajectory",
                                             "the trajectory controller's command topic", read_only=True),
            "feedback_rate": self.declare("feedback_rate", 500.0, "joint_states rate (Hz)", read_only=True),
            "interpolation_method": self.declare("interpolation_method", "splines", "splines (linear with "
                                                 "positions only) | none, as joint_trajectory_controller's"),
            "cmd_timeout": self.declare("cmd_timeout", 0.0, "stop after this long without a trajectory (s; 0 = "
                                                            "never, the controller's default)"),
            "seed": self.declare("seed", 0, "episode seed"),
            "time_limit": self.declare("time_limit", 8.0, "episode time limit (s)"),
            "frame_id": self.declare("frame_id", "base_link", "frame of the target/pillar points"),
        }
        if not 0 < p["feedback_rate"] <= 1000:
            raise ParameterError(f"feedback_rate must be in (0, 1000] Hz, got {p['feedback_rate']}")
        if p["interpolation_method"] not in ("splines", "none"):
            raise ParameterError(f"interpolation_method must be splines or none, got {p['interpolation_method']!r}")
        self.p = p
        self.joint_names = list(gen3.JOINT_NAMES)
        self.continuous = np.array([True, False, True, False, True, False, True])
        self.arm = Gen3Arm(physics_dt=1.0 / p["feedback_rate"])
        self.task = ReachObstacleTask(self.arm, time_limit=p["time_limit"])
        self.lock = threading.Lock()  # the physics thread against the trajectory callback and the reset service
        self._traj: tuple[int, np.ndarray, np.ndarray, np.ndarray] | None = None  # start, times, points, q at start
        self._received_ns = 0
        self._hold: np.ndarray | None = None
        self._episode = 0
        self._reported = True
        self._scoring = False  # from the first trajectory of the episode on
        self.trajectories = 0
        self.refused = 0
        self.js_pub = self.create_publisher(JointState, topics.JOINT_STATES, qos.SENSOR_PUB)
        self.target_pub = self.create_publisher(PointStamped, topics.TARGET, qos.LATCHED)
        self.pillar_pub = self.create_publisher(PointStamped, topics.PILLAR, qos.LATCHED)
        self.result_pub = self.create_publisher(String, topics.EPISODE_RESULT, qos.EVENTS)
        self.create_subscription(JointTrajectory, p["controller_topic"], self._on_trajectory, qos.CONTROL)
        self.create_service(Trigger, "~/reset_episode", self._on_reset)
        self.loop = PeriodicLoop(p["feedback_rate"], self._cycle, name="standin-physics")
        self.start_diagnostics()

    def start(self) -> None:
        if not self.loop.running:
            self._reset(time.time_ns())
            self.loop.start()

    # -- the cell ------------------------------------------------------------------------------------------------
    def _reset(self, now: int) -> dict[str, Any]:
        with self.lock:
            self._episode += 1
            seed = self.p["seed"] * 100_003 + self._episode
            self.task.reset(np.random.default_rng(seed))
            self.task.update()
            self._traj, self._hold, self._reported, self._scoring = None, self.arm.q, False, False
            target, pillar = self.task.target.copy(), self.task.pillar.copy()
        for pub, xyz in ((self.target_pub, target), (self.pillar_pub, pillar)):
            msg = PointStamped()
            msg.header.stamp = convert.to_time(now)
            msg.header.frame_id = self.p["frame_id"]
            msg.point.x, msg.point.y, msg.point.z = (float(v) for v in xyz)
            pub.publish(msg)
        return {"episode": self._episode, "seed": seed, "target": target.tolist(), "pillar": pillar.tolist()}

    def _on_reset(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        response.success, response.message = True, json.dumps(self._reset(time.time_ns()))
        return response

    # -- the controller --------------------------------------------------------------------------------------------
    def _on_trajectory(self, msg: JointTrajectory) -> None:
        now = time.time_ns()
        if not msg.points:
            with self.lock:
                self._traj, self._hold, self._received_ns = None, self.arm.q, now
            return
        index = {n: i for i, n in enumerate(msg.joint_names)}
        missing = [n for n in self.joint_names if n not in index]
        if missing or any(len(pt.positions) != len(msg.joint_names) for pt in msg.points):
            self.refused += 1
            self.fault("trajectory refused", f"trajectory refused: joints {missing} missing or ragged points")
            return
        start = convert.from_time(msg.header.stamp) or now
        perm = [index[n] for n in self.joint_names]
        times = np.array([start + convert.from_duration(pt.time_from_start) for pt in msg.points], dtype=np.int64)
        points = np.array([np.asarray(pt.positions, dtype=np.float64)[perm] for pt in msg.points])
        if not np.isfinite(points).all() or (len(times) > 1 and not (np.diff(times) > 0).all()):
            self.refused += 1
            self.fault("trajectory refused", "trajectory refused: non-finite positions or times not increasing")
            return
        with self.lock:
            self._traj = (start, times, points, self.arm.q)
            self._received_ns = now
            self._hold = None
            self.trajectories += 1
            if not self._scoring:
                self._scoring = True
                self.task.restart_clock()

    def _reference(self, now: int) -> np.ndarray:
        if self._traj is None:
            return self._hold if self._hold is not None else self.arm.q
        start, times, points, q0 = self._traj
        t = np.concatenate([[start], times])
        p = np.vstack([q0, points])
        if now >= t[-1]:
            return p[-1]
        if now <= t[0]:
            return p[0]
        i = int(np.searchsorted(t, now, side="right")) - 1
        if self.p["interpolation_method"] == "none":
            return p[i + 1]
        a = (now - t[i]) / max(t[i + 1] - t[i], 1)
        return p[i] + a * (p[i + 1] - p[i])

    def _cycle(self, skipped: int) -> None:
        now = time.time_ns()
        result = None
        with self.lock:
            q, qd = self.arm.q, self.arm.qd
            timeout = self.p["cmd_timeout"]
            if self._traj is not None and timeout > 0 and now - self._received_ns > timeout * 1e9:
                self._traj, self._hold = None, q
            self.arm.set_target(self._reference(now))
            self.arm.step(1 + min(skipped, 50))
            if self._scoring and not self._reported:
                self.task.update()
                if self.task.done:
                    self._reported = True
                    result = {"episode": self._episode, **self.task.result().to_dict()}
        self.js_pub.publish(convert.joint_state(now, self.joint_names, wrap(q, self.continuous), qd))
        if result is not None:
            self.result_pub.publish(String(data=json.dumps(result)))
            self.get_logger().info(f"episode {result['episode']}: success {result['success']}, collision "
                                   f"{result['collision']}, final distance {result['final_distance']:.3f} m")

    def metrics(self) -> dict[str, Any]:
        return {"trajectories": self.trajectories, "refused": self.refused, "episode": self._episode,
                **super().metrics()}

    def diagnostics(self) -> list[tuple[str, int, str, dict[str, Any]]]:
        level, msg = (WARN, f"loop stopped: {self.loop.error!r}") if self.loop.error else (OK, "running")
        return [("", level, msg, {"trajectories": self.trajectories, "refused": self.refused})]

    def close(self) -> None:
        self.loop.stop()
        super().close()


def main(args: list[str] | None = None) -> int:
    return run_node(Ros2ControlStandinNode, args)


if __name__ == "__main__":
    raise SystemExit(main())
