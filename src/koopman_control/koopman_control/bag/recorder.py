"""Record the stack's topics into a rosbag2 bag from a real rclpy node (what ``ros2 bag record`` does).

Subscriptions are generic (``raw=True``): the CDR bytes the middleware delivered are written unchanged, so
nothing is lost or re-encoded. A topic is subscribed once a publisher for it is discovered, with a QoS that
matches every publisher (reliable only if all publishers are, transient-local only if all are, so latched task
topics arrive even when the recorder starts late), and the publishers' offered QoS is stored in the bag, as
``ros2 bag play`` needs it to republish latched topics correctly. Timestamps are receive times on the system
clock, the clock the nodes stamp their messages with.

Stopping: Ctrl-C / SIGTERM / ``--duration`` close the bag cleanly (indexes and ``metadata.yaml`` written);
data reaches the file every second (see :class:`BagSink`), so even a hard kill leaves a bag that
``koopman-control bag-recover`` turns back into a readable one.
"""

from __future__ import annotations

import importlib
import signal
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from koopman_control.bag import topics as T
from koopman_control.bag.writer import BagSink, qos_to_bag


def message_class(msgtype: str) -> Any:
    """``pkg/msg/Type`` -> the rclpy message class (ImportError/AttributeError when not installed)."""
    pkg, kind, name = msgtype.split("/")
    return getattr(importlib.import_module(f"{pkg}.{kind}"), name)


def matching_qos(publisher_profiles: Sequence[Any], depth: int = 100) -> Any:
    """A subscription QoS compatible with all these publishers (as rosbag2's recorder adapts its QoS)."""
    from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

    reliable = bool(publisher_profiles) and all(p.reliability == ReliabilityPolicy.RELIABLE for p in publisher_profiles)
    latched = bool(publisher_profiles) and all(p.durability == DurabilityPolicy.TRANSIENT_LOCAL
                                               for p in publisher_profiles)
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth,
                      reliability=ReliabilityPolicy.RELIABLE if reliable else ReliabilityPolicy.BEST_EFFORT,
                      durability=DurabilityPolicy.TRANSIENT_LOCAL if latched else DurabilityPolicy.VOLATILE)


