"""Runs the selected student on every observation and publishes its action chunk; falls back to the teacher.

Topics (names are parameters, because the control path lives on a companion node, see below):
  in  ``/policy/observation`` (JointTrajectory, from state_ingest), ``/teacher/action_chunk`` (teacher_node),
      ``/policy/image_observation`` (32FC3 image history from camera_ingest; read by camera policies only)
  out ``/policy/action_chunk`` (JointTrajectory: header.stamp = observation stamp, points from
      time_from_start 0 every control_dt), ``/policy/mode`` (latched std_msgs/String), ``/diagnostics``

A control tick is the arrival of an observation (the ingest emits them at the policy rate from the robot's
own sample stamps); latency is chunk publication minus observation stamp, and a tick counts as missed when
no chunk for it was published within one period, or when no observation arrived for it.

Receding horizon, as the policies were trained and evaluated: a plan is followed until ``execute_steps`` of
its points (0 = the model's ``n_action_steps``) have become active, on the model's own time grid
(:class:`~koopman_control.core.plan.PlanFollower`: at a 10 Hz task and policy rate that is ``execute_steps``
ticks, at 100 Hz the same time); a new plan is also made at every new episode and on every change of mode. In
between, each tick republishes the rest of the plan from the present instant on, stamped with the present
observation, so the arm's watchdog sees a fresh command every period. The student is judged (exception, NaN,
limits, deadline, OOD) on each plan it makes. In ``teacher_fallback`` the teacher's chunk for a tick becomes
the plan and is followed the same way, while the student keeps being judged once per model period (so that
``recover_ticks`` means the same time at 10 and 100 Hz) and the return to it is not delayed by the plan.
Taking a fresh plan every tick (``execute_steps: 1``) closes the loop through the first step of each chunk,
which these one-step students were not trained for (measured in the gym task with dkoopman: 10 of 10 episodes
collided, against 10 of 10 successes with 8 executed steps).

Parameter ``policy`` (catalogue name or path) can be set at run time: the new model is loaded and probed on
the current observation in the parameter callback, on the node's own executor thread, and only a model that
passes is handed to the control thread, which swaps it in at the start of its next tick. The control path
therefore runs on a companion node ``<name>_control`` with its own executor thread: a slow load (or a refused
one) never delays a tick. A refused model leaves the running one untouched and the reason is returned in
the set-parameters result.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
from rcl_interfaces.msg import SetParametersResult
from rclpy.node import Node
from sensor_msgs.msg import Image
from std_msgs.msg import String
from trajectory_msgs.msg import JointTrajectory

from koopman_control.core.chunk import published_points
from koopman_control.core.observation import NS
from koopman_control.core.plan import PlanFollower
from koopman_control.core.policy_runner import PolicyLoadError, PolicyRunner
from koopman_control.core.stats import RateMeter, SampleStats
from koopman_control.core.supervisor import FallbackSupervisor, Mode
from koopman_control.ros import convert, qos
from koopman_control.ros.base import ERROR, OK, WARN, KoopmanNode, run_node

NAME = "policy"


def episode_of(frame_id: str) -> int:
    """The ingest writes ``episode_<id>`` into the observation's frame_id (0 when absent)."""
    if frame_id.startswith("episode_"):
        try:
            return int(frame_id[8:])
        except ValueError:
            return 0
    return 0


def load_runner(node: KoopmanNode, name: str) -> PolicyRunner:
    """Load a policy with the node's serving parameters (shared by the policy and teacher nodes)."""
    return PolicyRunner.load(
        name or None, root=node.param("catalog_root") or None, intra_op_threads=node.param("intra_op_threads"),
        seed=node.param("seed"), teacher_steps=node.param("teacher_steps"),
        ood_threshold=node.param("ood_threshold") if node.has_parameter("ood_threshold") else None,
        limit_margin=node.param("limit_margin") if node.has_parameter("limit_margin") else 0.0,
        providers=[p.strip() for p in node.param("providers").split(",") if p.strip()] or None,
        noise_per=node.param("noise"))


def probe_input(runner: PolicyRunner, last: tuple | None) -> tuple[np.ndarray, list[str]]:
    """The newest real observation if there is one, else the middle of the model's training range."""
    if last is not None:
        return last[1], last[2]
    m = runner.meta
    mid = (np.asarray(m.obs_low) + np.asarray(m.obs_high)) / 2
    return np.repeat(mid[None], m.n_obs_steps, axis=0).astype(np.float32), list(m.obs_names)


