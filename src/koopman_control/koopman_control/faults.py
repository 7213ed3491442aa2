"""Faults from outside the stack, injected by a process of their own as a misbehaving neighbour would cause
them, and the fault run that cycles through them while the stack drives the arm.

``koopman-control inject-fault KIND`` (one process, one fault) publishes bad joint states or bad chunks for
``--duration`` seconds at 100 Hz, or asks the policy node to swap to a model it must refuse, and prints one
JSON line: the fault, when it started and ended, and what the stack answered. ``koopman-control fault-run``
runs the stack in the process layout and, every ``--period`` seconds, the next fault of :data:`CYCLE`: the
message faults through ``inject-fault``, the process faults (killing the teacher; killing the policy and
starting it again) through the runner. Its JSON says, per fault, whether it reached ``/diagnostics``, how
soon the arm stopped where it had to, which node counted it, and whether any node other than the one killed
died; and, over the run, every episode.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from koopman_control import topics

JOINT_FAULTS = ("nan-joint-states", "short-joint-states", "stale-joint-states", "huge-joint-states")
CHUNK_FAULTS = ("nan-chunk", "out-of-limit-chunk")
MODEL_FAULTS = ("corrupt-model", "other-task-model")
PROCESS_FAULTS = ("kill-teacher", "kill-policy")
#: The fault run's cycle, one fault per period.
CYCLE = ("nan-joint-states", "short-joint-states", "stale-joint-states", "nan-chunk", "out-of-limit-chunk",
         "corrupt-model", "other-task-model", "kill-teacher", "kill-policy")
#: Where the arm must stop at once: the stack's inputs are gone or wrong, or its policy is.
MUST_HOLD = ("nan-joint-states", "short-joint-states", "stale-joint-states", "huge-joint-states", "kill-policy")
OTHER_TASK_POLICY = "pusht_oneflow"


def inject(kind: str, duration: float = 1.0, domain_id: int | None = None,
           when_tracking: str | None = None) -> dict[str, Any]:
    """Run one fault from this process; returns what happened (printed as JSON by the command).

    ``when_tracking``: a robot node (``sim``, ``kortex_bridge``); a message fault then starts once that node's
    arm follows a plan (or after 5 s, ``tracking_at_start`` false), checked here, after this process's start-up
    and discovery, which take longer than the gap between two episodes."""
    import rclpy
    from rclpy.context import Context
    from rclpy.signals import SignalHandlerOptions

    if kind not in JOINT_FAULTS + CHUNK_FAULTS + MODEL_FAULTS:
        raise ValueError(f"unknown fault {kind!r}; injectable: {', '.join(JOINT_FAULTS + CHUNK_FAULTS + MODEL_FAULTS)}")
    ctx = Context()
    rclpy.init(context=ctx, domain_id=domain_id, signal_handler_options=SignalHandlerOptions.NO)
    node = rclpy.create_node("fault_injector", context=ctx, start_parameter_services=False)
    try:
        if kind in MODEL_FAULTS:
            return {"fault": kind, **_swap(node, kind)}
        return {"fault": kind, **_publish(node, kind, duration, when_tracking)}
    finally:
        node.destroy_node()
        rclpy.shutdown(context=ctx)


def _publish(node: Any, kind: str, duration: float, when_tracking: str | None) -> dict[str, Any]:
    from sensor_msgs.msg import JointState
    from trajectory_msgs.msg import JointTrajectory

    import gen3_description as gen3
    from koopman_control.ros import convert, qos

    names = list(gen3.JOINT_NAMES)
    q = np.array(gen3.HOME_Q)
    if kind in JOINT_FAULTS:
        pub = node.create_publisher(JointState, topics.JOINT_STATES, qos.SENSOR_PUB)
    else:
        pub = node.create_publisher(JointTrajectory, topics.ACTION_CHUNK, qos.CONTROL)
    # Discovery before the clock starts: every subscriber the graph knows of (the ingest is one of several on
    # joint_states) matched, or the stop would be timed from messages nobody received yet.
    t_end = time.monotonic() + 5.0
    while time.monotonic() < t_end and not 0 < node.count_subscribers(pub.topic_name) <= pub.get_subscription_count():
        time.sleep(0.01)
    tracking = None if when_tracking is None else _arm_tracking(node, when_tracking, 5.0)
    start = time.time_ns()
    sent = 0
    while time.time_ns() - start < duration * 1e9:
        now = time.time_ns()
        if kind == "nan-joint-states":
            msg = convert.joint_state(now, names, np.where(np.arange(7) == 3, np.nan, q), np.zeros(7))
        elif kind == "short-joint-states":
            msg = convert.joint_state(now, names[:3], q[:3], np.zeros(3))
        elif kind == "stale-joint-states":
            msg = convert.joint_state(now - 1_000_000_000, names, q, np.zeros(7))
        elif kind == "huge-joint-states":
            msg = convert.joint_state(now, names, np.full(7, 1e9), np.zeros(7))
        elif kind == "nan-chunk":
            msg = convert.chunk_msg(now, names, np.arange(8) * 0.1, np.full((8, 7), np.nan))
        else:  # out-of-limit-chunk: 10 rad on every joint
            msg = convert.chunk_msg(now, names, np.arange(8) * 0.1, np.full((8, 7), 10.0))
        pub.publish(msg)
        sent += 1
        time.sleep(0.01)
    out = {"start_ns": start, "end_ns": time.time_ns(), "sent": sent}
    if tracking is not None:
        out["tracking_at_start"] = tracking
    return out


def _is_tracking(metrics: str) -> bool:
    """Whether a robot node's metrics (JSON) say its arm follows a plan."""
    return json.loads(metrics).get("commands", {}).get("state") == "tracking"


