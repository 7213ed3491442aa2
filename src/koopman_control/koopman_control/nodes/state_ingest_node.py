"""``joint_states`` + the contract's other sources -> time-stamped policy observations on ``policy/observation``.

What it builds is the observation contract it is given (``contract``: the running model's, a task file or a
built-in task; :mod:`koopman_policy.contract`): joint positions and velocities from ``joint_states``, vectors
from the topics (or parameters) the contract names, each checked on arrival.

Observations are emitted when a joint-state sample crosses a policy tick (see
:mod:`koopman_control.core.observation`), as ``trajectory_msgs/JointTrajectory``: ``joint_names`` are the
observation names, one point per history step (oldest first), ``time_from_start`` = step stamp minus
``header.stamp`` (<= 0), ``header.stamp`` = measurement time of the newest step, ``header.frame_id`` =
``episode_<id>``. NaN, stale, out-of-order, implausible or incomplete input stops the flow; the reason is on
``/diagnostics`` and in the log (once per cause, then at most once a second with a count), and an observation
without points goes out once, so that the policy node commands a hold at once rather than after the arm's
watchdog. Episodes follow ``/task/episode`` announcements (:mod:`koopman_control.core.episodes`).
"""

from __future__ import annotations

from typing import Any

from sensor_msgs.msg import JointState
from std_msgs.msg import Header
from trajectory_msgs.msg import JointTrajectory

from koopman_control import topics
from koopman_control.contracts import joint_bounds, resolve_contract
from koopman_control.core.episodes import episode_label, parse_episode
from koopman_control.core.observation import InputStatus, JointBounds, StateObservationBuilder
from koopman_control.core.stats import SampleStats
from koopman_control.ros import convert, qos
from koopman_control.ros.base import ERROR, OK, WARN, KoopmanNode, ParameterError, run_node
from koopman_policy.contract import ContractError

NAME = "state_ingest"


