"""Base class and process helpers shared by the nodes.

Spinning: every node (and the policy node's control companion) gets its own single-threaded executor on
its own thread. Measured on the 2-core development VM with a 500 Hz publisher in the same process, rclpy's
MultiThreadedExecutor delivered a message in p50 2.2 ms / p99 115 ms, one SingleThreadedExecutor per node
in p50 0.5 ms / p99 2.3 ms; the stack's latency budget rules the former out. Where rclpy has the C++
EventsExecutor (Kilted and later) it replaces the SingleThreadedExecutor: a 500 Hz JointState between two
processes arrived in p50 0.33 / p99 0.75 ms against 0.57 / 1.30 ms (``KOOPMAN_CONTROL_EXECUTOR=single``
selects the Python executor, e.g. to compare).
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
from rclpy.executors import Executor, ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.signals import SignalHandlerOptions
from std_srvs.srv import Trigger

from koopman_control import topics
from koopman_control.core.faultlog import FaultLog
from koopman_control.ros.convert import to_time

OK, WARN, ERROR, STALE = (DiagnosticStatus.OK, DiagnosticStatus.WARN, DiagnosticStatus.ERROR,
                          DiagnosticStatus.STALE)
# A fault counted by a node keeps its /diagnostics status at WARN at least this long.
RECENT_FAULT_S = 5.0
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


def remap_args(node_name: str, argv: Sequence[str] | None = None) -> list[str]:
    """The topic remappings of ``argv`` (default: this process's) ``--ros-args`` (``-r from:=to``, or
    ``node:from:=to`` for ``node_name``), for a companion node that cannot use the global arguments (they would
    also give it the main node's name). Node-name and namespace rules (``__node``, ``__ns``) are left out."""
    args = list(sys.argv if argv is None else argv)
    out: list[str] = []
    inside = False
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--ros-args":
            inside = True
        elif a == "--":
            inside = False
        elif inside and a in ("-r", "--remap") and i + 1 < len(args):
            rule = args[i + 1]
            i += 1
            target, sep, rest = rule.partition(":")
            if sep and not rest.startswith("="):  # node-specific rule "node:from:=to"
                if target != node_name:
                    i += 1
                    continue
                rule = rest
            if not rule.startswith("__"):
                out += ["-r", rule]
        i += 1
    return ["--ros-args", *out] if out else []


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
        self.cli_args = list(kwargs.get("cli_args") or [])  # in-process remappings (the bringup's)
        self._defaults: dict[str, Any] = {}
        self.companions: list[Node] = []
        self.realtime_priority = 0  # for this node's executor threads; set by nodes that declare the parameter
        self.faults = FaultLog()  # repeated faults: counted per cause, logged once then once a second
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

    def declare_array(self, name: str, default: list, description: str) -> list:
        """A list of numbers (limits, poses) from YAML or overrides, ints and floats alike; ``[]`` = unset."""
        desc = ParameterDescriptor(description=description, dynamic_typing=True)
        value = self.declare_parameter(name, default or None, desc).value  # no default: unset until given
        is_bool = bool(default) and isinstance(default[0], bool)
        try:
            return [bool(v) if is_bool else float(v) for v in (value if value is not None else [])]
        except (TypeError, ValueError):
            raise ParameterError(f"parameter {name!r}: expected a list of numbers, got {value!r}") from None

    def param(self, name: str) -> Any:
        return _coerce(name, self.get_parameter(name).value, self._defaults[name])

    def coerce(self, param: Parameter) -> Any:
        return _coerce(param.name, param.value, self._defaults[param.name])

    # -- faults, diagnostics and metrics ---------------------------------------------------------------------
    def fault(self, cause: str, detail: str, level: str = "warning") -> None:
        """Count a fault under ``cause`` and log it once, then at most once a second with a count."""
        line = self.faults.report(cause, detail)
        if line is None:
            return
        # One call site per severity: rclpy refuses a call site whose severity changes between calls.
        log = self.get_logger()
        if level == "error":
            log.error(line)
        elif level == "warning":
            log.warning(line)
        elif level == "info":
            log.info(line)
        else:
            log.debug(line)

    def start_diagnostics(self, rate_hz: float = 1.0) -> None:
        """``/diagnostics`` at ``rate_hz``, and the ``~/metrics`` service (std_srvs/Trigger: the node's
        :meth:`metrics` as JSON), which the process-per-node bringup and a user's ``ros2 service call`` read."""
        self._diag_pub = self.create_publisher(DiagnosticArray, topics.DIAGNOSTICS, 10)
        self.create_timer(1.0 / rate_hz, self.publish_diagnostics)
        self.create_service(Trigger, "~/metrics", self._on_metrics)
        self.create_service(Trigger, "~/reset_stats", self._on_reset_stats)

    def diagnostics(self) -> list[tuple[str, int, str, dict[str, Any]]]:
        """(name suffix, level, message, values) entries; nodes override."""
        return []

    def metrics(self) -> dict[str, Any]:
        """What the bringup summary reads from this node; nodes extend it."""
        return {"faults": self.faults.counts()}

    def reset_stats(self) -> None:
        """Start a measurement window (the bench discards its warm-up); nodes extend it."""
        self.faults.reset()

    def _on_reset_stats(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        self.reset_stats()
        response.success, response.message = True, "statistics reset"
        return response

    def _on_metrics(self, request: Trigger.Request, response: Trigger.Response) -> Trigger.Response:
        import json

        try:
            response.message = json.dumps(self.metrics(), default=_json_default)
            response.success = True
        except Exception as err:  # a report must never take the node down
            response.success, response.message = False, f"metrics unavailable: {err!r}"
        return response

    def publish_diagnostics(self) -> None:
        if self._diag_pub is None:
            return
        arr = DiagnosticArray()
        arr.header.stamp = to_time(self.get_clock().now().nanoseconds)
        entries = self.diagnostics()
        recent = self.faults.recent(RECENT_FAULT_S)
        if recent is not None and entries and entries[0][1] == OK:
            # Every counted fault shows on /diagnostics for a while, whatever the node's own state says.
            suffix, _, _, values = entries[0]
            entries[0] = (suffix, WARN, f"recent fault: {recent[0]}", {**values, "recent_faults": recent[1]})
        for suffix, level, message, values in entries:
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


def _json_default(v: Any) -> Any:
    import numpy as np

    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


EXECUTOR_ENV = "KOOPMAN_CONTROL_EXECUTOR"
EXECUTORS = ("events", "single")


def executor_kind() -> str:
    """The executor the nodes spin on: "events" (rclpy's C++ EventsExecutor, where rclpy has it) or "single"."""
    kind = os.environ.get(EXECUTOR_ENV, "events")
    if kind not in EXECUTORS:
        raise ValueError(f"{EXECUTOR_ENV} must be one of {EXECUTORS}, got {kind!r}")
    if kind == "events":
        try:
            from rclpy.experimental import EventsExecutor  # noqa: F401  (Kilted and later)
        except ImportError:
            return "single"
    return kind


def _has_fileno(stream: Any) -> bool:
    try:
        stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both of the latter
        return False
    return True


def make_executor(context: Context | None) -> Executor:
    """A single-threaded executor of :func:`executor_kind`."""
    if executor_kind() == "events":
        from rclpy.experimental import EventsExecutor

        # EventsExecutor() enables faulthandler on sys.stderr, which must be a real file: where stderr is replaced
        # (captured output, an embedding host) the process's own stands in; with none, the Python executor.
        stderr = sys.stderr if _has_fileno(sys.stderr) else sys.__stderr__
        if _has_fileno(stderr):
            with contextlib.redirect_stderr(stderr):
                return EventsExecutor(context=context)
    return SingleThreadedExecutor(context=context)


class Spinner:
    """One single-threaded executor (:func:`make_executor`) per node or group, each on a daemon thread."""

    def __init__(self, nodes: Iterable[Node | Sequence[Node]], context: Context | None = None,
                 priorities: dict[str, int] | None = None) -> None:
        """``nodes``: a node, or a group of nodes sharing one executor thread. ``priorities``: node name ->
        SCHED_FIFO priority (a group's thread takes its members' highest; absent/0: normal)."""
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self.executors: list[Executor] = []
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        for item in nodes:
            group = list(item) if isinstance(item, Sequence) else [item]
            ex = make_executor(context)
            for node in group:
                ex.add_node(node)
            self.executors.append(ex)
            prio = max((priorities or {}).get(n.get_name(), 0) for n in group)
            name = "+".join(n.get_name() for n in group)
            th = threading.Thread(target=self._spin, args=(ex, group[0], prio), name=f"spin-{name}", daemon=True)
            self.threads.append(th)
        for th in self.threads:
            th.start()

    def _spin(self, ex: Executor, node: Node, priority: int) -> None:
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


class _Terminated(Exception):
    """SIGTERM, handled like Ctrl-C."""


def _terminate(*_: Any) -> None:
    raise _Terminated()


def run_node(factory: Callable[[], KoopmanNode], args: Sequence[str] | None = None) -> int:
    """``main()`` of a node executable (what ``ros2 run`` / ``ros2 launch`` start): spin until Ctrl-C or SIGTERM.

    rclpy's own signal handlers are off: they would invalidate the context at the first SIGINT, before the node
    has stopped its threads and said so (a bridge closing its sessions logs after that). SIGINT and SIGTERM end
    the loop below instead, and the node closes on a valid context.
    """
    node: KoopmanNode | None = None
    spinner: Spinner | None = None
    code = 0
    signal.signal(signal.SIGTERM, _terminate)
    # A process started in the background of a shell script inherits SIGINT ignored; the launch's Ctrl-C (SIGINT)
    # must still stop the node, not leave it to the SIGTERM escalation.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with stop_signals_to_main_thread():
            rclpy.init(args=list(args) if args is not None else None,
                       signal_handler_options=SignalHandlerOptions.NO)
            node = factory()
            settle_heap()
            spinner = Spinner(node.spin_nodes(), node.context, node.thread_priorities())
            node.start()
        stop = threading.Event()
        while rclpy.ok() and not stop.wait(0.2):
            if spinner.errors:
                raise spinner.errors[0]
    except (KeyboardInterrupt, _Terminated, ExternalShutdownException):
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
