"""Kinova Gen3 through Kortex as a robot on the stack's topics (the drop-in for ``sim_node``).

Publishes ``/joint_states`` at the feedback rate (radians, continuous joints unwrapped) and executes
``/policy/action_chunk`` (``trajectory_msgs/JointTrajectory``) through :class:`KortexBridge`: joint speed
commands at tens of Hz (default) or 1 kHz low-level position frames (``control_mode: cyclic``), every
command limited, the watchdog always armed. Services (``std_srvs/Trigger``): ``~/emergency_stop``,
``~/clear_faults``, ``~/go_home``. Faults and rates on ``/diagnostics``.

``backend: standin`` serves the API from the MuJoCo Gen3 in this process (same bridge code path);
``task_source`` says where the task's target and pillar come from: ``standin`` (the stand-in's scene,
scored, with ``~/reset_episode`` and ``task/episode_result``, episodes announced and started as the sim node
does them, :mod:`koopman_control.core.episodes`), ``params`` (fixed ``target``/``pillar`` parameters, e.g.
measured in the real cell; one episode) or ``none``.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import numpy as np
from geometry_msgs.msg import PointStamped
from rcl_interfaces.msg import SetParametersResult
from sensor_msgs.msg import JointState
from std_msgs.msg import Header, String
from std_srvs.srv import Trigger
from trajectory_msgs.msg import JointTrajectory

import gen3_description as gen3
from koopman_control import topics
from koopman_control.core.episodes import Announcement, EpisodeSequencer, Phase, episode_label
from koopman_control.core.sim_driver import episode_summary, result_line
from koopman_control.kortex.api import KortexApiMissingError, load_api
from koopman_control.kortex.bridge import BridgeConfig, BridgeState, JointSample, KortexBridge
from koopman_control.kortex.client import ConnectionConfig, KortexClient, KortexError
from koopman_control.kortex.limits import DEFAULT_ACCELERATION, JointLimits, LimitsError
from koopman_control.ros import convert, qos
from koopman_control.ros.base import ERROR, OK, WARN, KoopmanNode, ParameterError, run_node

NAME = "kortex_bridge"
TASK_SOURCES = ("none", "standin", "params")


class KortexBridgeNode(KoopmanNode):
    diag_name = "koopman_control"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NAME, **kwargs)
        d = self.declare
        p = {
            "backend": d("backend", "kortex", "kortex (Kinova's kortex_api, a real arm) | standin (MuJoCo Gen3)"),
            "robot_ip": d("robot_ip", "192.168.1.10", "arm address"),
            "tcp_port": d("tcp_port", 10000, "Kortex high-level port"),
            "udp_port": d("udp_port", 10001, "Kortex cyclic (1 kHz) port"),
            "username": d("username", "admin", "Kortex user"),
            "password": d("password", "admin", "Kortex password"),
            "session_inactivity_timeout_ms": d("session_inactivity_timeout_ms", 60000, "session timeout (ms)"),
            "connection_inactivity_timeout_ms": d("connection_inactivity_timeout_ms", 2000,
                                                  "the arm drops (and stops) a connection silent this long (ms)"),
            "request_timeout_ms": d("request_timeout_ms", 3000, "high-level request timeout (ms)"),
            "control_mode": d("control_mode", "speed", "speed (joint speeds, tens of Hz) | cyclic (1 kHz low level)"),
            "feedback_rate": d("feedback_rate", 500.0, "joint_states rate (Hz), up to 1000"),
            "command_rate": d("command_rate", 40.0, "speed command rate (Hz)"),
            "cyclic_rate": d("cyclic_rate", 1000.0, "low-level frame rate (Hz)"),
            "watchdog_timeout": d("watchdog_timeout", 0.1, "stop the arm this long after the last chunk (s)"),
            "feedback_timeout": d("feedback_timeout", 0.1, "stop the arm while feedback is older than this (s)"),
            "position_gain": d("position_gain", 4.0, "speed mode: correction towards the chunk (1/s)"),
            "interpolation": d("interpolation", "linear", "chunk interpolation: linear | zoh"),
            "max_start_deviation": d("max_start_deviation", 0.35, "refuse chunks starting farther (rad)"),
            "max_chunk_age": d("max_chunk_age", 0.1, "refuse chunks answering older observations (s)"),
            "speed_scale": d("speed_scale", 0.5, "fraction of the rated joint speeds commands may use"),
            "home_timeout": d("home_timeout", 30.0, "go_home gives up after this long (s)"),
            "task_source": d("task_source", "none", "none | standin | params"),
            "auto_reset": d("auto_reset", True, "standin task: new episode after each result"),
            "seed": d("seed", 0, "standin task: episode k uses seed * 100003 + k"),
            "time_limit": d("time_limit", 8.0, "standin task: episode time limit (s)"),
            "reset_delay": d("reset_delay", 0.1, "standin task: an episode is announced this long before the "
                                                 "scene is reset to it (s)"),
            "start_timeout": d("start_timeout", 30.0, "standin task: an episode without an accepted chunk this "
                                                      "long after its reset ends unscored (s)"),
            "standin_physics_rate": d("standin_physics_rate", 500.0, "standin arm physics rate (Hz)"),
            "model_path": d("model_path", "", "standin arm MJCF ('' = gen3_description's gen3.xml)"),
            "frame_id": d("frame_id", "base_link", "frame of the target/pillar points"),
        }
        arrays = {
            "position_lower": list(gen3.JOINT_LOWER), "position_upper": list(gen3.JOINT_UPPER),
            "velocity_limits": list(gen3.VELOCITY_LIMITS),
            "acceleration_limits": [DEFAULT_ACCELERATION] * len(gen3.JOINT_NAMES),
            "continuous_joints": list(gen3.CONTINUOUS),
            "home_q": list(gen3.HOME_Q), "unwrap_reference": list(gen3.HOME_Q),
            "target": [], "pillar": [],
        }
        for name, default in arrays.items():
            p[name] = self.declare_array(name, default, f"{name} (one value per joint or axis)")
        self.p = p
        if p["task_source"] not in TASK_SOURCES:
            raise ParameterError(f"task_source must be one of {', '.join(TASK_SOURCES)}, got {p['task_source']!r}")
        if p["task_source"] == "standin" and p["backend"] != "standin":
            raise ParameterError("task_source standin needs backend standin (a real cell has no simulated scene)")
        try:
            self.limits = JointLimits.from_params(p)
            cfg = BridgeConfig(
                control_mode=p["control_mode"], feedback_rate=p["feedback_rate"], command_rate=p["command_rate"],
                cyclic_rate=p["cyclic_rate"], watchdog_timeout=p["watchdog_timeout"],
                feedback_timeout=p["feedback_timeout"], position_gain=p["position_gain"],
                interpolation=p["interpolation"], max_start_deviation=p["max_start_deviation"],
                max_chunk_age=p["max_chunk_age"], home_q=tuple(p["home_q"]), home_timeout=p["home_timeout"],
                unwrap_reference=tuple(p["unwrap_reference"]))
            conn = ConnectionConfig(
                ip=p["robot_ip"], tcp_port=p["tcp_port"], udp_port=p["udp_port"], username=p["username"],
                password=p["password"], session_inactivity_timeout_ms=p["session_inactivity_timeout_ms"],
                connection_inactivity_timeout_ms=p["connection_inactivity_timeout_ms"],
                request_timeout_ms=p["request_timeout_ms"])
            api = load_api(p["backend"])
        except (LimitsError, KortexApiMissingError, ValueError) as err:
            raise ParameterError(str(err)) from None
        self.joint_names = list(gen3.JOINT_NAMES)
        self.js_pub = self.create_publisher(JointState, topics.JOINT_STATES, qos.SENSOR_PUB)
        self.feedback_published = 0
        # Guards the episode sequencer and the stand-in's scene, touched by the feedback thread (resets at the
        # announced instant), the chunk callback (the first chunk starts the clock) and the task timer.
        # Always taken before the bridge's own lock.
        self._task_lock = threading.Lock()
        self.sequencer: EpisodeSequencer | None = None
        self.robot = self._standin_robot() if p["backend"] == "standin" else None
        self.bridge = KortexBridge(KortexClient(api, conn), self.limits, cfg, on_feedback=self._publish_state)
        self._reported = 0
        try:
            self.bridge.start()
        except (KortexError, ValueError) as err:
            self._release_standin()
            raise ParameterError(f"kortex bridge cannot start: {err}") from None
        try:
            self._setup_ros(p)
        except BaseException:
            self.bridge.close()
            self._release_standin()
            raise
        self.get_logger().info(
            f"kortex bridge up: backend {p['backend']} at {p['robot_ip']} (tcp {p['tcp_port']}, udp {p['udp_port']}), "
            f"{p['control_mode']} mode, watchdog {p['watchdog_timeout'] * 1e3:.0f} ms, speed scale {p['speed_scale']}")

    def _standin_robot(self) -> Any:
        from koopman_control.kortex import standin

        robot = standin.robot_at(self.p["robot_ip"])
        self._own_robot = robot is None
        if robot is None:
            with_task = self.p["task_source"] == "standin"
            robot = standin.StandinRobot(
                self.p["robot_ip"], physics_rate_hz=self.p["standin_physics_rate"],
                model_path=self.p["model_path"] or None, username=self.p["username"], password=self.p["password"],
                with_task=with_task, time_limit=self.p["time_limit"], seed=self.p["seed"])
            standin.serve(robot)
        return robot

    def _release_standin(self) -> None:
        if self.robot is not None and getattr(self, "_own_robot", False):
            from koopman_control.kortex import standin

            standin.unserve(self.robot)

    def _setup_ros(self, p: dict[str, Any]) -> None:
        self.create_subscription(JointTrajectory, topics.ACTION_CHUNK, self._on_chunk, qos.CONTROL)
        self.create_service(Trigger, "~/emergency_stop", self._srv(self.bridge.emergency_stop))
        self.create_service(Trigger, "~/clear_faults", self._srv(self.bridge.clear_faults))
        self.create_service(Trigger, "~/go_home", self._srv(self.bridge.go_home))
        self.add_on_set_parameters_callback(self._on_params)
        self.task_pubs: dict[str, Any] = {}
        if p["task_source"] != "none":
            self.task_pubs = {
                "target": self.create_publisher(PointStamped, topics.TARGET, qos.LATCHED),
                "pillar": self.create_publisher(PointStamped, topics.PILLAR, qos.LATCHED),
                "episode": self.create_publisher(Header, topics.EPISODE, qos.LATCHED),
                "result": self.create_publisher(String, topics.EPISODE_RESULT, qos.EVENTS),
            }
        if p["task_source"] == "params":
            for key in ("target", "pillar"):
                if len(p[key]) != 3 or not np.isfinite(p[key]).all():
                    raise ParameterError(f"task_source params needs {key} as 3 finite numbers (m), got {p[key]}")
            now = time.time_ns()
            self._announce(Announcement(1, now, 0))
            self._publish_task(now, p["target"], p["pillar"])
        elif p["task_source"] == "standin":
            self.sequencer = EpisodeSequencer(seed=p["seed"], reset_delay_s=p["reset_delay"],
                                              start_timeout_s=p["start_timeout"], auto_reset=p["auto_reset"])
            self.create_service(Trigger, "~/reset_episode", self._on_reset)
            with self._task_lock:
                self._announce(self.sequencer.schedule(time.time_ns()))
            self.create_timer(0.02, self._poll_task)
        self.start_diagnostics()

    # -- feedback -> joint_states ---------------------------------------------------------------------------------
    def _publish_state(self, s: JointSample) -> None:
        if self.sequencer is not None:
            with self._task_lock:
                ann = self.sequencer.due(s.stamp_ns)
                if ann is not None:
                    # The stand-in's scene is reset at the announced instant, from the feedback thread, so that
                    # every sample published from then on shows the new episode; this one was read before.
                    ep = self.robot.reset_episode(ann.seed)
                    self.bridge.reseed(ann.episode)
                    self.sequencer.begin(ann, s.stamp_ns)
                    self._publish_task(s.stamp_ns, ep["target"], ep["pillar"])
                    return
        msg = convert.joint_state(s.stamp_ns, self.joint_names, s.q, s.qd)
        msg.effort = s.effort.tolist()
        self.js_pub.publish(msg)
        self.feedback_published += 1

    # -- chunks ---------------------------------------------------------------------------------------------------
    def _on_chunk(self, msg: JointTrajectory) -> None:
        now = time.time_ns()
        if not msg.points:
            self.bridge.hold(now)
            return
        try:
            chunk = convert.chunk_from_msg(msg, self.joint_names)
        except ValueError as err:
            ok, reason = self.bridge.executor.reject(str(err))
        else:
            with self._task_lock:
                seq = self.sequencer
                if seq is not None and seq.phase is Phase.RESETTING:
                    ok, reason = self.bridge.executor.reject(
                        f"outdated: episode {seq.episode} is over, the arm is held for the next reset")
                else:
                    ok, reason = self.bridge.submit(chunk, now)
                    if ok and seq is not None and seq.chunk_accepted(now):
                        self.robot.start_scoring()
        if not ok:
            cause = reason.split(":")[0]
            self.fault(f"chunk {cause}", f"action chunk refused: {reason}",
                       "debug" if cause == "outdated" else "warning")

    # -- services -------------------------------------------------------------------------------------------------
    def _srv(self, fn: Any) -> Any:
        def handle(request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
            try:
                response.message = fn()
                response.success = True
            except (KortexError, ValueError) as err:
                response.success, response.message = False, str(err)
                self.get_logger().error(f"{fn.__name__}: {err}")
            return response

        return handle

    def _on_params(self, params: list) -> SetParametersResult:
        for prm in params:
            if prm.name == "auto_reset":
                self.p["auto_reset"] = self.coerce(prm)
                if self.sequencer is not None:
                    self.sequencer.auto_reset = self.p["auto_reset"]
            elif prm.name in self.p:
                return SetParametersResult(successful=False, reason=f"{prm.name} is fixed at start-up")
        return SetParametersResult(successful=True)

    # -- task (stand-in scene or parameters) -----------------------------------------------------------------------
    def _announce(self, ann: Announcement) -> None:
        msg = Header(frame_id=episode_label(ann.episode))
        msg.stamp = convert.to_time(ann.start_ns)
        self.task_pubs["episode"].publish(msg)

    def _publish_task(self, stamp_ns: int, target: Any, pillar: Any) -> None:
        """Target and pillar stamped with the episode's start: the ingest uses them for this episode only."""
        for key, xyz in (("target", target), ("pillar", pillar)):
            msg = PointStamped()
            msg.header.stamp = convert.to_time(stamp_ns)
            msg.header.frame_id = self.p["frame_id"]
            msg.point.x, msg.point.y, msg.point.z = (float(v) for v in xyz)
            self.task_pubs[key].publish(msg)

    def _poll_task(self) -> None:
        """Results of the stand-in's scoring, and episodes that never started, at 50 Hz."""
        now = time.time_ns()
        seq = self.sequencer
        with self._task_lock:
            results = self.robot.results
            while self._reported < len(results):
                r = results[self._reported]
                self._reported += 1
                if seq.phase is Phase.RUNNING:
                    self._finish(now, r)
            if seq.start_overdue(now):
                waited = (now - seq.start_ns) / 1e9
                self._finish(now, {"success": False, "collision": False, "side": None, "duration": 0.0,
                                   "start": f"no action chunk within {waited:.1f} s of the reset: is the policy "
                                            "running?"})

    def _finish(self, now: int, result: dict[str, Any]) -> None:
        out, nxt = self.sequencer.finish(now, {k: v for k, v in result.items() if k != "episode"})
        self.bridge.hold(now, command=False)
        self.task_pubs["result"].publish(String(data=json.dumps(out)))
        self.get_logger().info(result_line(out))
        if nxt is not None:
            self._announce(nxt)

    def _on_reset(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        now = time.time_ns()
        with self._task_lock:
            ann = self.sequencer.schedule(now)
            self.bridge.hold(now, command=False)
            self._announce(ann)
        response.success = True
        response.message = json.dumps({"episode": ann.episode, "seed": ann.seed, "start_ns": ann.start_ns})
        return response

    # -- reporting ------------------------------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        if self.sequencer is None:
            return episode_summary([])
        with self._task_lock:
            return episode_summary(list(self.sequencer.results))

    def metrics(self) -> dict[str, Any]:
        st = self.bridge.status()
        return {"feedback": self.bridge.rate_summary(), **self.summary(),
                "commands": {"accepted": st["chunks_accepted"], "rejected": st["chunks_rejected"],
                             "holds": st["holds"], "timeouts": st["watchdog_stops"],
                             "refused_by_cause": st["refused_by_cause"],
                             "stops": list(self.bridge.executor.counters.stops),
                             "state": str(self.bridge.executor.state)},
                "watchdog_latency_ms": self.bridge.watchdog_latency_ms.summary(),
                "bridge": st, **super().metrics()}

    def check(self) -> None:
        """Raise if a bridge thread died (the bringup's health check, like the sim's physics loop)."""
        errors = self.bridge.loop_errors()
        if errors:
            raise RuntimeError(f"kortex bridge thread stopped: {errors[0]}")

    def reset_stats(self) -> None:
        loop = self.bridge._cyc_loop or self.bridge._fb_loop
        if loop is not None:
            loop.rate.reset()
        if self.sequencer is not None:
            with self._task_lock:
                self.sequencer.results.clear()
        super().reset_stats()

    def diagnostics(self) -> list[tuple[str, int, str, dict[str, Any]]]:
        st = self.bridge.status()
        fb = self.bridge.rate_summary()
        level, msg = OK, "running"
        errors = self.bridge.loop_errors()
        if errors:
            level, msg = ERROR, f"bridge thread stopped: {errors[0]}"
        elif self.bridge.state is BridgeState.FAULT:
            level, msg = ERROR, f"fault: {st['fault']}"
        elif self.bridge.state is BridgeState.HOMING:
            level, msg = WARN, "moving home"
        elif st["executor"] == "hold":
            level, msg = WARN, "stopped by the watchdog: no fresh action chunk"
        elif fb.get("rate_hz") is not None and fb["rate_hz"] < 0.9 * self.p["feedback_rate"]:
            level, msg = WARN, f"feedback rate {fb['rate_hz']:.0f} Hz below {self.p['feedback_rate']:.0f} Hz"
        values = {k: v for k, v in st.items() if k != "q"}
        values.update(feedback_rate_hz=fb.get("rate_hz"), jitter_ms=fb.get("jitter_ms"), backend=self.p["backend"],
                      robot_ip=self.p["robot_ip"], speed_scale=self.p["speed_scale"])
        return [("", level, msg, values)]

    def close(self) -> None:
        if self._closed:
            return
        errors = self.bridge.close()
        if errors:
            self.get_logger().warning(f"kortex shutdown: {'; '.join(errors)}")
        else:
            self.get_logger().info("kortex sessions closed (tcp, udp)")
        self._release_standin()
        super().close()


def main(args: list[str] | None = None) -> int:
    return run_node(KortexBridgeNode, args)


if __name__ == "__main__":
    raise SystemExit(main())
