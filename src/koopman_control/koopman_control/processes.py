"""The stack as ``ros2 launch`` runs it: one OS process per node, from the same stack description.

Each node of :func:`koopman_control.stack.build_stack` is started from its installed executable (where
``ros2 run`` finds it: ``<prefix>/lib/koopman_control``, else beside this Python, else on PATH) with the
arguments launch_ros gives it: ``--ros-args -r __node:=<name>``, the stack's parameter files and the
overrides in a parameter file of their own. So this layout shows what the in-process bringup hides: DDS
between every pair of nodes, ordering across topics, each process scheduled on its own.

Lifecycle, as the launch file does it: the robot driver (sim or bridge) dying ends the stack, since nothing
else can keep the arm safe; any other node may die and be restarted (:meth:`ProcessStack.restart`) while the
arm holds. Stopping (Ctrl-C, SIGTERM, the end of ``--duration``) sends SIGINT to the nodes in the reverse of
their start order, the command sources before the arm's driver, waits for each, and escalates to SIGTERM and
SIGKILL only when one does not exit; every child also gets SIGINT from the kernel if this process dies, so
none is left behind. Each node's output goes to the terminal with its name in front, as ``output=screen``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

from koopman_control.stack import PACKAGE, ROBOT_DRIVERS, NodeSpec, StackError

_PR_SET_PDEATHSIG = 1
try:  # resolved here: the child between fork and exec must not load libraries (another thread may hold a lock)
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux
    _prctl = None


def _die_with_parent() -> None:
    """In the child before exec: SIGINT when the parent dies (Linux), so a killed runner leaves no node behind."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGINT))


def find_executable(name: str) -> str:
    """Where ``ros2 run koopman_control <name>`` would find the node, or the console script beside this Python."""
    candidates: list[Path] = []
    try:
        from ament_index_python.packages import get_package_prefix

        candidates.append(Path(get_package_prefix(PACKAGE)) / "lib" / PACKAGE / name)
    except Exception:  # not on an ament prefix path (a pip install): the next places
        pass
    candidates.append(Path(sys.executable).parent / name)
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which(name)
    if found is None:
        raise StackError(f"executable {name!r} not found in {', '.join(str(c) for c in candidates)} or on PATH "
                         "(install the package: `make setup`, or `colcon build` and source install/setup.bash)")
    return found


def node_command(spec: NodeSpec, overrides_file: Path) -> list[str]:
    """The command line launch_ros builds for a Node with ``parameters=[*files, overrides]``."""
    cmd = [find_executable(spec.executable), "--ros-args", "-r", f"__node:={spec.name}"]
    for src, dst in spec.remappings:
        cmd += ["-r", f"{src}:={dst}"]
    for f in spec.param_files:
        cmd += ["--params-file", str(f)]
    return [*cmd, "--params-file", str(overrides_file)]


@dataclass
class NodeProcess:
    spec: NodeSpec
    command: list[str]
    proc: subprocess.Popen
    started: float
    restarts: int = 0

    @property
    def name(self) -> str:
        return self.spec.name