def _arm_tracking(node: Any, robot: str, timeout: float) -> bool:
    """Ask ``/<robot>/metrics`` until the arm follows a plan (True) or ``timeout`` s have passed (False)."""
    from rclpy.executors import SingleThreadedExecutor
    from std_srvs.srv import Trigger

    client = node.create_client(Trigger, f"/{robot}/metrics")
    ex = SingleThreadedExecutor(context=node.context)
    ex.add_node(node)
    t_end = time.monotonic() + timeout
    try:
        while time.monotonic() < t_end:
            if client.wait_for_service(timeout_sec=0.2):
                fut = client.call_async(Trigger.Request())
                ex.spin_until_future_complete(fut, timeout_sec=2.0)
                res = fut.result()
                if res is not None and res.success and _is_tracking(res.message):
                    return True
            time.sleep(0.01)
        return False
    finally:
        ex.shutdown()
        node.destroy_client(client)


def _swap(node: Any, kind: str) -> dict[str, Any]:
    from rcl_interfaces.srv import SetParameters
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter import Parameter

    value = OTHER_TASK_POLICY
    tmp: Path | None = None
    if kind == "corrupt-model":
        fd, name = tempfile.mkstemp(suffix=".onnx")
        tmp = Path(name)
        with open(fd, "wb") as f:
            f.write(np.random.default_rng(0).bytes(4096))
        value = name
    ex = SingleThreadedExecutor(context=node.context)
    ex.add_node(node)
    client = node.create_client(SetParameters, "/policy/set_parameters")
    start = time.time_ns()
    try:
        if not client.wait_for_service(timeout_sec=10.0):
            return {"start_ns": start, "end_ns": time.time_ns(), "error": "/policy/set_parameters not available"}
        fut = client.call_async(SetParameters.Request(
            parameters=[Parameter("policy", value=value).to_parameter_msg()]))
        ex.spin_until_future_complete(fut, timeout_sec=60.0)
        res = fut.result()
        out: dict[str, Any] = {"start_ns": start, "end_ns": time.time_ns(), "policy": value}
        if res is None:
            out["error"] = "no answer within 60 s"
        else:
            out.update(refused=not res.results[0].successful, reason=res.results[0].reason)
        return out
    finally:
        ex.shutdown()
        if tmp is not None:
            tmp.unlink(missing_ok=True)


class _Diagnostics:
    """Every non-OK /diagnostics status the runner's node receives: (receive ns, node, level, message)."""

    def __init__(self, node: Any) -> None:
        from diagnostic_msgs.msg import DiagnosticArray

        self.seen: list[tuple[int, str, int, str]] = []
        self._lock = threading.Lock()  # appended on the runner's executor thread, read by the fault loop
        self._sub = node.create_subscription(DiagnosticArray, topics.DIAGNOSTICS, self._on, 50)
        self._node = node

    def _on(self, msg: Any) -> None:
        now = time.time_ns()
        rows = []
        for st in msg.status:
            level = st.level[0] if isinstance(st.level, bytes) else int(st.level)
            if level:
                rows.append((now, st.name.rsplit("/", 1)[-1], level, st.message))
        with self._lock:
            self.seen += rows

    def between(self, t0: int, t1: int) -> list[tuple[int, str, int, str]]:
        with self._lock:
            return [d for d in self.seen if t0 <= d[0] <= t1]

    def close(self) -> None:
        self._node.destroy_subscription(self._sub)


