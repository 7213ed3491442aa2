"""Runs the selected student on every observation and publishes its action chunk; falls back to the teacher.

Topics (:mod:`koopman_control.topics`): in ``policy/observation`` (from the ingest), ``teacher/action_chunk``
(teacher_node), ``policy/image_observation`` (camera policies only); out ``policy/action_chunk``
(JointTrajectory: header.stamp = observation stamp, frame_id = its ``episode_<id>``, points from
time_from_start 0 every control_dt; no points = hold), ``policy/mode`` (latched String), ``/diagnostics``.

A control tick is the arrival of an observation (the ingest emits them at the policy rate from the robot's
own sample stamps); latency is chunk publication minus observation stamp, and a tick counts as missed when
no chunk for it was published within one period, or when no observation arrived for it.

Receding horizon, as the policies were trained and evaluated: a plan is followed until ``execute_steps`` of
its points (0 = the model's ``n_action_steps``) have become active, on the model's own time grid
(:class:`~koopman_control.core.plan.PlanFollower`: at a 10 Hz task and policy rate that is ``execute_steps``
ticks, at 100 Hz the same time); a new plan is also made at every new episode and on every change of mode. In
between, each tick republishes the rest of the plan from the present instant on, stamped with the present
observation, so the arm's watchdog sees a fresh command every period. The student is judged (exception, NaN,
limits, deadline, OOD) on each plan it makes. Taking a fresh plan every
tick (``execute_steps: 1``) closes the loop through the first step of each chunk, which these one-step
students were not trained for (measured in the gym task with dkoopman: 10 of 10 episodes collided, against
10 of 10 successes with 8 executed steps).

Fallback. When the student is unhealthy the node switches to ``teacher_fallback`` and commands a hold at
once: the arm stops until the teacher's chunk for that tick arrives (the teacher computes on the switch). A
teacher chunk is adopted only if it answers an observation of the current episode less than one model period
old; between replans the teacher's plan is followed like a student's, and a replan tick without a fresh
teacher chunk follows the running teacher plan for at most that tick, then holds. No plan ever outlives its
episode or crosses a change of mode. The student is judged again once per model period (so
``recover_ticks`` means the same time at any rate) and takes over after ``recover_ticks`` healthy plans.

Hold. An observation without points (the ingest's inputs failed), ``hold`` mode (fallback off, or no policy)
and a late teacher all publish the hold command, so the arm stops within one hop instead of after its
watchdog.

Parameter ``policy`` (catalogue name or path) can be set at run time: the new model is loaded and probed on
the current observation in the parameter callback, on the node's own executor thread, and only a model that
passes is handed to the control thread, which swaps it in at the start of its next tick. The control path
therefore runs on a companion node ``<name>_control`` with its own executor thread: a slow load (or a refused
one) never delays a tick. A refused model leaves the running one untouched and the reason is returned in
the set-parameters result. The parameter always reads back the policy that runs (the catalogue's default by
name when it was left empty).
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
from rcl_interfaces.msg import SetParametersResult
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.node import Node
from rclpy.parameter import Parameter
from sensor_msgs.msg import Image
from std_msgs.msg import String
from trajectory_msgs.msg import JointTrajectory

from koopman_control import topics
from koopman_control.contracts import resolve_contract
from koopman_control.core.chunk import published_points
from koopman_control.core.clock import NS
from koopman_control.core.episodes import episode_label, parse_episode
from koopman_control.core.plan import PlanFollower
from koopman_control.core.policy_runner import PolicyLoadError, PolicyRunner
from koopman_control.core.stats import RateMeter, SampleStats
from koopman_control.core.supervisor import FallbackSupervisor, Mode
from koopman_control.ros import convert, qos
from koopman_control.ros.base import ERROR, OK, WARN, KoopmanNode, ParameterError, remap_args, run_node
from koopman_policy.contract import ContractError

NAME = "policy"
# hold_points: each point is sent again this long before the next one is due, so a controller that interpolates
# linearly holds it until then (why: docs/experiments.md, "The stack").
HOLD_EDGE_S = 0.001


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


@dataclass
class PolicyStats:
    """Every counter and timing of the control path, reset together and reported together (the bringup
    summary, ``~/metrics`` and ``/diagnostics`` read this one object)."""

    ticks: int = 0
    published: int = 0
    missed_ticks: int = 0
    deadline_misses: int = 0
    teacher_plans: int = 0
    holds: int = 0  # ticks answered with the hold command
    input_holds: int = 0  # of which: the ingest's inputs failed
    bad_observations: int = 0
    image_gaps: int = 0
    swaps: int = 0
    latency: SampleStats = field(default_factory=SampleStats)  # ms, every published chunk
    student_latency: SampleStats = field(default_factory=SampleStats)
    teacher_latency: SampleStats = field(default_factory=SampleStats)
    compute: SampleStats = field(default_factory=SampleStats)  # ms, model call only
    arrival: SampleStats = field(default_factory=SampleStats)  # ms, observation stamp -> received here
    tick_rate: RateMeter = field(default_factory=RateMeter)

    def reset(self) -> None:
        swaps = self.swaps
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, SampleStats | RateMeter):
                v.reset()
            else:
                setattr(self, f.name, 0)
        self.swaps = swaps  # how many policies ran is not a window statistic

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            key = "tick_rate" if f.name == "tick_rate" else f"{f.name}_ms" if isinstance(v, SampleStats) \
                else f.name
            out[key] = v.summary() if isinstance(v, SampleStats | RateMeter) else v
        return out


class PolicyNode(KoopmanNode):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NAME, **kwargs)
        self.declare("policy", "", "catalogue name or path of the policy to run ('' = catalogue default)")
        self.declare("contract", "", "what the stack serves: a contract (JSON), a task file or a built-in task "
                                     "('' = gen3_reach_obstacle); a policy it cannot feed is refused",
                     read_only=True)
        self.declare("catalog_root", "", "directory holding config/policies.yaml ('' = search)", read_only=True)
        self.declare("policy_rate", 10.0, "control rate (Hz): ticks, deadline and missed-tick accounting")
        self.declare("deadline_ms", 0.0, "time budget of one student call (ms); 0 = 80 % of a policy period")
        self.declare("teacher_fallback", True, "fall back to teacher_node's chunks when the student is unhealthy")
        self.declare("recover_ticks", 10, "healthy student plans before leaving the fallback")
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
        self.declare("hold_points", False, "send each plan point twice, held until the next is due, for "
                                           "controllers that interpolate linearly (joint_trajectory_controller)")
        self.declare("max_image_age", 0.25, "camera policies: the newest image observation of the same episode "
                                             "serves a tick when its stamp is at most this far (s) from the tick's")
        try:
            self.served = resolve_contract(self.param("contract"))
        except ContractError as err:
            raise ParameterError(str(err)) from None
        self.joint_names = list(self.served.action_joints)
        self.period_ns = round(NS / self.param("policy_rate"))
        self.supervisor = FallbackSupervisor(self.param("teacher_fallback"), self.param("recover_ticks"))
        self.stats = PolicyStats(tick_rate=RateMeter(self.param("policy_rate")))
        self.runner: PolicyRunner | None = None
        self.load_error = ""
        self._pending: PolicyRunner | None = None
        self._lock = threading.Lock()  # hands a validated runner from the parameter thread to the control thread
        self._naming = False  # the node itself is writing the running policy's name into ``policy``
        self._last_obs: tuple | None = None  # (stamp, history, names, episode)
        self._episode_start: tuple[int, int | None] = (-1, None)  # (episode, stamp of its first sample)
        self._last_judged = -(2**62)  # stamp of the student's last call
        self.last_ood: float | None = None
        self._prev_stamp: int | None = None
        self._last_rx: float | None = None
        self._prev_served = True
        self.plan = PlanFollower(1.0 / self.param("policy_rate"))  # the plan followed, keyed by (episode, mode)
        self._teacher_latest: JointTrajectory | None = None
        self._awaiting_teacher: tuple[int, int] | None = None  # (stamp, episode) of a fallback tick without a plan
        self._image: tuple[int, int, np.ndarray] | None = None  # newest image observation: stamp, episode, frames
        self.image_error = ""

        try:
            runner = load_runner(self, self.param("policy"))
            self._validate(runner)
            self.runner = runner
            self.supervisor.select(runner.is_teacher)
            self._name_parameter(runner)
        except PolicyLoadError as err:
            self.load_error = str(err)
            self.supervisor.mode = Mode.HOLD
            self.get_logger().error(f"no policy running (the arm holds): {err}")

        self.mode_pub = self.create_publisher(String, topics.MODE, qos.LATCHED)
        self.add_on_set_parameters_callback(self._on_set_parameters)
        # Control path on its own node/executor thread (see module docstring). It takes the process's topic
        # remappings explicitly: global arguments would also rename it to this node's name.
        self.control = Node(f"{self.get_name()}_control", context=self.context, namespace=self.get_namespace(),
                            use_global_arguments=False,
                            cli_args=remap_args(self.get_name(), [*self.cli_args, *sys.argv]),
                            start_parameter_services=False)
        self.companions.append(self.control)
        self.chunk_pub = self.control.create_publisher(JointTrajectory, topics.ACTION_CHUNK, qos.CONTROL)
        self._teachers_alive = 0  # teacher processes asserting liveliness on their chunk topic
        self.control.create_subscription(
            JointTrajectory, topics.TEACHER_CHUNK, self._on_teacher_chunk, qos.TEACHER,
            event_callbacks=SubscriptionEventCallbacks(liveliness=self._on_teacher_liveliness))
        self.control.create_subscription(JointTrajectory, topics.OBSERVATION, self._on_observation, qos.CONTROL)
        self.control.create_subscription(Image, topics.IMAGE_OBSERVATION, self._on_image, qos.CONTROL)
        self._published_mode: Mode | None = None
        self._publish_mode()
        self.start_diagnostics()

    def control_path(self) -> list[Node]:
        return [self.control]

    # -- parameters (node executor thread) -------------------------------------------------------------------
    def _name_parameter(self, runner: PolicyRunner) -> None:
        """``policy`` reads back what runs: the default's catalogue name instead of an empty string."""
        if self.param("policy") != "":
            return
        self._naming = True
        try:
            self.set_parameters([Parameter("policy", value=runner.name)])
        finally:
            self._naming = False

    def _validate(self, runner: PolicyRunner) -> None:
        runner.check_contract(self.served, self.param("history_steps"))
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
            if prm.name == "policy" and not self._naming:
                try:
                    staged = load_runner(self, value)
                    self._validate(staged)
                except PolicyLoadError as err:
                    self.fault("swap refused", f"policy {value!r} refused, keeping "
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
                self.plan.tick_period_ns = self.period_ns
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
            self.stats.swaps += 1
            self.supervisor.select(runner.is_teacher, self._now())
            self._publish_mode()

    def _account(self, stamp: int, new_episode: bool) -> None:
        """Missed ticks: the previous tick unserved, or whole periods without an observation within an episode
        (between episodes the arm is reset and no observation is due)."""
        st = self.stats
        if self._prev_stamp is not None:
            if not self._prev_served:
                st.missed_ticks += 1
            gap = stamp - self._prev_stamp
            if not new_episode and gap > 1.5 * self.period_ns:  # the reset between two episodes is no gap
                st.missed_ticks += round(gap / self.period_ns) - 1
        self._prev_stamp = stamp
        self._prev_served = False

    def _sent(self, stamp: int, latency: SampleStats | None) -> None:
        """Bookkeeping of a command (chunk or hold) published for the tick ``stamp``."""
        now = self._now()
        lat_ms = (now - stamp) / 1e6
        self.stats.latency.add(lat_ms)
        if latency is not None:
            latency.add(lat_ms)
        self.stats.published += 1
        if stamp == self._prev_stamp and now - stamp <= self.period_ns:
            self._prev_served = True

    def _on_observation(self, msg: JointTrajectory) -> None:
        t_rx = self._now()
        episode = parse_episode(msg.header.frame_id) or 0
        if not msg.points:  # the ingest's inputs failed: hold now, plan afresh once observations resume
            self.plan.clear()
            self._hold(convert.from_time(msg.header.stamp), episode, "the ingest stopped: no valid observation",
                       "input")
            return
        try:
            stamp, hist, names, step_stamps = convert.observation_from_msg(msg)
        except ValueError as err:
            self.stats.bad_observations += 1
            self.fault("malformed observation", f"malformed observation ignored: {err}", "error")
            return
        st = self.stats
        st.arrival.add((t_rx - stamp) / 1e6)
        st.ticks += 1
        self._last_rx = time.monotonic()
        st.tick_rate.tick(self._last_rx)
        new_episode = self._episode_start[0] != episode
        self._account(stamp, new_episode)
        self._last_obs = (stamp, hist, names, episode)
        if new_episode:  # its first observation: every step is the episode's first sample
            self._episode_start = (episode, int(step_stamps[0]))
            self._teacher_latest = None
        self._take_pending()
        runner = self.runner
        if runner is None:
            self._hold(stamp, episode, f"no policy: {self.load_error}", "no policy")
            return
        runner.new_episode(episode)
        mode = self.supervisor.mode
        if mode is not Mode.FALLBACK and mode is not Mode.HOLD and self._continue_plan(episode, runner, stamp):
            return
        if mode is Mode.FALLBACK and stamp - self._last_judged < 0.9 * runner.meta.control_dt * NS:
            # Judged once per model period, so recover_ticks means the same time at any policy rate.
            self._follow_fallback(episode, runner, stamp)
            return
        self._last_judged = stamp
        image = None
        if runner.image_size is not None:
            image = self._paired_image(stamp, episode, runner)
            if image is None:  # the camera stopped or lags: keep to the current plan, never reuse an old frame
                st.image_gaps += 1
                self.fault("no image", f"no image observation for this tick: {self.image_error}")
                if mode is Mode.FALLBACK:
                    self._follow_fallback(episode, runner, stamp)
                return
        res = runner.step(hist, names, budget_s=self.deadline_ns() / NS, image=image, stamps_ns=step_stamps,
                          episode_start_ns=self._episode_start[1], stamp_ns=stamp)
        st.compute.add(res.compute_s * 1e3)
        self.last_ood = res.ood_score
        if res.health.kind == "deadline":
            st.deadline_misses += 1
        mode = self.supervisor.update(res.health, stamp)
        if not res.health.ok:
            self.fault(f"unhealthy {res.health.kind}", f"{mode.value}: {res.health.reason}")
        if mode is not self._published_mode:
            self._publish_mode()
        serve = mode is Mode.STUDENT or (mode is Mode.TEACHER and res.chunk is not None
                                         and res.health.kind in ("ok", "deadline", "ood"))
        if serve and res.chunk is not None:
            m = runner.meta
            _, points = published_points(res.chunk, m.n_obs_steps, m.control_dt)
            self._adopt_plan(points, m.control_dt, (episode, mode), stamp, stamp)
        elif mode is Mode.FALLBACK:
            self._follow_fallback(episode, runner, stamp)
        else:  # hold mode, or the teacher as the policy failed
            self.plan.clear()
            self._hold(stamp, episode, res.health.reason if not res.health.ok else "hold mode", "hold")

    def _follow_fallback(self, episode: int, runner: PolicyRunner, stamp: int) -> None:
        """A fallback tick: the teacher's plan while it runs, a fresh teacher chunk at a replan, else hold."""
        if self._continue_plan(episode, runner, stamp):
            return
        self._awaiting_teacher = (stamp, episode)
        if self._teacher_latest is not None and self._take_teacher_plan(self._teacher_latest):
            return
        # No fresh teacher chunk yet: the running teacher plan may carry the arm through this one tick (it was
        # made less than a model period ago for this episode); anything older, or a student's plan, never.
        key = (episode, Mode.FALLBACK)
        if self.plan.key == key and self.plan.points is not None and stamp - self.plan.stamp_ns < \
                runner.meta.control_dt * NS + self.period_ns and \
                (rest := self.plan.remaining(stamp, key, len(self.plan.points))) is not None:
            self._publish_points(stamp, episode, *rest)
            return
        self.plan.clear()
        self._hold(stamp, episode, "waiting for the teacher's chunk for this tick", "teacher late")

    def _hold(self, stamp: int, episode: int, reason: str, cause: str) -> None:
        """Publish the hold command for this tick (the arm stops where it is), counted and logged per cause."""
        self.chunk_pub.publish(convert.hold_msg(stamp, self.joint_names, episode_label(episode)))
        self.stats.holds += 1
        if cause == "input":
            self.stats.input_holds += 1
        self._sent(stamp, None)
        self.fault(f"hold: {cause}", f"arm held: {reason}", "info" if cause == "teacher late" else "warning")

    def _on_image(self, msg: Image) -> None:
        try:
            stamp, hist = convert.float_image_from_msg(msg, self.param("history_steps"))
        except ValueError as err:
            self.image_error = f"image observation refused: {err}"
            self._image = None
            return
        self._image = (stamp, parse_episode(msg.header.frame_id) or 0, hist)

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
        self._publish_points(stamp, episode, *rest)
        return True

    def _adopt_plan(self, points: np.ndarray, dt: float, key: tuple[int, Mode], stamp: int, tick: int) -> None:
        """Follow a plan made at ``stamp`` and publish it for ``tick``."""
        self.plan.adopt(points, dt, stamp, key)
        self._awaiting_teacher = None
        self._publish_points(tick, key[0], *self.plan.remaining(tick, key, len(points)))

    def _publish_points(self, stamp: int, episode: int, offsets: np.ndarray, points: np.ndarray) -> None:
        """The plan from the present instant on, stamped with the present observation and its episode."""
        if self.param("hold_points") and len(points) > 1:
            # Each point held until the next one is due (a waypoint again 1 ms before it): a controller that
            # interpolates linearly between waypoints then executes the plan as the policies were trained.
            offsets = np.repeat(offsets, 2)[:-1]
            offsets[1::2] = offsets[2::2] - HOLD_EDGE_S
            points = np.repeat(points, 2, axis=0)[:-1]
        self.chunk_pub.publish(convert.chunk_msg(stamp, self.joint_names, offsets, points, episode_label(episode)))
        student = self.supervisor.mode is Mode.STUDENT
        self._sent(stamp, self.stats.student_latency if student else self.stats.teacher_latency)

    def _on_teacher_chunk(self, msg: JointTrajectory) -> None:
        self._teacher_latest = msg
        if self.supervisor.mode is Mode.FALLBACK:
            self._take_teacher_plan(msg)

    def _take_teacher_plan(self, msg: JointTrajectory) -> bool:
        """Adopt the teacher's chunk if it answers the fallback tick waiting for one: an observation of the same
        episode, computed for that tick or, when the teacher is slower than the ticks, less than one model
        period before it (followed on its own time grid from the present instant)."""
        waiting = self._awaiting_teacher
        if waiting is None or self.runner is None:
            return False
        tick, episode = waiting
        stamp = convert.from_time(msg.header.stamp)
        if parse_episode(msg.header.frame_id) != episode or \
                not tick - round(self.runner.meta.control_dt * NS) < stamp <= tick:
            return False
        try:
            chunk = convert.chunk_from_msg(msg, self.joint_names)
        except ValueError as err:
            self.fault("teacher chunk refused", f"teacher chunk refused: {err}", "error")
            return False
        dt = float(np.median(np.diff(chunk.times_ns))) / NS if len(chunk.times_ns) > 1 else 0.0
        self.stats.teacher_plans += 1
        self._adopt_plan(chunk.positions, dt, (episode, Mode.FALLBACK), stamp, tick)
        return True

    def _publish_mode(self) -> None:
        mode = self.supervisor.mode
        self._published_mode = mode
        self.mode_pub.publish(String(data=mode.value))

    # -- reporting -------------------------------------------------------------------------------------------
    def reset_stats(self) -> None:
        """Start a measurement window (the bench discards its warm-up)."""
        self.stats.reset()
        super().reset_stats()
        self.supervisor.fallback_events = 0
        self.supervisor.unhealthy_by_kind.clear()

    def _on_teacher_liveliness(self, event: Any) -> None:
        was = self._teachers_alive
        self._teachers_alive = int(event.alive_count)
        if was and not self._teachers_alive:
            self.fault("teacher gone", "the teacher stopped (no liveliness within "
                                       f"{qos.TEACHER_LEASE_S:g} s): a fallback would hold the arm", "error")

    def teacher_running(self) -> bool:
        return self._teachers_alive > 0

    def metrics(self) -> dict[str, Any]:
        sup = self.supervisor
        return {
            "policy": self.runner.name if self.runner else None,
            "source": self.runner.source if self.runner else None,
            "mode": sup.mode.value,
            **self.stats.as_dict(),
            "fallback_events": sup.fallback_events,
            "unhealthy": dict(sup.unhealthy_by_kind),
            "last_unhealthy_reason": sup.last_reason,
            "last_ood_score": self.last_ood,
            "ood_threshold": self.runner.ood_threshold if self.runner else None,
            **super().metrics(),
        }

    def diagnostics(self) -> list[tuple[str, int, str, dict[str, Any]]]:
        sup, st = self.supervisor, self.stats
        lat = st.latency.summary(last=600)
        rate = st.tick_rate.summary(last=100)
        period_s = self.period_ns / NS
        if self._last_rx is None:
            watchdog = "waiting for observations"
        elif time.monotonic() - self._last_rx > 3 * period_s:
            watchdog = f"no observation for {time.monotonic() - self._last_rx:.1f} s"
        else:
            watchdog = "ok"
        teacher = "running" if self.teacher_running() else "not running"
        if self.runner is None:
            level, msg = ERROR, f"no policy: {self.load_error}"
        elif sup.mode is Mode.HOLD:
            level, msg = ERROR, f"hold: {sup.last_reason}"
        elif sup.mode is Mode.FALLBACK:
            level, msg = WARN, f"teacher fallback: {sup.last_reason}"
        elif watchdog != "ok":
            level, msg = WARN, watchdog
        elif sup.fallback_enabled and not self.runner.is_teacher and teacher != "running":
            level, msg = WARN, "teacher not running: a fallback would hold the arm"
        else:
            level, msg = OK, f"{sup.mode.value}: {self.runner.name}"
        return [("", level, msg, {
            "mode": sup.mode.value, "policy": self.runner.name if self.runner else "",
            "rate_hz": rate["rate_hz"], "latency_p50_ms": lat["p50"], "latency_p99_ms": lat["p99"],
            "missed_ticks": st.missed_ticks, "deadline_misses": st.deadline_misses, "holds": st.holds,
            "fallback_events": sup.fallback_events, "last_unhealthy": sup.last_reason, "teacher": teacher,
            "ood_score": self.last_ood, "watchdog": watchdog, "image_gaps": st.image_gaps,
            "image_error": self.image_error, "faults": self.faults.counts()})]


def main(args: list[str] | None = None) -> int:
    return run_node(PolicyNode, args)


if __name__ == "__main__":
    raise SystemExit(main())
