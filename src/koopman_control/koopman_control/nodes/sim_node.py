"""A simulated task as a robot on ROS topics: the Gen3 reach task (MuJoCo) or Push-T's pusher (``task``).

Publishes ``joint_states`` at the feedback rate from a real-time thread; episode announcements (latched
``std_msgs/Header``: ``stamp`` = the episode's start, ``frame_id`` = ``episode_<id>``, published one
``reset_delay`` ahead, see :mod:`koopman_control.core.episodes`); the task's other inputs on the topics its
contract names (``koopman_sim/tasks/<task>.yaml``: the reach target and pillar, latched and stamped with the
episode's start; Push-T's block pose with every joint sample, stamped like it); episode results
(``std_msgs/String``, JSON) and, when enabled, Gen3 camera frames rendered offscreen on their own thread.
Executes ``policy/action_chunk`` (``trajectory_msgs/JointTrajectory``) after the robot's own command checks
(:class:`~koopman_control.core.chunk.CommandChecks`; for the Gen3 the bridge's values from
``config/kinova.yaml``): what the sim accepts is what the arm would. A trajectory without points holds the
robot where it is. The Kinova bridge offers the same topics, so the two are interchangeable.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Header, String
from std_srvs.srv import Trigger
from trajectory_msgs.msg import JointTrajectory

from koopman_control import topics
from koopman_control.contracts import resolve_contract
from koopman_control.core.chunk import CommandChecks
from koopman_control.core.episodes import Announcement, episode_label
from koopman_control.core.realtime import PeriodicLoop
from koopman_control.core.sim_driver import SimDriver, result_line
from koopman_control.core.sim_tasks import make_task
from koopman_control.ros import convert, qos
from koopman_control.ros.base import ERROR, OK, WARN, KoopmanNode, ParameterError, run_node
from koopman_policy.contract import ContractError

NAME = "sim"


class SimNode(KoopmanNode):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NAME, **kwargs)
        import gen3_description as gen3

        p = {
            "task": self.declare("task", "gen3_reach_obstacle", "the task to simulate: gen3_reach_obstacle | pusht",
                                 read_only=True),
            "feedback_rate": self.declare("feedback_rate", 0.0, "joint_states rate (Hz), up to 1000; 0 = the task's "
                                                                "(500 Hz Gen3, 100 Hz Push-T)"),
            "physics_dt": self.declare("physics_dt", 0.002, "Gen3: MuJoCo step (s)"),
            "time_limit": self.declare("time_limit", 0.0, "episode time limit (s), from the first accepted chunk; "
                                                          "0 = the task's (8 s Gen3, 30 s Push-T)"),
            "seed": self.declare("seed", 0, "base seed of the episode sampler"),
            "sequential_seeds": self.declare("sequential_seeds", False, "episode k uses seed + k - 1 (the gym "
                                                                        "evaluation's seeds) instead of "
                                                                        "seed * 100003 + k"),
            "auto_reset": self.declare("auto_reset", True, "start a new episode after success/collision/timeout"),
            "reset_delay": self.declare("reset_delay", 0.1, "an episode is announced this long before the arm is "
                                                            "reset to it (s)"),
            "start_timeout": self.declare("start_timeout", 30.0, "an episode without an accepted chunk this long "
                                                                 "after its reset ends unscored (s)"),
            "watchdog_timeout": self.declare("watchdog_timeout", 0.15, "hold the arm still after this long "
                                                                       "without an accepted chunk (s)"),
            "max_start_deviation": self.declare("max_start_deviation", 0.35, "refuse chunks starting farther "
                                                                             "from the arm (rad)"),
            "max_chunk_age": self.declare("max_chunk_age", 0.1, "refuse chunks answering older observations (s)"),
            "interpolation": self.declare("interpolation", "zoh", "chunk interpolation: zoh | linear"),
            "model_path": self.declare("model_path", "", "MJCF of the arm ('' = gen3_description's gen3.xml)"),
            "publish_camera": self.declare("publish_camera", False, "render and publish camera frames"),
            "camera_rate": self.declare("camera_rate", 10.0, "camera frame rate (Hz)"),
            "camera_width": self.declare("camera_width", 128, "camera frame width (px)"),
            "camera_height": self.declare("camera_height", 96, "camera frame height (px)"),
            "camera_name": self.declare("camera_name", "overview", "MuJoCo camera to render"),
            "frame_id": self.declare("frame_id", "base_link", "frame of the target/pillar points"),
            "realtime_priority": self.declare("realtime_priority", 0, "SCHED_FIFO priority of the physics and "
                                                                      "executor threads (0 = normal)"),
            "position_lower": self.declare_array("position_lower", list(gen3.JOINT_LOWER), "joint position limits "
                                                 "(rad), as the arm's"),
            "position_upper": self.declare_array("position_upper", list(gen3.JOINT_UPPER), "joint position limits "
                                                 "(rad), as the arm's"),
        }
        self.realtime_priority = p["realtime_priority"]
        self.p = p
        try:
            self.contract = resolve_contract(p["task"])
            task = make_task(p["task"], physics_dt=p["physics_dt"], time_limit=p["time_limit"],
                             model_path=p["model_path"] or None)
            checks = None if task.own_checks() is not None else CommandChecks(
                p["position_lower"], p["position_upper"], watchdog_timeout=p["watchdog_timeout"],
                max_start_deviation=p["max_start_deviation"], max_chunk_age=p["max_chunk_age"],
                interpolation=p["interpolation"])
            self.driver = SimDriver(
                task, checks, feedback_rate_hz=p["feedback_rate"], seed=p["seed"],
                sequential_seeds=p["sequential_seeds"], auto_reset=p["auto_reset"], reset_delay_s=p["reset_delay"],
                start_timeout_s=p["start_timeout"])
        except (ValueError, FileNotFoundError, ContractError) as err:
            raise ParameterError(str(err)) from None
        if p["publish_camera"] and not hasattr(task, "arm"):
            raise ParameterError(f"task {p['task']} has no camera to render")
        self.joint_names = list(self.driver.joint_names)
        self.js_pub = self.create_publisher(JointState, topics.JOINT_STATES, qos.SENSOR_PUB)
        # The task's other inputs, on the topics its contract names.
        self.input_pubs = {f.name: (f, self.create_publisher(convert.message_class(f.type), f.topic,
                                                             qos.LATCHED if f.scope == "episode" else qos.SENSOR_PUB))
                           for f in self.contract.observation if f.kind == "vector" and f.topic}
        self.episode_pub = self.create_publisher(Header, topics.EPISODE, qos.LATCHED)
        self.result_pub = self.create_publisher(String, topics.EPISODE_RESULT, qos.EVENTS)
        self.image_pub = self.create_publisher(Image, topics.CAMERA, qos.SENSOR_PUB) \
            if p["publish_camera"] else None
        self.create_subscription(JointTrajectory, topics.ACTION_CHUNK, self._on_chunk, qos.CONTROL)
        self.create_service(Trigger, "~/reset_episode", self._on_reset)
        self.add_on_set_parameters_callback(self._on_params)
        self.loop = PeriodicLoop(1.0 / self.driver.feedback_period, self._cycle, name="sim-physics",
                                 priority=p["realtime_priority"])
        self._camera_stop = threading.Event()
        self._camera_thread: threading.Thread | None = None
        self.camera_rate_meter = None
        self.camera_error = ""
        self.start_diagnostics()

    def start(self) -> None:
        """Physics (and camera) threads start once the whole stack exists, so that no sample is published
        into nodes still being built (they would arrive stale). The first episode is announced at once and
        scored from its first accepted chunk, however long the other nodes take to come up."""
        if self.loop.running:
            return
        self._announce(self.driver.schedule_reset(self._now()))
        self.loop.start()
        time.sleep(0.01)
        if self.loop.priority_problem:
            self.get_logger().warning(f"physics thread at normal priority: {self.loop.priority_problem}")
        if self.image_pub is not None:
            self._camera_thread = threading.Thread(target=self._camera_loop, name="sim-camera", daemon=True)
            self._camera_thread.start()

    def _now(self) -> int:
        return time.time_ns()  # the node clock is the system clock (no sim time): stamps match a real robot's

    # -- real-time loop --------------------------------------------------------------------------------------
    def _cycle(self, skipped: int) -> None:
        now = self._now()
        st = self.driver.sample(now)
        if st.started is not None:  # before the sample: the task inputs of the episode this sample begins
            self._publish_inputs(st.stamp_ns, st.started.inputs)
        self.js_pub.publish(convert.joint_state(st.stamp_ns, self.joint_names, st.q, st.qd))
        if st.streams:
            self._publish_inputs(st.stamp_ns, st.streams)
        result, announced = self.driver.advance(now, skipped)
        if result is not None:
            self.result_pub.publish(String(data=json.dumps(result)))
            self.get_logger().info(result_line(result))
        if announced is not None:
            self._announce(announced)

    def _announce(self, ann: Announcement) -> None:
        msg = Header(frame_id=episode_label(ann.episode))
        msg.stamp = convert.to_time(ann.start_ns)
        self.episode_pub.publish(msg)

    def _publish_inputs(self, stamp_ns: int, values: dict[str, Any]) -> None:
        """Task inputs on their contract's topics, stamped like the sample they belong to (an episode's fixed
        inputs with its first sample: the ingest takes them for that episode only)."""
        for name, v in values.items():
            f, pub = self.input_pubs[name]
            pub.publish(convert.vector_msg(f, stamp_ns, v, self.p["frame_id"]))

    # -- commands --------------------------------------------------------------------------------------------
    def _on_chunk(self, msg: JointTrajectory) -> None:
        now = self._now()
        if not msg.points:
            self.driver.hold(now)
            return
        try:
            chunk = convert.chunk_from_msg(msg, self.joint_names)
        except ValueError as err:
            ok, reason = self.driver.refuse(str(err))
        else:
            ok, reason = self.driver.submit(chunk, now)
        if not ok:
            cause = reason.split(":")[0]
            # Chunks still in flight when an episode ends are refused by design: counted, not warned about.
            self.fault(f"chunk {cause}", f"action chunk refused: {reason}",
                       "debug" if cause == "outdated" else "warning")

    def _on_reset(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        ann = self.driver.schedule_reset(self._now())
        self._announce(ann)
        response.success = True
        response.message = json.dumps({"episode": ann.episode, "seed": ann.seed, "start_ns": ann.start_ns})
        return response

    def _on_params(self, params: list) -> Any:
        from rcl_interfaces.msg import SetParametersResult

        for prm in params:
            if prm.name == "auto_reset":
                self.driver.sequencer.auto_reset = self.coerce(prm)
            elif prm.name == "seed":
                self.driver.sequencer.seed = self.coerce(prm)
            elif prm.name in self._defaults:
                return SetParametersResult(successful=False, reason=f"{prm.name} is fixed at start-up")
        return SetParametersResult(successful=True)

    # -- camera ----------------------------------------------------------------------------------------------
    def _camera_loop(self) -> None:
        """Renders on its own thread (the EGL context lives here) from a snapshot of the physics state."""
        import mujoco

        from koopman_control.core.stats import RateMeter

        model = self.driver.task.arm.model  # type: ignore[attr-defined]
        data = mujoco.MjData(model)
        try:
            renderer = mujoco.Renderer(model, self.p["camera_height"], self.p["camera_width"])
        except Exception as err:  # no EGL/OSMesa: report, keep the arm running
            self.camera_error = f"offscreen rendering unavailable: {err}"
            self.get_logger().error(self.camera_error)
            return
        self.camera_rate_meter = RateMeter(self.p["camera_rate"])
        period = 1.0 / self.p["camera_rate"]
        t_next = time.monotonic()
        try:
            while not self._camera_stop.wait(max(0.0, t_next - time.monotonic())):
                t_next += period
                stamp = self._now()
                qpos, mocap = self.driver.snapshot()
                data.qpos[:] = qpos
                data.mocap_pos[:] = mocap
                mujoco.mj_kinematics(model, data)
                mujoco.mj_camlight(model, data)  # camera and light poses: without it both sit at the origin
                renderer.update_scene(data, camera=self.p["camera_name"])
                rgb = renderer.render()
                if self.image_pub is not None:
                    self.image_pub.publish(convert.image_msg(stamp, rgb))
                self.camera_rate_meter.tick(time.monotonic())
        finally:
            renderer.close()

    # -- reporting -------------------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        """Start a measurement window: rate statistics and the episode tally restart."""
        self.loop.rate.reset()
        self.loop.overruns = self.loop.skipped = 0
        with self.driver.lock:
            self.driver.results.clear()
        super().reset_stats()

    def metrics(self) -> dict[str, Any]:
        rate = self.loop.rate.summary()
        out = {"feedback": {**rate, "overruns": self.loop.overruns, "skipped_cycles": self.loop.skipped},
               **self.driver.summary(), **super().metrics()}
        if self.camera_rate_meter is not None:
            out["camera"] = self.camera_rate_meter.summary()
        return out

    def diagnostics(self) -> list[tuple[str, int, str, dict[str, Any]]]:
        fb = self.loop.rate.summary(last=int(self.p["feedback_rate"]) * 5)
        s = self.driver.summary()
        level, msg = OK, "running"
        if self.loop.error is not None:
            level, msg = ERROR, f"physics loop stopped: {self.loop.error!r}"
        elif fb["rate_hz"] is not None and fb["rate_hz"] < 0.95 * self.p["feedback_rate"]:
            level, msg = WARN, f"feedback rate {fb['rate_hz']:.0f} Hz below {self.p['feedback_rate']:.0f} Hz"
        ex = self.driver.executor
        return [("", level, msg, {
            "feedback_rate_hz": fb["rate_hz"], "jitter_ms": fb["jitter_ms"], "late_p99_ms": fb["late_p99_ms"],
            "overruns": self.loop.overruns, "episode": self.driver.episode,
            "episode_phase": self.driver.sequencer.phase.value, "episodes_done": s["episodes"],
            "success_rate": s["success_rate"], "executor": ex.state.value,
            "chunks_accepted": ex.counters.accepted, "chunks_rejected": ex.counters.rejected,
            "holds": ex.counters.holds, "watchdog_stops": ex.counters.timeouts,
            "last_reject": ex.counters.last_reject_reason})]

    def close(self) -> None:
        self.loop.stop()
        self._camera_stop.set()
        if self._camera_thread is not None:
            self._camera_thread.join(2.0)
        super().close()


def main(args: list[str] | None = None) -> int:
    return run_node(SimNode, args)


if __name__ == "__main__":
    raise SystemExit(main())