def fault_run(stack: Any, *, duration: float, period: float = 10.0, domain_id: int | None = None,
              cycle: tuple[str, ...] | None = None, log: Any = print) -> dict[str, Any]:
    """Cycle :data:`CYCLE` (or ``cycle``) every ``period`` s for ``duration`` s on a running ProcessStack."""
    cycle = cycle or CYCLE
    known = JOINT_FAULTS + CHUNK_FAULTS + MODEL_FAULTS + PROCESS_FAULTS
    unknown = [k for k in cycle if k not in known]
    if unknown:
        raise ValueError(f"unknown faults {unknown}; known: {', '.join(known)}")
    robot = "sim" if "sim" in stack.nodes else "kortex_bridge"
    rate = next((s.parameters().get("policy_rate") for s in stack.specs if s.name == "policy"), None) or 10.0
    period_ns = round(1e9 / float(rate))
    diag = _Diagnostics(stack.ros())
    faults: list[dict[str, Any]] = []
    t_run = time.monotonic()
    k = 0
    try:
        while time.monotonic() - t_run + period <= duration:
            kind = cycle[k % len(cycle)]
            k += 1
            t_slot = time.monotonic()
            before = _counts(stack)
            rec = _one_fault(stack, kind, domain_id, robot)
            wait = period - (time.monotonic() - t_slot)
            t_end = time.monotonic() + max(0.0, wait)
            while time.monotonic() < t_end:
                time.sleep(0.2)
                stack.check()
            after = _counts(stack)
            rec.update(_judge(stack, kind, rec, diag, robot, period_ns, before, after))
            faults.append(rec)
            if kind == "kill-teacher":  # down for one period, then back for the faults that follow
                stack.restart("teacher")
                stack.wait_ready(120.0)
            log(f"fault {len(faults)}: {kind}: " + ", ".join(f"{k}={v}" for k, v in rec.items()
                                                              if k in ("on_diagnostics", "stopped_after_ms",
                                                                       "counted_by", "refused", "crashed")))
    finally:
        diag.close()
    return {"faults": faults, "period_s": period, "cycle": list(cycle)}


def _one_fault(stack: Any, kind: str, domain_id: int | None, robot: str) -> dict[str, Any]:
    if kind == "kill-teacher":
        start = time.time_ns()
        code = stack.kill("teacher")
        return {"fault": kind, "start_ns": start, "end_ns": time.time_ns(), "exit_code": code}
    # A fault the arm must stop for starts while the arm follows a plan: between episodes it already holds,
    # there is nothing to stop, and the next stop (the next reset, 260 ms later once) would be timed instead.
    # The injector checks it itself, just before it starts: its own start-up outlasts the gap between episodes.
    if kind == "kill-policy":
        tracking = _wait_tracking(stack, robot, 5.0)
        start = time.time_ns()
        code = stack.kill("policy")
        t_dead = time.time_ns()
        stack.restart("policy")
        stack.wait_ready(120.0)
        return {"fault": kind, "start_ns": start, "end_ns": t_dead, "exit_code": code, "tracking_at_start": tracking,
                "restarted_after_s": round((time.time_ns() - t_dead) / 1e9, 2)}
    cmd = [sys.executable, "-m", "koopman_control.cli", "inject-fault", kind, "--duration", "1.0"]
    if domain_id is not None:
        cmd += ["--domain-id", str(domain_id)]
    if kind in MUST_HOLD:
        cmd += ["--when-tracking", robot]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("{")]
    if res.returncode != 0 or not lines:
        return {"fault": kind, "error": f"inject-fault exited {res.returncode}: {res.stderr[-500:]}"}
    return json.loads(lines[-1])


def _wait_tracking(stack: Any, robot: str, timeout: float) -> bool:
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        ok, msg = stack.call_trigger(f"/{robot}/metrics", 2.0)
        if ok and _is_tracking(msg):
            return True
        time.sleep(0.05)
    return False


def _counts(stack: Any) -> dict[str, dict[str, int]]:
    return {name: m.get("faults", {}) for name, m in stack.node_metrics(timeout=10.0).items() if "faults" in m}


def _judge(stack: Any, kind: str, rec: dict[str, Any], diag: _Diagnostics, robot: str, period_ns: int,
           before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> dict[str, Any]:
    """Per fault: what reached /diagnostics, which node counted it, how soon the arm stopped (from the fault, or
    for a killed policy from when its next chunk was due), and which other node died."""
    start = rec.get("start_ns")
    out: dict[str, Any] = {}
    if start is None:
        return out
    seen = diag.between(start, time.time_ns())
    out["on_diagnostics"] = sorted({f"{node}: {msg}"[:160] for _, node, _, msg in seen})[:6]
    counted = {}
    for node, counts in after.items():
        delta = {c: n - before.get(node, {}).get(c, 0) for c, n in counts.items() if n > before.get(node, {}).get(c, 0)}
        if delta:
            counted[node] = delta
    out["counted_by"] = counted
    if kind in MUST_HOLD:
        stops = stack.node_metrics(timeout=10.0).get(robot, {}).get("commands", {}).get("stops", [])
        first = next(((t, why, last) for t, why, last in stops if t >= start), None)
        out["stopped_by"] = None if first is None else first[1]
        # A killed policy is noticed when its next chunk is due, one control period after its last one; bad
        # inputs when they arrive.
        ref = start if kind != "kill-policy" or first is None else max(start, first[2] + period_ns)
        out["stopped_after_ms"] = None if first is None else round((first[0] - ref) / 1e6, 1)
    killed = "teacher" if kind == "kill-teacher" else None
    out["crashed"] = sorted(n for n in stack.nodes if n != killed and not stack.alive(n))
    return out
