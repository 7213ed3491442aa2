"""``koopman-control``: run, measure and record the control stack.

The nodes and their parameters are the ones ``ros2 launch koopman_control kinova.launch.py`` starts
(:mod:`koopman_control.stack`); launch arguments map to --use-sim, --policy, --policy-rate, --use-camera,
--teacher-fallback, --robot-ip, --robot, and --param NODE.NAME=VALUE overrides any single parameter.
``--processes`` runs every node in its own OS process, as ``ros2 launch`` does (:mod:`koopman_control.processes`);
without it the nodes share this process, each on its own executor thread.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

EXAMPLES = {
    "run": "koopman-control run\n  koopman-control run --policy oneflow --processes",
    "bringup": "koopman-control bringup --duration 60 --json run.json\n"
               "  koopman-control bringup --processes --robot kortex-standin --duration 30 --json run.json\n"
               "  koopman-control bringup --policy oneflow --param sim.seed=3 --duration 30 --json run.json",
    "bench-stack": "koopman-control bench-stack --processes --duration 600 --policy-rate 100 "
                   "--json results/bench_stack_100hz.json",
    "inject-fault": "koopman-control inject-fault nan-joint-states --duration 2\n"
                    "  koopman-control inject-fault other-task-model",
    "fault-run": "koopman-control fault-run --duration 600 --json results/fault_run.json",
}


class _Stop(Exception):
    """SIGTERM, handled like Ctrl-C."""


def _sigterm(*_: Any) -> None:
    raise _Stop()


def _add_stack_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--use-sim", action=argparse.BooleanOptionalAction, default=True,
                   help="simulate the arm (sim_node) or drive a Kinova Gen3 (kortex_bridge_node)")
    p.add_argument("--robot-ip", default=None, help="Kinova Gen3 address (with --no-use-sim)")
    from koopman_control.stack import LAUNCH_ARGUMENTS, ROBOTS

    p.add_argument("--robot", default=None, choices=ROBOTS, help=LAUNCH_ARGUMENTS["robot"][1])
    p.add_argument("--task", default="", help=LAUNCH_ARGUMENTS["task"][1])
    p.add_argument("--controller-topic", default=LAUNCH_ARGUMENTS["controller_topic"][0],
                   help=LAUNCH_ARGUMENTS["controller_topic"][1])
    p.add_argument("--policy", default="", help="policy name in config/policies.yaml or a path (default: the "
                                                "catalogue's default)")
    p.add_argument("--policy-rate", type=float, default=None, help="control rate in Hz (default: config/stack.yaml)")
    p.add_argument("--use-camera", action=argparse.BooleanOptionalAction, default=False,
                   help="render camera frames and run camera_ingest_node")
    p.add_argument("--teacher-fallback", action=argparse.BooleanOptionalAction, default=True,
                   help="run the teacher and fall back to it")
    p.add_argument("--param", action="append", default=[], metavar="NODE.NAME=VALUE",
                   help="override one node parameter (YAML value), e.g. sim.seed=3; repeatable")
    p.add_argument("--processes", action="store_true",
                   help="one OS process per node, as `ros2 launch` runs the stack")
    p.add_argument("--domain-id", type=int, default=None, help="ROS_DOMAIN_ID for the stack's nodes")


def _overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        node, dot, name = key.partition(".")
        if not sep or not dot or not node or not name:
            raise SystemExit(f"error: --param expects NODE.NAME=VALUE, got {item!r}")
        out.setdefault(node, {})[name] = yaml.safe_load(value) if value else ""
    return out


def _specs(ns: argparse.Namespace) -> list[Any]:
    from koopman_control.stack import StackArgs, build_stack

    values = {"use_sim": str(ns.use_sim), "policy": ns.policy, "use_camera": str(ns.use_camera),
              "teacher_fallback": str(ns.teacher_fallback), "robot": ns.robot or "", "task": ns.task,
              "controller_topic": ns.controller_topic,
              "policy_rate": "" if ns.policy_rate is None else str(ns.policy_rate)}
    if ns.robot_ip:
        values["robot_ip"] = ns.robot_ip
    return build_stack(StackArgs.from_strings(values), overrides=_overrides(ns.param))


class Running:
    """The stack in either layout, behind what the commands need: health checks, metrics, stats, close."""

    def __init__(self, ns: argparse.Namespace) -> None:
        specs = _specs(ns)
        self.processes = ns.processes
        if ns.processes:
            from koopman_control.processes import ProcessStack

            self.stack: Any = ProcessStack(specs, domain_id=ns.domain_id)
            try:
                self.stack.wait_ready()
                self._check_policy(self.stack.node_metrics().get("policy", {}))
            except BaseException:
                self.stack.close()
                raise
            return
        from koopman_control.bringup import Stack
        from koopman_control.ros.base import set_realtime_priority, stop_signals_to_main_thread

        self.stack = None
        try:  # a Ctrl-C held back during start-up is delivered when the block ends: the stack must close then too
            with stop_signals_to_main_thread():
                self.stack = Stack(specs, domain_id=ns.domain_id)
            if self.stack.base_priority:
                # This thread only polls, but it takes the GIL to do so: preempted by another process while
                # holding it, it would stall the stack's real-time threads (see Stack.base_priority).
                set_realtime_priority(self.stack.base_priority)
            pol = self.stack.nodes.get("policy")
            if pol is not None and pol.runner is None:
                raise SystemExit(f"error: no policy to run: {pol.load_error}")
        except BaseException:
            if self.stack is not None:
                self.stack.close()
            raise

    @staticmethod
    def _check_policy(metrics: dict[str, Any]) -> None:
        if metrics and metrics.get("policy") is None:
            raise SystemExit("error: no policy to run (see the policy node's log above)")

    def check(self) -> None:
        self.stack.check()

    def per_node(self) -> dict[str, Any]:
        if self.processes:
            return self.stack.node_metrics()
        return {name: node.metrics() for name, node in self.stack.nodes.items()}

    def summary(self) -> dict[str, Any]:
        if self.processes:
            from koopman_control.bringup import summarize

            return summarize(self.per_node())
        return self.stack.metrics()

    def reset_stats(self) -> None:
        if self.processes:
            for name in self.stack.nodes:
                self.stack.call_trigger(f"/{name}/reset_stats")
        else:
            self.stack.reset_stats()

    def close(self) -> None:
        self.stack.close()


def _fmt(v: Any, spec: str, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:{spec}}{unit}"


def status_line(m: dict[str, Any]) -> str:
    """One line from a summary (:func:`koopman_control.bringup.summarize`)."""
    rate = m.get("success_rate")
    lat = m.get("latency_ms") or {}
    fb = m.get("feedback") or {}
    return " | ".join([
        f"episodes {m.get('episodes')}", f"success {_fmt(None if rate is None else 100 * rate, '.0f', '%')}",
        f"feedback {_fmt(fb.get('rate_hz'), '.0f', ' Hz')}",
        f"latency p50 {_fmt(lat.get('p50'), '.2f')} p99 {_fmt(lat.get('p99'), '.2f')} ms",
        f"control {_fmt(m.get('control_rate_hz'), '.1f', ' Hz')}", f"missed {m.get('missed_ticks')}",
        f"mode {m.get('mode')}"])


def _write_json(path: str | None, data: dict[str, Any]) -> None:
    if not path:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(f"wrote {out}")


def _supervise(run: Running, duration: float, warmup: float = 0.0,
               on_poll: Callable[[Running], None] | None = None, poll: float = 0.5) -> tuple[dict[str, Any], int]:
    """Run for ``duration`` s after ``warmup`` (0: until Ctrl-C or SIGTERM), then stop: (summary, exit code).

    The summary is read before the nodes stop, deaf to further stop signals (a second Ctrl-C, launch-style
    escalation) so that shutting down in order cannot be cut short.
    """
    from koopman_control.ros.base import ignore_stop_signals
    from koopman_control.stack import StackError

    code = 0
    summary: dict[str, Any] = {}
    try:
        if warmup > 0:
            _wait(run, warmup, poll)
            run.reset_stats()
        _wait(run, duration if duration > 0 else float("inf"), poll, on_poll)
    except (KeyboardInterrupt, _Stop):
        pass
    except (StackError, RuntimeError) as err:
        print(f"\nerror: {err}", file=sys.stderr)
        code = 1
    finally:
        ignore_stop_signals()
        try:
            summary = run.summary()
        finally:
            run.close()
    return summary, code


def _wait(run: Running, seconds: float, poll: float, on_poll: Callable[[Running], None] | None = None) -> None:
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        time.sleep(min(poll, max(0.0, t_end - time.monotonic())))
        run.check()
        if on_poll is not None:
            on_poll(run)


def cmd_run(ns: argparse.Namespace) -> int:
    run = Running(ns)
    tty = sys.stdout.isatty()
    last_print = [0.0]

    def show(r: Running) -> None:
        if not tty and time.monotonic() - last_print[0] < 5.0:
            return
        line = status_line(r.summary())
        if tty:
            sys.stdout.write("\r\x1b[2K" + line)
            sys.stdout.flush()
        else:
            print(line, flush=True)
        last_print[0] = time.monotonic()

    summary, code = _supervise(run, ns.duration, on_poll=show, poll=1.0 if ns.processes else 0.25)
    if tty:
        print()
    lat = summary.get("latency_ms") or {}
    print(f"stopped: {summary.get('episodes')} episodes, success rate {_fmt(summary.get('success_rate'), '.2f')}, "
          f"latency p50 {_fmt(lat.get('p50'), '.2f')} ms p99 {_fmt(lat.get('p99'), '.2f')} ms, "
          f"missed ticks {summary.get('missed_ticks')}, fallback events {summary.get('fallback_events')}")
    return code


def cmd_bringup(ns: argparse.Namespace, bench: bool = False) -> int:
    from koopman_control.bringup import TARGETS, meets_targets
    from koopman_control.ros.base import executor_kind

    t0 = time.monotonic()
    run = Running(ns)
    startup_s = time.monotonic() - t0
    t0 = time.monotonic()
    m, code = _supervise(run, ns.duration, warmup=ns.warmup)
    m = {"duration_s": round(time.monotonic() - t0 - ns.warmup, 3), "warmup_s": ns.warmup,
         "startup_s": round(startup_s, 3), "layout": "processes" if ns.processes else "in-process",
         "executor": executor_kind(), "robot": ns.robot or ("sim" if ns.use_sim else "kortex"),
         "policy_rate_hz": ns.policy_rate, **m}
    if bench:
        m["targets"] = TARGETS
        m["meets_targets"] = meets_targets(m)
        m["machine"] = {"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]}
    _write_json(ns.json, m)
    lat = m.get("latency_ms") or {}
    fb = m.get("feedback") or {}
    coverage = m.get("mean_max_coverage")
    print(f"episodes {m.get('episodes')}, success rate {_fmt(m.get('success_rate'), '.2f')}"
          + (f", mean max coverage {coverage:.3f}" if coverage is not None else "") + ", collisions "
          f"{m.get('collisions')} ({m.get('early_collisions')} within 0.5 s of a start), latency p50 "
          f"{_fmt(lat.get('p50'), '.3f')} ms p99 {_fmt(lat.get('p99'), '.3f')} ms (n={lat.get('count')}), missed "
          f"ticks {m.get('missed_ticks')}, fallback events {m.get('fallback_events')}, holds {m.get('holds')}, "
          f"control {_fmt(m.get('control_rate_hz'), '.2f', ' Hz')}, feedback {_fmt(fb.get('rate_hz'), '.1f', ' Hz')}"
          f" (jitter {_fmt(fb.get('jitter_ms'), '.3f', ' ms')})")
    return code


def cmd_inject_fault(ns: argparse.Namespace) -> int:
    from koopman_control.faults import inject

    print(json.dumps(inject(ns.kind, ns.duration, ns.domain_id, ns.when_tracking)), flush=True)
    return 0


def cmd_fault_run(ns: argparse.Namespace) -> int:
    """The stack in the process layout, one fault every ``--period`` s (koopman_control.faults)."""
    from koopman_control.faults import fault_run
    from koopman_control.ros.base import executor_kind, ignore_stop_signals

    ns.processes = True
    run = Running(ns)
    code = 0
    report: dict[str, Any] = {}
    summary: dict[str, Any] = {}
    try:
        if ns.warmup > 0:
            _wait(run, ns.warmup, 0.5)
            run.reset_stats()
        cycle = tuple(ns.faults.split(",")) if ns.faults else None
        report = fault_run(run.stack, duration=ns.duration, period=ns.period, domain_id=ns.domain_id, cycle=cycle)
    except (KeyboardInterrupt, _Stop):
        pass
    finally:
        ignore_stop_signals()
        try:
            summary = run.summary()
        finally:
            run.close()
    faults = report.get("faults", [])
    crashed = sorted({n for f in faults for n in f.get("crashed", [])})
    late = [f["fault"] for f in faults if f.get("stopped_after_ms") is not None
            and f["stopped_after_ms"] > 1e3 * ns.hold_within]
    unseen = [f["fault"] for f in faults if not f.get("on_diagnostics")]
    out = {"duration_s": ns.duration, "period_s": ns.period, "executor": executor_kind(), **summary, **report,
           "checks": {"crashed": crashed, "stopped_late": late, "not_on_diagnostics": unseen,
                      "early_collisions": summary.get("early_collisions")}}
    _write_json(ns.json, out)
    print(f"{len(faults)} faults: crashed {crashed or 'none'}, arm stopped late {late or 'never'}, missing from "
          f"/diagnostics {unseen or 'none'}; episodes {summary.get('episodes')}, success rate "
          f"{_fmt(summary.get('success_rate'), '.2f')}, collisions {summary.get('collisions')} "
          f"({summary.get('early_collisions')} within 0.5 s of a start)")
    return code if not crashed else 1


def _parser(sub: argparse._SubParsersAction, name: str, help_text: str, description: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help_text, description=description,
                          epilog=f"example:\n  {EXAMPLES[name]}" if name in EXAMPLES else None,
                          formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="koopman-control", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = _parser(sub, "run", "the stack in simulation with the shipped student and a live status line",
                "Start the stack (simulated arm, default student, teacher fallback) and show one status line "
                "until Ctrl-C.")
    _add_stack_args(p)
    p.add_argument("--duration", type=float, default=0.0, help="stop after S seconds (default: until Ctrl-C)")
    p.set_defaults(func=cmd_run)
    p = _parser(sub, "bringup", "the stack headless; --duration and --json for a measured run",
                "Start the stack without a status line; with --duration it stops by itself and --json writes the "
                "summary: every episode (seed, success, collision and its time after the start, side), latency, "
                "missed ticks, fallbacks, holds and each node's counters.")
    _add_stack_args(p)
    p.add_argument("--duration", type=float, default=0.0, help="seconds to run (default: until Ctrl-C)")
    p.add_argument("--warmup", type=float, default=0.0, help="seconds whose statistics are discarded")
    p.add_argument("--json", default=None, metavar="OUT", help="write the summary here")
    p.set_defaults(func=cmd_bringup)
    p = _parser(sub, "bench-stack", "measure latency, missed ticks and feedback rate against the targets (JSON)",
                "bringup with a warm-up whose statistics are discarded; the summary says which targets are met.")
    _add_stack_args(p)
    p.add_argument("--duration", type=float, default=60.0, help="measured seconds (default 60)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds discarded first (default 3)")
    p.add_argument("--json", default=None, metavar="OUT", help="write the summary here")
    p.set_defaults(func=lambda ns: cmd_bringup(ns, bench=True))
    from koopman_control.faults import CHUNK_FAULTS, JOINT_FAULTS, MODEL_FAULTS

    p = _parser(sub, "inject-fault", "one fault from a process of its own: bad joint states, chunks or models",
                "Publish bad joint states or bad chunks for --duration seconds at 100 Hz, or ask the policy node "
                "to swap to a model it must refuse; prints one JSON line with what happened.")
    p.add_argument("kind", choices=JOINT_FAULTS + CHUNK_FAULTS + MODEL_FAULTS)
    p.add_argument("--duration", type=float, default=1.0, help="seconds of bad messages (default 1)")
    p.add_argument("--domain-id", type=int, default=None, help="ROS_DOMAIN_ID of the stack")
    p.add_argument("--when-tracking", metavar="ROBOT", default=None,
                   help="bad messages start once this robot node's arm follows a plan (sim, kortex_bridge; at most "
                        "5 s of waiting), so that the stop they must cause can be timed")
    p.set_defaults(func=cmd_inject_fault)
    p = _parser(sub, "fault-run", "the stack in the process layout with a fault every --period seconds (JSON)",
                "Cycle through bad joint states, bad chunks, refused swaps, a killed teacher and a killed and "
                "restarted policy while the stack runs; report per fault whether it reached /diagnostics, how "
                "soon the arm stopped where it had to, which node counted it, and whether anything crashed.")
    _add_stack_args(p)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of faults (default 600)")
    p.add_argument("--period", type=float, default=10.0, help="seconds between faults (default 10)")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds before the first fault (default 5)")
    p.add_argument("--hold-within", type=float, default=0.1, help="the arm must stop within this (s)")
    p.add_argument("--faults", default=None, metavar="KIND,...",
                   help="these faults in this order instead of the whole cycle")
    p.add_argument("--json", default=None, metavar="OUT", help="write the report here")
    p.set_defaults(func=cmd_fault_run)
    try:  # record, replay, replay-live, bag-info, bag-recover
        from koopman_control.bag.cli import register
    except ImportError as err:  # keep run/bringup usable if the bag tools cannot load
        print(f"warning: bag commands unavailable: {err}", file=sys.stderr)
    else:
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    from koopman_control.stack import StackError

    previous = signal.signal(signal.SIGTERM, _sigterm)
    try:
        return ns.func(ns)
    except StackError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, _Stop):
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    raise SystemExit(main())
