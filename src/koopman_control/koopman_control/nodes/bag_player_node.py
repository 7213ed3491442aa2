"""Plays a recorded bag's sensor topics into the live stack at recorded timing (x ``rate``), in place of the robot.

Publishes the robot-side topics (``/joint_states``, ``/task/*``, the camera if recorded; see
:data:`koopman_control.bag.topics.PLAYBACK_TOPICS`) as serialized CDR, unchanged except for header stamps,
which move onto the playback clock (:mod:`koopman_control.bag.player`) so the ingest's staleness checks hold.
Latched topics are republished latched. The stack's own outputs in the bag (observations, chunks, mode) are not
played: the live stack computes them, and recording them again (``koopman-control replay-live --record``)
gives a bag to compare with the original offline.

Playback runs on its own thread with absolute deadlines (no drift); a message more than ``max_late`` behind
schedule is still published (the stack must see every sample) but counted. With ``exit_when_done`` the
node shuts its context down after the last message, which ends ``ros2 run``/``ros2 launch`` processes.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

from koopman_control.bag import topics as T
from koopman_control.bag.player import Playback, load_playback, schedule
from koopman_control.bag.reader import BagError
from koopman_control.bag.recorder import message_class
from koopman_control.core.stats import SampleStats
from koopman_control.ros import qos
from koopman_control.ros.base import ERROR, OK, WARN, KoopmanNode, ParameterError, run_node

NAME = "bag_player"
_QOS = {"sensor": qos.SENSOR_PUB, "latched": qos.LATCHED, "events": qos.EVENTS, "control": qos.CONTROL}


def publisher_qos(topic: str, offered: list[Any]) -> QoSProfile:
    """The stack's QoS for its own topics; otherwise what the recorded publishers offered."""
    spec = T.STACK_TOPICS.get(topic)
    if spec is not None and spec.qos in _QOS:
        return _QOS[spec.qos]
    latched = bool(offered) and all(int(q.durability) == int(DurabilityPolicy.TRANSIENT_LOCAL) for q in offered)
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10, reliability=ReliabilityPolicy.RELIABLE,
                      durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE)


class BagPlayerNode(KoopmanNode):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(NAME, **kwargs)
        p = {
            "bag": self.declare("bag", "", "bag to play (folder, or .mcap/.db3 file)", read_only=True),
            "rate": self.declare("rate", 1.0, "playback speed factor (2.0 = twice as fast)", read_only=True),
            "topics": self.declare("topics", [""], "topics to play ([''] = the robot-side topics in the bag)",
                                   read_only=True),
            "start_delay": self.declare("start_delay", 1.0, "seconds between start-up and the first message",
                                        read_only=True),
            "wait_for_subscriber": self.declare("wait_for_subscriber", 5.0, "wait up to this long (s) for a "
                                                "/joint_states subscriber before playing", read_only=True),
            "exit_when_done": self.declare("exit_when_done", False, "shut down after the last message",
                                           read_only=True),
            "max_late": self.declare("max_late", 0.005, "lateness (s) counted as a late publication",
                                     read_only=True),
        }
        if not p["bag"]:
            raise ParameterError("parameter 'bag' is required: the bag to play")
        if not 0 < p["rate"] <= 100:
            raise ParameterError(f"rate must be in (0, 100], got {p['rate']}")
        self.p = p
        topics = [t for t in p["topics"] if t]
        try:
            self.playback: Playback = load_playback(p["bag"], topics or None)
        except BagError as err:
            raise ParameterError(str(err)) from None
        self.pubs: dict[str, Any] = {}
        for topic, msgtype in self.playback.types.items():
            try:
                cls = message_class(msgtype)
            except (ImportError, AttributeError, ValueError) as err:
                raise ParameterError(f"cannot publish {topic}: message type {msgtype} is not installed ({err})"
                                     ) from None
            self.pubs[topic] = self.create_publisher(cls, topic, publisher_qos(topic, self.playback.qos.get(topic, [])))
        self.published = 0
        self.late = 0
        self.lateness_ms = SampleStats()
        self.state = "waiting"
        self.started_wall_ns: int | None = None
        self.finished_wall_ns: int | None = None
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._play, name="bag-player", daemon=True)
        self.start_diagnostics()
        self._thread.start()

    # -- playback thread -------------------------------------------------------------------------------------
    def _wait_for_subscriber(self) -> None:
        pub = self.pubs.get(T.JOINT_STATES)
        deadline = time.monotonic() + self.p["wait_for_subscriber"]
        while pub is not None and pub.get_subscription_count() == 0 and time.monotonic() < deadline:
            if self._stop.wait(0.05):
                return

    def _play(self) -> None:
        try:
            self._wait_for_subscriber()
            if self._stop.wait(self.p["start_delay"]):
                return
            self.state = "playing"
            rate = self.p["rate"]
            max_late_ns = round(self.p["max_late"] * 1e9)
            start = time.time_ns()
            self.started_wall_ns = start
            for item in self.playback.items:
                due, data = schedule(self.playback, item, start, rate)
                wait = (due - time.time_ns()) / 1e9
                if wait > 0 and self._stop.wait(wait):
                    return
                self.pubs[item.topic].publish(data)
                late = time.time_ns() - due
                self.lateness_ms.add(late / 1e6)
                if late > max_late_ns:
                    self.late += 1
                self.published += 1
            self.state = "done"
            self.finished_wall_ns = time.time_ns()
            self.get_logger().info(f"played {self.published} messages of {self.p['bag']} at x{rate:g}")
        except BaseException as err:  # surfaced on /diagnostics and by metrics(); never kills the process silently
            self.error = err
            self.state = "error"
            self.get_logger().error(f"playback stopped: {err!r}")
        finally:
            self.done.set()
            if self.p["exit_when_done"] and self.context.ok() and not self._stop.is_set():
                self.context.try_shutdown()

    # -- reporting -------------------------------------------------------------------------------------------
    def metrics(self) -> dict[str, Any]:
        wall = None
        if self.started_wall_ns is not None and self.finished_wall_ns is not None:
            wall = (self.finished_wall_ns - self.started_wall_ns) / 1e9
        return {"bag": self.p["bag"], "rate": self.p["rate"], "state": self.state, "messages": len(self.playback.items),
                "published": self.published, "late": self.late, "lateness_ms": self.lateness_ms.summary(),
                "bag_duration_s": self.playback.duration_s, "wall_s": wall,
                "error": None if self.error is None else repr(self.error)}

    def diagnostics(self) -> list[tuple[str, int, str, dict[str, Any]]]:
        level = ERROR if self.state == "error" else (WARN if self.late else OK)
        lat = self.lateness_ms.summary(last=1000)
        return [("", level, self.state, {"published": self.published, "of": len(self.playback.items),
                                         "late": self.late, "lateness_p99_ms": lat["p99"]})]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        super().close()


def main(args: list[str] | None = None) -> int:
    return run_node(BagPlayerNode, args)


if __name__ == "__main__":
    raise SystemExit(main())