class ProcessStack:
    """Nodes as child processes; a small rclpy node of its own reads their ``~/metrics`` and the episode results."""

    def __init__(self, specs: list[NodeSpec], *, domain_id: int | None = None, out: TextIO | None = None,
                 on_line: Callable[[str, str], None] | None = None) -> None:
        self.specs = specs
        self.out = out if out is not None else sys.stdout
        self.on_line = on_line
        self.env = dict(os.environ)
        if domain_id is not None:
            self.env["ROS_DOMAIN_ID"] = str(domain_id)
        self.env.setdefault("PYTHONUNBUFFERED", "1")
        self.env.setdefault("RCUTILS_COLORIZED_OUTPUT", "0")
        self._tmp = tempfile.TemporaryDirectory(prefix="koopman_stack_")
        self.nodes: dict[str, NodeProcess] = {}
        self.exits: dict[str, int] = {}  # nodes that exited on their own: name -> return code
        self._lock = threading.Lock()  # the output of several reader threads, one line at a time
        self._readers: list[threading.Thread] = []
        self._ros: Any = None
        self._clients: dict[str, Any] = {}
        self._closed = False
        self.domain_id = domain_id
        try:
            for spec in specs:
                self._start(spec)
        except BaseException:
            self.close()
            raise

    # -- processes -------------------------------------------------------------------------------------------
    def _start(self, spec: NodeSpec, restarts: int = 0) -> NodeProcess:
        overrides = Path(self._tmp.name) / f"{spec.name}.yaml"
        overrides.write_text(yaml.safe_dump({"/**": {"ros__parameters": dict(spec.overrides)}}))
        cmd = node_command(spec, overrides)
        proc = subprocess.Popen(cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True,
                                preexec_fn=_die_with_parent)
        node = NodeProcess(spec, cmd, proc, time.monotonic(), restarts)
        self.nodes[spec.name] = node
        self._say(f"{spec.name} started (pid {proc.pid})")
        t = threading.Thread(target=self._pump, args=(spec.name, proc), name=f"out-{spec.name}", daemon=True)
        t.start()
        self._readers.append(t)
        return node

    def _say(self, line: str) -> None:
        with self._lock:
            self.out.write(f"[bringup] {line}\n")
            self.out.flush()

    def _pump(self, name: str, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            with self._lock:
                self.out.write(f"[{name}] {line}\n")
                self.out.flush()
            if self.on_line is not None:
                self.on_line(name, line)

    def pid(self, name: str) -> int:
        return self.nodes[name].proc.pid

    def alive(self, name: str) -> bool:
        return name in self.nodes and self.nodes[name].proc.poll() is None

    def kill(self, name: str, sig: int = signal.SIGKILL, timeout: float = 5.0) -> int | None:
        """Signal one node (a fault, or a restart) and wait for it; its exit code."""
        node = self.nodes[name]
        with contextlib.suppress(ProcessLookupError):
            node.proc.send_signal(sig)
        try:
            return node.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            node.proc.kill()
            return node.proc.wait(timeout)

    def restart(self, name: str) -> NodeProcess:
        """Start a node again with the same command line (after it died or was killed)."""
        old = self.nodes[name]
        if old.proc.poll() is None:
            self.kill(name, signal.SIGINT)
        self.exits.pop(name, None)
        return self._start(old.spec, old.restarts + 1)

    def check(self) -> None:
        """Raise StackError if the robot driver exited (the stack cannot go on without it); record other exits."""
        for name, node in self.nodes.items():
            code = node.proc.poll()
            if code is None or name in self.exits:
                continue
            self.exits[name] = code
            msg = f"node {name} exited with code {code}"
            self._say(msg)
            if name in ROBOT_DRIVERS:
                raise StackError(f"{msg}: the robot driver is gone, stopping the stack")

    # -- the runner's own ROS node ---------------------------------------------------------------------------
    def ros(self) -> Any:
        """A node in this process (own context, same domain, own executor thread) to call the children's
        services and listen to their topics."""
        if self._ros is None:
            import rclpy
            from rclpy.context import Context
            from rclpy.signals import SignalHandlerOptions

            from koopman_control.ros.base import Spinner

            ctx = Context()
            rclpy.init(context=ctx, domain_id=self.domain_id, signal_handler_options=SignalHandlerOptions.NO)
            node = rclpy.create_node("koopman_bringup", context=ctx, start_parameter_services=False)
            self._ros = (ctx, node, Spinner([node], ctx))
        return self._ros[1]

    def call_trigger(self, service: str, timeout: float = 5.0) -> tuple[bool, str]:
        """Call a std_srvs/Trigger service of a child; (success, message), or (False, why) on a time-out."""
        from std_srvs.srv import Trigger

        node = self.ros()
        client = self._clients.get(service)
        if client is None:  # kept: clients destroyed while the executor thread waits on them race with it
            client = self._clients[service] = node.create_client(Trigger, service)
        t_end = time.monotonic() + timeout
        while not client.service_is_ready():
            if time.monotonic() > t_end:
                return False, f"{service} not available within {timeout:.0f} s"
            time.sleep(0.02)
        future = client.call_async(Trigger.Request())
        done = threading.Event()
        future.add_done_callback(lambda _: done.set())
        if not done.wait(max(0.0, t_end - time.monotonic())):
            client.remove_pending_request(future)
            return False, f"{service} did not answer within {timeout:.0f} s"
        res = future.result()
        return bool(res.success), str(res.message)

    def node_metrics(self, timeout: float = 5.0) -> dict[str, Any]:
        """Every running node's ``~/metrics`` (its counters as the in-process bringup reads them)."""
        out: dict[str, Any] = {}
        for name in self.nodes:
            if not self.alive(name):
                out[name] = {"error": f"not running (exit code {self.nodes[name].proc.poll()})"}
                continue
            ok, msg = self.call_trigger(f"/{name}/metrics", timeout)
            try:
                out[name] = json.loads(msg) if ok else {"error": msg}
            except json.JSONDecodeError:
                out[name] = {"error": f"unreadable metrics: {msg[:200]}"}
        return out

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Until every node answers on ``~/metrics`` (its constructor finished: models loaded, topics made)."""
        t_end = time.monotonic() + timeout
        pending = list(self.nodes)
        while pending:
            self.check()
            left = t_end - time.monotonic()
            if left <= 0:
                raise StackError(f"nodes not up after {timeout:.0f} s: {', '.join(pending)}")
            ok, _ = self.call_trigger(f"/{pending[0]}/metrics", min(left, 15.0))
            if ok:
                pending.pop(0)

    # -- shutdown --------------------------------------------------------------------------------------------
    def close(self, timeout: float = 10.0) -> dict[str, int | None]:
        """SIGINT in reverse start order, each waited for; SIGTERM, then SIGKILL, for one that hangs."""
        if self._closed:
            return {}
        self._closed = True
        codes: dict[str, int | None] = {}
        for name in reversed(list(self.nodes)):
            proc = self.nodes[name].proc
            if proc.poll() is None:
                for sig, wait in ((signal.SIGINT, timeout), (signal.SIGTERM, 3.0), (signal.SIGKILL, 3.0)):
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(sig)
                    try:
                        proc.wait(wait)
                        break
                    except subprocess.TimeoutExpired:
                        self._say(f"{name} ignored {signal.Signals(sig).name}")
            codes[name] = proc.poll()
            self._say(f"{name} finished (exit code {codes[name]})")
        for t in self._readers:
            t.join(2.0)
        if self._ros is not None:
            import rclpy

            ctx, node, spinner = self._ros
            spinner.shutdown()
            node.destroy_node()
            rclpy.shutdown(context=ctx)
            self._ros = None
        self._tmp.cleanup()
        return codes

    def __enter__(self) -> ProcessStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