class PolicyNode(KoopmanNode):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NAME, **kwargs)
        from koopman_sim.gen3 import JOINT_NAMES
        from koopman_sim.tasks.reach_obstacle import OBS_NAMES

        self.declare("policy", "", "catalogue name or path of the policy to run ('' = catalogue default)")
        self.declare("catalog_root", "", "directory holding config/policies.yaml ('' = search)", read_only=True)
        self.declare("policy_rate", 10.0, "control rate (Hz): ticks, deadline and missed-tick accounting")
        self.declare("deadline_ms", 0.0, "time budget of one student call (ms); 0 = 80 % of a policy period")
        self.declare("teacher_fallback", True, "fall back to teacher_node's chunks when the student is unhealthy")
        self.declare("recover_ticks", 10, "healthy student ticks before leaving the fallback")
        self.declare("ood_threshold", 0.0, "OOD score threshold; 0 = the model's ood_threshold metadata")
        self.declare("limit_margin", 0.0, "tolerance (rad) beyond the joint limits before an action is unhealthy")
        self.declare("seed", 0, "noise seed; the noise is drawn per (seed, episode, observation stamp)")
        self.declare("noise", "decision", "decision: a fresh draw per plan; episode: one draw per episode")
        self.declare("intra_op_threads", 1, "ONNX Runtime intra-op threads", read_only=True)
        self.declare("providers", "CPUExecutionProvider", "ONNX Runtime providers, comma-separated ('' = "
                                                          "TensorRT, CUDA, CPU: the first that works)")
        self.declare("teacher_steps", 10, "DDIM steps when a teacher is served from its denoiser")
        self.declare("history_steps", 2, "observation history the ingest provides (n_obs_steps)")
        self.declare("execute_steps", 0, "plan points executed before the next plan replaces it (0 = the model's "
                                         "n_action_steps, 1 = a new plan every tick)")
        self.realtime_priority = self.declare("realtime_priority", 0, "SCHED_FIFO priority of the control "
                                                                      "thread (0 = normal)", read_only=True)
        self.declare("observation_topic", "/policy/observation", "observation input", read_only=True)
        self.declare("chunk_topic", "/policy/action_chunk", "action chunk output", read_only=True)
        self.declare("teacher_chunk_topic", "/teacher/action_chunk", "teacher chunk input", read_only=True)
        self.declare("mode_topic", "/policy/mode", "mode output (latched)", read_only=True)
        self.declare("image_topic", "/policy/image_observation", "image observation input", read_only=True)
        self.declare("max_image_age", 0.25, "camera policies: the newest image observation of the same episode "
                                             "serves a tick when its stamp is at most this far (s) from the tick's")
        self.obs_names = list(OBS_NAMES)
        self.joint_names = list(JOINT_NAMES)
        self.period_ns = round(NS / self.param("policy_rate"))
        self.supervisor = FallbackSupervisor(self.param("teacher_fallback"), self.param("recover_ticks"))
        self.runner: PolicyRunner | None = None
        self.load_error = ""
        self._pending: PolicyRunner | None = None
        self._lock = threading.Lock()
        self._last_obs: tuple | None = None  # (stamp, history, names, episode)
        self._episode_start: tuple[int, int | None] = (-1, None)  # (episode, stamp of its first sample)
        self._last_judged = -(2**62)  # stamp of the student's last call
        # statistics (written by the control thread, read by diagnostics/bringup)
        self.latency = SampleStats()  # ms, every published chunk
        self.student_latency = SampleStats()
        self.teacher_latency = SampleStats()
        self.compute = SampleStats()  # ms, model call only
        self.arrival = SampleStats()  # ms, observation stamp -> received here (sensor + ingest + two hops)
        self.tick_rate = RateMeter(self.param("policy_rate"))
        self.ticks = 0
        self.missed_ticks = 0
        self.deadline_misses = 0
        self.published = 0
        self.teacher_plans = 0
        self.bad_observations = 0
        self.swaps = 0
        self.last_ood: float | None = None
        self._prev_stamp: int | None = None
        self._last_rx: float | None = None
        self._prev_served = True
        self._last_pub_stamp = -1
        self.plan = PlanFollower()  # the plan being followed, keyed by (episode, mode)
        self._teacher_latest: JointTrajectory | None = None
        self._awaiting_teacher: tuple[int, int] | None = None  # (stamp, episode) of a fallback tick without a plan
        self._image: tuple[int, int, np.ndarray] | None = None  # newest image observation: stamp, episode, frames
        self.image_gaps = 0  # camera policy ticks without a fresh image observation
        self.image_error = ""

        try:
            runner = load_runner(self, self.param("policy"))
            self._validate(runner)
            self.runner = runner
            self.supervisor.select(runner.is_teacher)
        except PolicyLoadError as err:
            self.load_error = str(err)
            self.supervisor.mode = Mode.HOLD
            self.get_logger().error(f"no policy running (the arm holds): {err}")

        self.mode_pub = self.create_publisher(String, self.param("mode_topic"), qos.LATCHED)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        # Control path on its own node/executor thread (see module docstring).
        self.control = Node(f"{self.get_name()}_control", context=self.context, namespace=self.get_namespace(),
                            use_global_arguments=False, start_parameter_services=False)
        self.companions.append(self.control)
        self.chunk_pub = self.control.create_publisher(JointTrajectory, self.param("chunk_topic"), qos.CONTROL)
        self.control.create_subscription(JointTrajectory, self.param("teacher_chunk_topic"), self._on_teacher_chunk,
                                         qos.CONTROL)
        self.control.create_subscription(JointTrajectory, self.param("observation_topic"), self._on_observation,
                                         qos.CONTROL)
        self.control.create_subscription(Image, self.param("image_topic"), self._on_image, qos.CONTROL)
        self._published_mode: Mode | None = None
        self._publish_mode()
        self.start_diagnostics()

    def control_path(self) -> list[Node]:
        return [self.control]

    # -- parameters (node executor thread) -------------------------------------------------------------------
    def _validate(self, runner: PolicyRunner) -> None:
        runner.check_interface(self.obs_names, self.joint_names, self.param("history_steps"))
        hist, names = probe_input(runner, self._last_obs)
        median_s = runner.probe(hist, names, image=self._image[2] if self._image is not None else None)
        deadline = self.deadline_ns() / 1e9
        if median_s > deadline:
            raise PolicyLoadError(f"policy {runner.name!r} is too slow for {self.param('policy_rate'):g} Hz: "
                                  f"{median_s * 1e3:.1f} ms per call > deadline {deadline * 1e3:.1f} ms")

    def deadline_ns(self) -> int:
        # Default: the call must leave a fifth of the period for transport, so the chunk is out before the next
        # tick. A tighter budget would discard chunks that still arrive in time and, at rates the teacher
        # cannot serve (100 Hz), turn a harmless 6 ms spike into ten ticks without a chunk.
        ms = self.param("deadline_ms")
        return round(ms * 1e6) if ms > 0 else self.period_ns * 4 // 5

    def _on_set_parameters(self, params: list) -> SetParametersResult:
        staged: PolicyRunner | None = None
        params = [prm for prm in params if prm.name in self._defaults]  # e.g. use_sim_time is rclpy's
        for prm in params:
            try:
                value = self.coerce(prm)
            except ValueError as err:
                return SetParametersResult(successful=False, reason=str(err))
            if prm.name == "policy":
                try:
                    staged = load_runner(self, value)
                    self._validate(staged)
                except PolicyLoadError as err:
                    self.get_logger().warning(f"policy {value!r} refused, keeping "
                                              f"{self.runner.name if self.runner else 'none'}: {err}")
                    return SetParametersResult(successful=False, reason=str(err))
            elif prm.name == "policy_rate" and not value > 0:
                return SetParametersResult(successful=False, reason="policy_rate must be positive")
            elif prm.name == "recover_ticks" and value < 1:
                return SetParametersResult(successful=False, reason="recover_ticks must be >= 1")
        for prm in params:  # everything valid: apply
            value = self.coerce(prm)
            if prm.name == "teacher_fallback":
                self.supervisor.set_fallback_enabled(value)
            elif prm.name == "recover_ticks":
                self.supervisor.recover_ticks = value
            elif prm.name == "policy_rate":
                self.period_ns = round(NS / value)
            elif prm.name == "ood_threshold" and self.runner is not None:
                self.runner.ood_threshold = value if value > 0 else self.runner.meta.ood_threshold
        if staged is not None:
            with self._lock:
                self._pending = staged
            self.get_logger().info(f"policy {staged.name!r} ({staged.source}) validated; swapping at the next tick")
        return SetParametersResult(successful=True)

    # -- control (companion executor thread) -----------------------------------------------------------------
    def _now(self) -> int:
        return time.time_ns()

    def _take_pending(self) -> None:
        if self._pending is None:
            return
        with self._lock:
            runner, self._pending = self._pending, None
        if runner is not None:
            self.runner = runner
            self.plan.clear()  # the new policy plans from this tick on
            self.load_error = ""
            self.swaps += 1
            self.supervisor.select(runner.is_teacher, self._now())
            self._publish_mode()

    def _account(self, stamp: int) -> None:
        """Missed ticks: the previous tick unserved, or whole periods without an observation."""
        if self._prev_stamp is not None:
            if not self._prev_served:
                self.missed_ticks += 1
            gap = stamp - self._prev_stamp
            if gap > 1.5 * self.period_ns:
                self.missed_ticks += round(gap / self.period_ns) - 1
        self._prev_stamp = stamp
        self._prev_served = False

    def _publish_chunk(self, msg: JointTrajectory, stamp: int, stats: SampleStats) -> None:
        self.chunk_pub.publish(msg)
        now = self._now()
        lat_ms = (now - stamp) / 1e6
        self.latency.add(lat_ms)
        stats.add(lat_ms)
        self.published += 1
        self._last_pub_stamp = stamp
        if stamp == self._prev_stamp and now - stamp <= self.period_ns:
            self._prev_served = True

    def _on_observation(self, msg: JointTrajectory) -> None:
        t_rx = self._now()
        try:
            stamp, hist, names, step_stamps = convert.observation_from_msg(msg)
        except ValueError as err:
            self.bad_observations += 1
            self.get_logger().error(f"malformed observation ignored: {err}", throttle_duration_sec=2.0)
            return
        episode = episode_of(msg.header.frame_id)
        self.arrival.add((t_rx - stamp) / 1e6)
        self.ticks += 1
        self._last_rx = time.monotonic()
        self.tick_rate.tick(self._last_rx)
        self._account(stamp)
        self._last_obs = (stamp, hist, names, episode)
        if self._episode_start[0] != episode:  # its first observation: every step is the episode's first sample
            self._episode_start = (episode, int(step_stamps[0]))
        self._take_pending()
        runner = self.runner
        if runner is None:
            return
        runner.new_episode(episode)
        if self.supervisor.mode is not Mode.FALLBACK and self._continue_plan(episode, runner, stamp):
            return
        if self.supervisor.mode is Mode.FALLBACK and stamp - self._last_judged < 0.9 * runner.meta.control_dt * NS:
            # Judged once per model period, so recover_ticks means the same time at any policy rate.
            self._follow_fallback(episode, runner, stamp)
            return
        self._last_judged = stamp
        image = None
        if runner.image_size is not None:
            image = self._paired_image(stamp, episode, runner)
            if image is None:  # the camera stopped or lags: keep to the current plan, never reuse an old frame
                self.image_gaps += 1
                self.get_logger().warning(f"no image observation for this tick: {self.image_error}",
                                          throttle_duration_sec=2.0)
                if self.supervisor.mode is Mode.FALLBACK:
                    self._follow_fallback(episode, runner, stamp)
                return
        res = runner.step(hist, names, budget_s=self.deadline_ns() / NS, image=image, stamps_ns=step_stamps,
                          episode_start_ns=self._episode_start[1], stamp_ns=stamp)
        self.compute.add(res.compute_s * 1e3)
        self.last_ood = res.ood_score
        if res.health.kind == "deadline":
            self.deadline_misses += 1
        mode = self.supervisor.update(res.health, stamp)
        if mode is not self._published_mode:
            self._publish_mode()
            if not res.health.ok:
                self.get_logger().warning(f"{mode.value}: {res.health.reason}")
        serve = mode is Mode.STUDENT or (mode is Mode.TEACHER and res.chunk is not None
                                         and res.health.kind in ("ok", "deadline", "ood"))
        if serve and res.chunk is not None:
            m = runner.meta
            _, points = published_points(res.chunk, m.n_obs_steps, m.control_dt)
            self._adopt_plan(points, m.control_dt, (episode, mode), stamp)
        elif mode is Mode.FALLBACK:
            self._follow_fallback(episode, runner, stamp)

    def _follow_fallback(self, episode: int, runner: PolicyRunner, stamp: int) -> None:
        """A fallback tick: the teacher's plan, or, without one, wait for the teacher."""
        if not self._continue_plan(episode, runner, stamp):
            self._await_teacher(stamp, episode)

    def _await_teacher(self, stamp: int, episode: int) -> None:
        """A fallback tick without a teacher plan: take the teacher's newest chunk if it is recent enough, else
        keep the arm on the last plan of this episode (what it would follow anyway until its command timeout)
        so that the teacher's compute time, longer than a period at 100 Hz, costs no tick."""
        self._awaiting_teacher = (stamp, episode)
        if self._teacher_latest is not None:
            self._take_teacher_plan(self._teacher_latest)
        key, points = self.plan.key, self.plan.points
        if self._awaiting_teacher is not None and points is not None and key is not None and key[0] == episode:
            rest = self.plan.remaining(stamp, key, len(points))
            if rest is not None:
                self._publish_points(stamp, *rest)

    def _on_image(self, msg: Image) -> None:
        try:
            stamp, hist = convert.float_image_from_msg(msg, self.param("history_steps"))
        except ValueError as err:
            self.image_error = f"image observation refused: {err}"
            self._image = None
            return
        self._image = (stamp, episode_of(msg.header.frame_id), hist)

    def _paired_image(self, stamp: int, episode: int, runner: PolicyRunner) -> np.ndarray | None:
        """The newest image observation if it can serve this tick: same episode, stamp within ``max_image_age``.

        The camera ingest ticks on its own timer, so its newest observation trails a state tick by up to one
        policy period plus the frame's age (at a 20 Hz camera and a 10 Hz policy, up to about 170 ms
        measured). Within an episode the camera mainly shows where target and pillar are, which do not move,
        while the joint state comes from the state observation of the tick itself.
        """
        if self._image is None:
            self.image_error = self.image_error or "no image observation yet (is camera_ingest running?)"
            return None
        img_stamp, img_episode, hist = self._image
        if img_episode != episode:
            self.image_error = f"newest image observation is from episode {img_episode}, the tick from {episode}"
            return None
        gap_s = abs(stamp - img_stamp) / NS
        if gap_s > self.param("max_image_age"):
            self.image_error = f"newest image observation is {gap_s * 1e3:.0f} ms from the state observation"
            return None
        if hist.shape[1:3] != runner.image_size or len(hist) < runner.meta.n_obs_steps:
            self.image_error = (f"image observation {hist.shape[2]}x{hist.shape[1]} does not match policy "
                                f"{runner.name!r} ({runner.image_size[1]}x{runner.image_size[0]})")
            return None
        self.image_error = ""
        return hist[-runner.meta.n_obs_steps:]

    def _continue_plan(self, episode: int, runner: PolicyRunner, stamp: int) -> bool:
        """Follow the current plan this tick (True), or let the caller make a new one (False)."""
        steps = self.param("execute_steps") or runner.meta.n_action_steps
        rest = self.plan.remaining(stamp, (episode, self.supervisor.mode), steps)
        if rest is None:
            return False
        self._publish_points(stamp, *rest)
        return True

    def _adopt_plan(self, points: np.ndarray, dt: float, key: tuple[int, Mode], stamp: int,
                    tick: int | None = None) -> None:
        """Follow a plan made at ``stamp`` and publish it for ``tick`` (default: the planning tick itself)."""
        tick = stamp if tick is None else tick
        self.plan.adopt(points, dt, stamp, key)
        self._awaiting_teacher = None
        self._publish_points(tick, *self.plan.remaining(tick, key, len(points)))

    def _publish_points(self, stamp: int, offsets: np.ndarray, points: np.ndarray) -> None:
        """The plan from the present instant on, stamped with the present observation."""
        out = convert.chunk_msg(stamp, self.joint_names, offsets, points)
        student = self.supervisor.mode is Mode.STUDENT
        self._publish_chunk(out, stamp, self.student_latency if student else self.teacher_latency)

    def _on_teacher_chunk(self, msg: JointTrajectory) -> None:
        self._teacher_latest = msg
        if self.supervisor.mode is Mode.FALLBACK:
            self._take_teacher_plan(msg)

    def _take_teacher_plan(self, msg: JointTrajectory) -> None:
        """Adopt the teacher's chunk as the plan if it answers the fallback tick waiting for one: computed for
        that tick's observation or, when the teacher is slower than the ticks, for one less than a control
        period older (followed on its own time grid from the present instant)."""
        waiting = self._awaiting_teacher
        if waiting is None or self.runner is None:
            return
        tick, episode = waiting
        stamp = convert.from_time(msg.header.stamp)
        if not tick - round(self.runner.meta.control_dt * NS) < stamp <= tick:
            return
        try:
            chunk = convert.chunk_from_msg(msg, self.joint_names)
        except ValueError as err:
            self.get_logger().error(f"teacher chunk refused: {err}", throttle_duration_sec=2.0)
            return
        dt = float(np.median(np.diff(chunk.times_ns))) / NS if len(chunk.times_ns) > 1 else 0.0
        self.teacher_plans += 1
        self._adopt_plan(chunk.positions, dt, (episode, Mode.FALLBACK), stamp, tick)

    def _publish_mode(self) -> None:
        mode = self.supervisor.mode
        self._published_mode = mode
        self.mode_pub.publish(String(data=mode.value))

    # -- reporting -------------------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        """Start a measurement window (the bench discards its warm-up)."""
        for st in (self.latency, self.student_latency, self.teacher_latency, self.compute, self.arrival):
            st.reset()
        self.tick_rate.reset()
        self.ticks = self.missed_ticks = self.deadline_misses = self.published = self.teacher_plans = 0
        self.bad_observations = self.image_gaps = 0
        self.supervisor.fallback_events = 0
        self.supervisor.unhealthy_by_kind.clear()

    def metrics(self) -> dict[str, Any]:
        sup = self.supervisor
        return {
            "policy": self.runner.name if self.runner else None,
            "source": self.runner.source if self.runner else None,
            "mode": sup.mode.value,
            "ticks": self.ticks,
            "published": self.published,
            "missed_ticks": self.missed_ticks,
            "deadline_misses": self.deadline_misses,
            "fallback_events": sup.fallback_events,
            "unhealthy": dict(sup.unhealthy_by_kind),
            "last_unhealthy_reason": sup.last_reason,
            "teacher_plans": self.teacher_plans,
            "swaps": self.swaps,
            "bad_observations": self.bad_observations,
            "image_gaps": self.image_gaps,
            "latency_ms": self.latency.summary(),
            "student_latency_ms": self.student_latency.summary(),
            "teacher_latency_ms": self.teacher_latency.summary(),
            "compute_ms": self.compute.summary(),
            "arrival_ms": self.arrival.summary(),
            "tick_rate": self.tick_rate.summary(),
            "last_ood_score": self.last_ood,
            "ood_threshold": self.runner.ood_threshold if self.runner else None,
        }

    def diagnostics(self) -> list[tuple[str, int, str, dict[str, Any]]]:
        sup = self.supervisor
        lat = self.latency.summary(last=600)
        rate = self.tick_rate.summary(last=100)
        period_s = self.period_ns / NS
        if self._last_rx is None:
            watchdog = "waiting for observations"
        elif time.monotonic() - self._last_rx > 3 * period_s:
            watchdog = f"no observation for {time.monotonic() - self._last_rx:.1f} s"
        else:
            watchdog = "ok"
        if self.runner is None:
            level, msg = ERROR, f"no policy: {self.load_error}"
        elif sup.mode is Mode.HOLD:
            level, msg = ERROR, f"hold: {sup.last_reason}"
        elif sup.mode is Mode.FALLBACK:
            level, msg = WARN, f"teacher fallback: {sup.last_reason}"
        elif watchdog != "ok":
            level, msg = WARN, watchdog
        else:
            level, msg = OK, f"{sup.mode.value}: {self.runner.name}"
        return [("", level, msg, {
            "mode": sup.mode.value, "policy": self.runner.name if self.runner else "",
            "rate_hz": rate["rate_hz"], "latency_p50_ms": lat["p50"], "latency_p99_ms": lat["p99"],
            "missed_ticks": self.missed_ticks, "deadline_misses": self.deadline_misses,
            "fallback_events": sup.fallback_events, "last_unhealthy": sup.last_reason,
            "ood_score": self.last_ood, "watchdog": watchdog, "image_gaps": self.image_gaps,
            "image_error": self.image_error})]


def main(args: list[str] | None = None) -> int:
    return run_node(PolicyNode, args)


if __name__ == "__main__":
    raise SystemExit(main())