class BagRecorder:
    """A recorder node on its own executor thread; ``start()`` / ``stop()`` (usable in-process by bringup)."""

    def __init__(self, out: str | Path, topics: Sequence[str] | None = None, *, storage: str = "mcap",
                 record_all: bool = False, context: Any = None, node_name: str = "bag_recorder",
                 custom_data: dict[str, str] | None = None, discovery_period_s: float = 0.2,
                 log: Callable[[str], None] | None = None) -> None:
        from rclpy.node import Node

        self.topics = list(topics) if topics is not None else list(T.DEFAULT_RECORD)
        self.record_all = record_all
        self.sink = BagSink(out, storage=storage, custom_data={"koopman.recorder": "koopman-control record",
                                                                **(custom_data or {})})
        self.node = Node(node_name, context=context, start_parameter_services=False)
        self._subs: dict[str, Any] = {}
        self.skipped: dict[str, str] = {}
        self.log = log or (lambda msg: self.node.get_logger().info(msg))
        self.node.create_timer(discovery_period_s, self.discover)
        self.node.create_timer(self.sink.flush_interval_s, self.sink.flush)
        self._executor: Any = None
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self.started_ns = time.time_ns()

    # -- discovery -------------------------------------------------------------------------------------------
    def discover(self) -> None:
        """Subscribe to wanted topics that have gained a publisher since the last look."""
        for name, types in self.node.get_topic_names_and_types():
            if name in self._subs or name in self.skipped:
                continue
            if not (self.record_all or name in self.topics):
                continue
            pubs = self.node.get_publishers_info_by_topic(name)
            pubs = [p for p in pubs if p.node_name != self.node.get_name()]
            if not pubs:
                continue
            try:
                self._subscribe(name, types[0], [p.qos_profile for p in pubs])
            except Exception as err:  # one bad topic must not stop the recording of the others
                self.skipped[name] = f"{type(err).__name__}: {err}"
                self.log(f"not recording {name}: {self.skipped[name]}")

    def _subscribe(self, name: str, msgtype: str, profiles: list[Any]) -> None:
        spec = T.STACK_TOPICS.get(name)
        if spec is not None and spec.msgtype != msgtype:
            self.log(f"warning: {name} is published as {msgtype}, the stack uses {spec.msgtype}; recording it anyway")
        try:
            cls = message_class(msgtype)
            self.sink.add_topic(name, msgtype, [qos_to_bag(p) for p in profiles])
        except (ImportError, AttributeError, ValueError) as err:
            self.skipped[name] = str(err)
            self.log(f"not recording {name}: {err}")
            return

        def on_msg(data: bytes, topic: str = name) -> None:
            self.sink.write(topic, time.time_ns(), data)

        self._subs[name] = self.node.create_subscription(cls, name, on_msg, matching_qos(profiles), raw=True)
        self.log(f"recording {name} [{msgtype}]")

    @property
    def recording(self) -> list[str]:
        return sorted(self._subs)

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> BagRecorder:
        from rclpy.executors import SingleThreadedExecutor

        self._executor = SingleThreadedExecutor(context=self.node.context)
        self._executor.add_node(self.node)
        self._thread = threading.Thread(target=self._spin, name="bag-recorder", daemon=True)
        self._thread.start()
        return self

    def _spin(self) -> None:
        from rclpy.executors import ExternalShutdownException

        try:
            self._executor.spin()
        except ExternalShutdownException:
            pass
        except BaseException as err:  # surfaced by record(): the recording stops, the bag is still closed
            self.error = err

    def stop(self) -> dict[str, Any]:
        """Stop receiving, close the bag (always), destroy the node; returns a summary."""
        try:
            if self._executor is not None:
                self._executor.shutdown(timeout_sec=2.0)
            if self._thread is not None:
                self._thread.join(2.0)
        finally:
            self.sink.close()
            self.node.destroy_node()
        return self.summary()

    def summary(self) -> dict[str, Any]:
        path = self.sink.path
        size = sum(p.stat().st_size for p in path.iterdir() if p.is_file()) if path.is_dir() else 0
        return {"path": str(path), "storage": self.sink.storage, "messages": self.sink.message_count,
                "topics": dict(self.sink.counts), "bytes": size, "skipped": dict(self.skipped),
                "seconds": (time.time_ns() - self.started_ns) / 1e9}


def record(out: str | Path, *, topics: Sequence[str] | None = None, storage: str = "mcap",
           duration_s: float | None = None, record_all: bool = False, ros_args: Sequence[str] | None = None,
           log: Callable[[str], None] = print) -> dict[str, Any]:
    """The ``record`` command: record until ``duration_s`` elapsed, Ctrl-C or SIGTERM; the bag is always closed."""
    import rclpy
    from rclpy.signals import SignalHandlerOptions

    stop = threading.Event()
    context = rclpy.Context()
    # Our own signal handling: rclpy's would shut the context down under the writer's feet.
    rclpy.init(args=list(ros_args) if ros_args else None, context=context,
               signal_handler_options=SignalHandlerOptions.NO)
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    rec: BagRecorder | None = None
    try:
        rec = BagRecorder(out, topics, storage=storage, record_all=record_all, context=context, log=log).start()
        log(f"recording to {out} ({storage}); Ctrl-C to stop")
        deadline = time.monotonic() + duration_s if duration_s else None
        while not stop.wait(0.1):
            if deadline is not None and time.monotonic() >= deadline:
                break
            if rec.error is not None:
                raise RuntimeError(f"recording stopped: {rec.error!r} (the bag was closed with what it had)")
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        summary = rec.stop() if rec is not None else {}
        context.try_shutdown()
    return summary
