"""Base class and process helpers shared by the nodes.

Spinning: every node (and the policy node's control companion) gets its own single-threaded executor on
its own thread. Measured on the 2-core development VM with a 500 Hz publisher in the same process, rclpy's
MultiThreadedExecutor delivered a message in p50 2.2 ms / p99 115 ms, one SingleThreadedExecutor per node
in p50 0.5 ms / p99 2.3 ms; the stack's latency budget (p99 5 ms) rules the former out.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import rclpy
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.context import Context
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter

from koopman_control.ros.convert import to_time

OK, WARN, ERROR, STALE = (DiagnosticStatus.OK, DiagnosticStatus.WARN, DiagnosticStatus.ERROR,
                          DiagnosticStatus.STALE)
# The GIL hands over every 5 ms by default: a 500 Hz loop waiting on a busy thread would miss its period.
SWITCH_INTERVAL_S = 0.0005


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def ignore_stop_signals() -> None:
    """From here on, shutting down: a second SIGINT/SIGTERM (launch escalating, an impatient Ctrl-C, `timeout`
    signalling the process group) must not cut it short, since daemon executor threads left inside rclpy when
    the interpreter exits abort the process. Only the main thread can set handlers."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


@contextlib.contextmanager
def stop_signals_to_main_thread() -> Iterator[None]:
    """Block SIGINT/SIGTERM while the ROS context, the nodes and their threads are created, so that every
    thread started meanwhile (Python's, and the native ones of the DDS and ONNX Runtime) inherits the
    blocked mask; unblock in the calling (main) thread afterwards. Ctrl-C then always lands in the main
    thread, where Python turns it into a clean shutdown, instead of interrupting a DDS thread's system call,
    which intermittently aborted the process on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def set_realtime_priority(priority: int) -> str | None:
    """Give the calling thread SCHED_FIFO ``priority`` (1-99; 0 leaves it alone). Returns None on success or
    the reason it could not (no CAP_SYS_NICE / rtprio limit, non-Linux): the caller logs it and carries on.

    The control threads sleep almost all the time, so a real-time class costs other work nothing, while it
    keeps a busy machine from delaying the 500 Hz physics or a control tick by a scheduler time slice.
    """
    if priority <= 0:
        return None
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(min(int(priority), 99)))
    except (OSError, AttributeError) as err:
        return f"cannot use SCHED_FIFO priority {priority}: {err}"
    return None


class GcMonitor:
    """Durations of the garbage collector's pauses (ms), which stop every thread of the process."""

    def __init__(self) -> None:
        from koopman_control.core.stats import SampleStats

        self.pauses = SampleStats()
        self._t0 = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.pauses.add((time.perf_counter() - self._t0) * 1e3)

    def close(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)


def settle_heap() -> None:
    """Collect once, then move every object alive after start-up (onnxruntime, numpy, MuJoCo, the nodes)
    out of the collector's reach: later collections scan only what the control loops allocate, so their
    pauses stay well below a millisecond instead of tens of milliseconds for a full heap scan."""
    gc.collect()
    gc.freeze()


class ParameterError(ValueError):
    """A parameter value a node cannot work with (reported at start-up or in the set-parameters result)."""


def _coerce(name: str, value: Any, default: Any) -> Any:
    kind = type(default)
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            raise TypeError
        if kind is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if kind is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if kind is str:
            return str(value)
        if kind is list:
            return list(value)
    except (TypeError, ValueError):
        pass
    raise ParameterError(f"parameter {name!r}: expected {kind.__name__}, got {value!r}")