class StateIngestNode(KoopmanNode):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NAME, **kwargs)
        p = {
            "contract": self.declare("contract", "", "what to build: a model's contract (JSON), a task file or a "
                                                     "built-in task ('' = gen3_reach_obstacle)", read_only=True),
            "policy_rate": self.declare("policy_rate", 10.0, "observation rate (Hz) = the policy's control rate"),
            "n_obs_steps": self.declare("n_obs_steps", 2, "history length (steps)"),
            "history_period": self.declare("history_period", 0.0, "time between history steps (s): the policies' "
                                                                  "control period; 0 = one policy period"),
            "max_state_age": self.declare("max_state_age", 0.05, "joint states older than this are stale (s)"),
            "watchdog_rate": self.declare("watchdog_rate", 50.0, "staleness check rate (Hz)"),
            "realtime_priority": self.declare("realtime_priority", 0, "SCHED_FIFO priority of the executor "
                                                                      "thread (0 = normal)"),
            "position_margin": self.declare("position_margin", 0.1, "tolerance beyond the joint limits"),
            "speed_factor": self.declare("speed_factor", 3.0, "samples faster than this many times the rated speed "
                                                              "(or jumping as far) are refused"),
            "step_tolerance": self.declare("step_tolerance", 0.05, "a step between samples may exceed what that "
                                                                   "speed covers by this much: stamp jitter"),
        }
        self.realtime_priority = p["realtime_priority"]
        self.p = p
        try:
            self.contract = resolve_contract(p["contract"])
            features = [f for f in self.contract.observation if f.kind != "image"]
            joints = [j for f in features for j in f.joints]
            lower, upper, speed = joint_bounds(list(dict.fromkeys(joints)), features)
            bounds = JointBounds(lower, upper, speed, p["position_margin"], p["speed_factor"], p["step_tolerance"])
            self.builder = StateObservationBuilder(features, p["n_obs_steps"], p["policy_rate"], p["max_state_age"],
                                                   history_spacing_s=p["history_period"] or None, bounds=bounds)
        except (ValueError, ContractError) as err:
            raise ParameterError(str(err)) from None
        self.obs_names = list(self.builder.names)
        self.obs_pub = self.create_publisher(JointTrajectory, topics.OBSERVATION, qos.CONTROL)
        # Episode and input subscriptions are created before joint_states: when several are ready in one
        # wait, the Python executor serves them first (the EventsExecutor serves in arrival order).
        # Correctness does not depend on it: samples and inputs are assigned to episodes by their stamps.
        self.create_subscription(Header, topics.EPISODE, self._on_episode, qos.LATCHED)
        for f in features:
            if f.kind == "vector" and f.topic is not None:
                try:
                    cls = convert.message_class(f.type)
                except ValueError as err:
                    raise ParameterError(f"feature {f.name}: {err}") from None
                self.create_subscription(cls, f.topic, lambda m, f=f: self._on_vector(f, m),
                                         qos.LATCHED if f.scope == "episode" else qos.SENSOR_SUB)
        self.create_subscription(JointState, topics.JOINT_STATES, self._on_joint_state, qos.SENSOR_SUB)
        self.create_timer(1.0 / p["watchdog_rate"], self._watchdog)
        self._last_reported = InputStatus.WAITING
        self.sample_age = SampleStats()  # ms, tick sample's stamp -> received here (the sensor's hop)
        self.publish_delay = SampleStats()  # ms, tick sample's stamp -> observation published
        self.start_diagnostics()
        self.get_logger().info(f"building {len(self.obs_names)} observation values of task {self.contract.task!r}: "
                               + "; ".join(f"{f.name} from {f.source()}" for f in features))

    def control_path(self) -> list:
        return [self]

    def _now(self) -> int:
        return self.get_clock().now().nanoseconds

    def _on_vector(self, feature: Any, msg: Any) -> None:
        now = self._now()
        try:
            stamp, values = convert.vector_from_msg(msg, feature, now)
        except ValueError as err:
            self.fault(f"{feature.name} unreadable", f"{feature.name} from {feature.source()}: {err}", "error")
            return
        self._publish(self.builder.set_vector(feature.name, stamp, values, now), now)
        self._report()

    def _on_episode(self, msg: Header) -> None:
        episode = parse_episode(msg.frame_id)
        if episode is None:
            self.fault("bad episode", f"episode announcement ignored: frame_id {msg.frame_id!r} is not "
                                      "episode_<id>")
            return
        self.builder.announce_episode(episode, convert.from_time(msg.stamp))

    def _on_joint_state(self, msg: JointState) -> None:
        now = self._now()
        obs = self.builder.on_joint_state(msg.name, msg.position, msg.velocity, convert.from_time(msg.header.stamp),
                                          now)
        self._publish(obs, now)
        self._report()

    def _publish(self, obs: Any, rx_ns: int) -> None:
        if obs is None:
            return
        self.obs_pub.publish(convert.observation_msg(obs, self.obs_names, frame_id=episode_label(obs.episode)))
        self.sample_age.add((rx_ns - obs.stamp_ns) / 1e6)
        self.publish_delay.add((self._now() - obs.stamp_ns) / 1e6)

    def _watchdog(self) -> None:
        self.builder.check(self._now())
        self._report()

    def _report(self) -> None:
        b = self.builder
        for cause, reason in b.take_events():
            self.fault(cause, f"observations stopped: {reason}", "error")
        st = b.status
        if st in (InputStatus.STALE, InputStatus.INVALID):
            if self._last_reported not in (InputStatus.STALE, InputStatus.INVALID):
                # The flow stops: say so downstream at once, so the arm holds now, not after its watchdog.
                self.obs_pub.publish(convert.stop_observation_msg(self._now(), self.obs_names,
                                                                  episode_label(b.episode)))
        elif st is InputStatus.OK and self._last_reported in (InputStatus.STALE, InputStatus.INVALID):
            self.get_logger().info("inputs healthy again; observations resume once the history is refilled")
        self._last_reported = st

    def metrics(self) -> dict[str, Any]:
        b = self.builder
        return {"emitted": b.emitted, "input_faults": b.faults, "missed_ticks": b.missed_ticks,
                "dropped": b.dropped, "history_gaps": b.history.gaps, "episode_starts": b.episode_starts,
                "status": b.status.value, "reason": b.reason, "sample_age_ms": self.sample_age.summary(),
                "publish_delay_ms": self.publish_delay.summary(), **super().metrics()}

    def reset_stats(self) -> None:
        self.sample_age.reset()
        self.publish_delay.reset()
        super().reset_stats()

    def diagnostics(self) -> list[tuple[str, int, str, dict[str, Any]]]:
        b = self.builder
        level = {InputStatus.OK: OK, InputStatus.WAITING: WARN}.get(b.status, ERROR)
        m = self.metrics()
        age, pub = m.pop("sample_age_ms"), m.pop("publish_delay_ms")
        return [("", level, b.reason, {**m, "episode": b.episode, "sample_age_p50_ms": age["p50"],
                                       "publish_delay_p99_ms": pub["p99"]})]


def main(args: list[str] | None = None) -> int:
    return run_node(StateIngestNode, args)


if __name__ == "__main__":
    raise SystemExit(main())
