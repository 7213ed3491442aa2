"""``/joint_states`` + task topics -> time-stamped policy observations on ``/policy/observation``.

Observations are emitted when a joint-state sample crosses a policy tick (see
:mod:`koopman_control.core.observation`), as ``trajectory_msgs/JointTrajectory``: ``joint_names`` are the
observation names, one point per history step (oldest first), ``time_from_start`` = step stamp minus
``header.stamp`` (<= 0), ``header.stamp`` = measurement time of the newest step. NaN, stale, out-of-order or
incomplete input stops the flow; the reason is on ``/diagnostics`` and in the log.
"""

from __future__ import annotations

from typing import Any

from geometry_msgs.msg import PointStamped
from sensor_msgs.msg import JointState
from std_msgs.msg import UInt32
from trajectory_msgs.msg import JointTrajectory

from koopman_control.core.observation import InputStatus, StateObservationBuilder
from koopman_control.core.stats import SampleStats
from koopman_control.ros import convert, qos
from koopman_control.ros.base import ERROR, OK, WARN, KoopmanNode, ParameterError, run_node

NAME = "state_ingest"


def task_obs_names(joint_names: list[str]) -> list[str]:
    """The task's observation names (koopman_sim OBS_NAMES) for these joints."""
    return ([f"q_{n}" for n in joint_names] + [f"qd_{n}" for n in joint_names]
            + ["target_x", "target_y", "target_z", "pillar_x", "pillar_y", "pillar_z"])


class StateIngestNode(KoopmanNode):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NAME, **kwargs)
        from koopman_sim.gen3 import JOINT_NAMES

        p = {
            "policy_rate": self.declare("policy_rate", 10.0, "observation rate (Hz) = the policy's control rate"),
            "n_obs_steps": self.declare("n_obs_steps", 2, "history length (steps)"),
            "history_period": self.declare("history_period", 0.0, "time between history steps (s): the policies' "
                                                                  "control period; 0 = one policy period"),
            "max_state_age": self.declare("max_state_age", 0.05, "joint states older than this are stale (s)"),
            "joint_names": self.declare("joint_names", list(JOINT_NAMES), "joints, in observation order"),
            "use_task": self.declare("use_task", True, "append the task target and pillar (20-d task obs)"),
            "watchdog_rate": self.declare("watchdog_rate", 50.0, "staleness check rate (Hz)"),
            "realtime_priority": self.declare("realtime_priority", 0, "SCHED_FIFO priority of the executor "
                                                                      "thread (0 = normal)"),
        }
        self.realtime_priority = p["realtime_priority"]
        self.p = p
        try:
            self.builder = StateObservationBuilder(p["joint_names"], p["n_obs_steps"], p["policy_rate"],
                                                   p["max_state_age"], use_task=p["use_task"],
                                                   history_spacing_s=p["history_period"] or None)
        except ValueError as err:
            raise ParameterError(str(err)) from None
        names = task_obs_names(p["joint_names"])
        self.obs_names = names if p["use_task"] else names[: 2 * len(p["joint_names"])]
        self.obs_pub = self.create_publisher(JointTrajectory, "/policy/observation", qos.CONTROL)
        # Task and episode subscriptions are created before /joint_states: when both are ready in one wait,
        # the executor serves them first, so a reset is seen before the first sample of the new episode.
        self.create_subscription(PointStamped, "/task/target", self._on_target, qos.LATCHED)
        self.create_subscription(PointStamped, "/task/pillar", self._on_pillar, qos.LATCHED)
        self.create_subscription(UInt32, "/task/episode", self._on_episode, qos.LATCHED)
        self.create_subscription(JointState, "/joint_states", self._on_joint_state, qos.SENSOR_SUB)
        self.create_timer(1.0 / p["watchdog_rate"], self._watchdog)
        self._last_reported = InputStatus.WAITING
        self.sample_age = SampleStats()  # ms, tick sample's stamp -> received here (the sensor's hop)
        self.publish_delay = SampleStats()  # ms, tick sample's stamp -> observation published
        self.start_diagnostics()

    def control_path(self) -> list:
        return [self]

    def _now(self) -> int:
        return self.get_clock().now().nanoseconds

    def _on_target(self, msg: PointStamped) -> None:
        self.builder.set_task(target=(msg.point.x, msg.point.y, msg.point.z))

    def _on_pillar(self, msg: PointStamped) -> None:
        self.builder.set_task(pillar=(msg.point.x, msg.point.y, msg.point.z))

    def _on_episode(self, msg: UInt32) -> None:
        self.builder.set_episode(int(msg.data))

    def _on_joint_state(self, msg: JointState) -> None:
        now = self._now()
        obs = self.builder.on_joint_state(msg.name, msg.position, msg.velocity, convert.from_time(msg.header.stamp),
                                          now)
        if obs is not None:
            self.obs_pub.publish(convert.observation_msg(obs, self.obs_names, frame_id=f"episode_{obs.episode}"))
            self.sample_age.add((now - obs.stamp_ns) / 1e6)
            self.publish_delay.add((self._now() - obs.stamp_ns) / 1e6)
        self._report()

    def _watchdog(self) -> None:
        self.builder.check(self._now())
        self._report()

    def _report(self) -> None:
        st = self.builder.status
        if st is not self._last_reported:
            if st in (InputStatus.STALE, InputStatus.INVALID):
                self.get_logger().error(f"observations stopped: {self.builder.reason}")
            elif st is InputStatus.OK and self._last_reported in (InputStatus.STALE, InputStatus.INVALID):
                self.get_logger().info("inputs healthy again; observations resume once the history is refilled")
            self._last_reported = st

    def metrics(self) -> dict[str, Any]:
        b = self.builder
        return {"emitted": b.emitted, "faults": b.faults, "missed_ticks": b.missed_ticks, "dropped": b.dropped,
                "history_gaps": b.history.gaps, "status": b.status.value, "reason": b.reason,
                "sample_age_ms": self.sample_age.summary(), "publish_delay_ms": self.publish_delay.summary()}

    def reset_stats(self) -> None:
        self.sample_age.reset()
        self.publish_delay.reset()

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