class KoopmanNode(Node):
    """rclpy Node with typed parameters, a /diagnostics publisher and clean shutdown."""

    diag_name = "koopman_control"

    def __init__(self, default_name: str, *, node_name: str | None = None, context: Context | None = None,
                 parameter_overrides: list[Parameter] | None = None, **kwargs: Any) -> None:
        super().__init__(node_name or default_name, context=context, parameter_overrides=parameter_overrides,
                         **kwargs)
        self._defaults: dict[str, Any] = {}
        self.companions: list[Node] = []
        self.realtime_priority = 0  # for this node's executor threads; set by nodes that declare the parameter
        self._diag_pub = None
        self._closed = False

    # -- parameters ------------------------------------------------------------------------------------------
    def declare(self, name: str, default: Any, description: str, *, read_only: bool = False) -> Any:
        """Declare with a typed default; ints and floats from YAML or the command line are both accepted."""
        dyn = isinstance(default, int | float) and not isinstance(default, bool)
        desc = ParameterDescriptor(description=description, read_only=read_only, dynamic_typing=dyn)
        if isinstance(default, list):
            value = self.declare_parameter(name, Parameter.Type.STRING_ARRAY, desc).value or default
        else:
            value = self.declare_parameter(name, default, desc).value
        self._defaults[name] = default
        return _coerce(name, value, default)

    def param(self, name: str) -> Any:
        return _coerce(name, self.get_parameter(name).value, self._defaults[name])

    def coerce(self, param: Parameter) -> Any:
        return _coerce(param.name, param.value, self._defaults[param.name])

    # -- diagnostics -----------------------------------------------------------------------------------------
    def start_diagnostics(self, rate_hz: float = 1.0) -> None:
        self._diag_pub = self.create_publisher(DiagnosticArray, "/diagnostics", 10)
        self.create_timer(1.0 / rate_hz, self.publish_diagnostics)

    def diagnostics(self) -> list[tuple[str, int, str, dict[str, Any]]]:
        """(name suffix, level, message, values) entries; nodes override."""
        return []

    def publish_diagnostics(self) -> None:
        if self._diag_pub is None:
            return
        arr = DiagnosticArray()
        arr.header.stamp = to_time(self.get_clock().now().nanoseconds)
        for suffix, level, message, values in self.diagnostics():
            st = DiagnosticStatus(level=level, name=f"{self.diag_name}/{self.get_name()}{suffix}",
                                  message=message, hardware_id=self.get_fully_qualified_name())
            st.values = [KeyValue(key=str(k), value=_fmt(v)) for k, v in values.items()]
            arr.status.append(st)
        self._diag_pub.publish(arr)

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the node's own threads (after every node of the process exists); nodes override."""

    def spin_nodes(self) -> list[Node]:
        """Nodes to give an executor each (this one plus companions)."""
        return [self, *self.companions]

    def control_path(self) -> list[Node]:
        """The node(s) on the observation -> chunk path; in one process they share an executor thread."""
        return []

    def thread_priorities(self) -> dict[str, int]:
        """SCHED_FIFO priority per spun node name (the control path only; parameter services stay normal)."""
        nodes = self.companions or [self]
        return {n.get_name(): self.realtime_priority for n in nodes if self.realtime_priority > 0}

    def close(self) -> None:
        """Stop threads and destroy the node(s); safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for c in self.companions:
            c.destroy_node()
        self.destroy_node()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


class Spinner:
    """One SingleThreadedExecutor per node, each on a daemon thread."""

    def __init__(self, nodes: Iterable[Node | Sequence[Node]], context: Context | None = None,
                 priorities: dict[str, int] | None = None) -> None:
        """``nodes``: a node, or a group of nodes sharing one executor thread. ``priorities``: node name ->
        SCHED_FIFO priority (a group's thread takes its members' highest; absent/0: normal)."""
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self.executors: list[SingleThreadedExecutor] = []
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        for item in nodes:
            group = list(item) if isinstance(item, Sequence) else [item]
            ex = SingleThreadedExecutor(context=context)
            for node in group:
                ex.add_node(node)
            self.executors.append(ex)
            prio = max((priorities or {}).get(n.get_name(), 0) for n in group)
            name = "+".join(n.get_name() for n in group)
            th = threading.Thread(target=self._spin, args=(ex, group[0], prio), name=f"spin-{name}", daemon=True)
            self.threads.append(th)
        for th in self.threads:
            th.start()

    def _spin(self, ex: SingleThreadedExecutor, node: Node, priority: int) -> None:
        problem = set_realtime_priority(priority)
        if problem:
            node.get_logger().warning(f"executor thread runs at normal priority: {problem}")
        try:
            # spin() is this same loop; owning it lets shutdown() stop the thread before the executor is torn
            # down. (Executor.shutdown() while another thread is inside spin() races with that thread's wait
            # and intermittently crashed the process on Ctrl-C.)
            while not self._stop.is_set() and ex.context.ok():
                ex.spin_once(timeout_sec=0.5)
        except (ExternalShutdownException, KeyboardInterrupt):
            pass
        except BaseException as err:  # surfaced by the owner (bringup prints it, tests assert on it)
            if ex.context.ok() and not self._stop.is_set():
                self.errors.append(err)

    def shutdown(self, timeout: float = 2.0) -> None:
        """Stop the spinning threads, then the executors (no executor is torn down while it waits)."""
        self._stop.set()
        for ex in self.executors:
            ex.wake()
        for th in self.threads:
            th.join(timeout)
        for ex in self.executors:
            ex.shutdown(timeout_sec=timeout)


def run_node(factory: Callable[[], KoopmanNode], args: Sequence[str] | None = None) -> int:
    """``main()`` of a node executable (what ``ros2 run`` / ``ros2 launch`` start): spin until Ctrl-C."""
    node: KoopmanNode | None = None
    spinner: Spinner | None = None
    code = 0
    try:
        with stop_signals_to_main_thread():
            rclpy.init(args=list(args) if args is not None else None)
            node = factory()
            settle_heap()
            spinner = Spinner(node.spin_nodes(), node.context, node.thread_priorities())
            node.start()
        stop = threading.Event()
        while rclpy.ok() and not stop.wait(0.2):
            if spinner.errors:
                raise spinner.errors[0]
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except ParameterError as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    finally:
        ignore_stop_signals()  # launch escalates with a second SIGINT/SIGTERM
        if spinner is not None:
            spinner.shutdown()
        if node is not None:
            node.close()
        if rclpy.ok():
            rclpy.shutdown()
    return code
