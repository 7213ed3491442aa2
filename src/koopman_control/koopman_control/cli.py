"""``koopman-control``: run the control stack without the ROS 2 CLI.

  run          the stack in simulation with the shipped student; one live status line; Ctrl-C stops it
  bringup      the stack headless, optionally for --duration seconds, writing a JSON summary
  bench-stack  bringup with a warm-up, reporting latency/missed ticks/feedback rate against the targets
  record, replay, replay-live, bag-info, bag-recover   rosbag2 tools (koopman_control.bag.cli)

The nodes and their parameters are the ones ``ros2 launch koopman_control kinova.launch.py`` starts
(:mod:`koopman_control.stack`); launch arguments map to --use-sim, --policy, --policy-rate, --use-camera,
--teacher-fallback, --robot-ip, --robot, and --param NODE.NAME=VALUE overrides any single parameter.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import yaml


class _Stop(Exception):
    """SIGTERM, handled like Ctrl-C."""


def _add_stack_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--use-sim", default="true", help="simulate the arm (default true)")
    p.add_argument("--robot-ip", default=None, help="Kinova Gen3 address (with --use-sim false)")
    p.add_argument("--robot", default="", choices=("", "sim", "kortex", "kortex-standin"),
                   help="sim, kortex (the arm) or kortex-standin (the bridge against its MuJoCo stand-in); "
                        "default: from --use-sim")
    p.add_argument("--policy", default="", help="policy name in config/policies.yaml or a path (default: the "
                                                "catalogue's default)")
    p.add_argument("--policy-rate", default="", help="control rate in Hz (default: config/stack.yaml)")
    p.add_argument("--use-camera", default="false", help="render camera frames and run camera_ingest_node")
    p.add_argument("--teacher-fallback", default="true", help="run the teacher and fall back to it")
    p.add_argument("--param", action="append", default=[], metavar="NODE.NAME=VALUE",
                   help="override one node parameter (YAML value), e.g. sim.seed=3; repeatable")
    p.add_argument("--domain-id", type=int, default=None, help="ROS_DOMAIN_ID for this process's nodes")


def _overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        node, dot, name = key.partition(".")
        if not sep or not dot or not node or not name:
            raise SystemExit(f"error: --param expects NODE.NAME=VALUE, got {item!r}")
        out.setdefault(node, {})[name] = yaml.safe_load(value) if value else ""
    return out


def _stack_args(ns: argparse.Namespace) -> Any:
    from koopman_control.stack import StackArgs

    values = {"use_sim": ns.use_sim, "policy": ns.policy, "policy_rate": ns.policy_rate,
              "use_camera": ns.use_camera, "teacher_fallback": ns.teacher_fallback, "robot": ns.robot}
    if ns.robot_ip:
        values["robot_ip"] = ns.robot_ip
    return StackArgs.from_strings(values)


def _start(ns: argparse.Namespace, extra: dict[str, dict[str, Any]] | None = None) -> Any:
    from koopman_control.bringup import Stack
    from koopman_control.ros.base import set_realtime_priority, stop_signals_to_main_thread
    from koopman_control.stack import build_stack

    overrides = _overrides(ns.param)
    for node, params in (extra or {}).items():
        for k, v in params.items():
            overrides.setdefault(node, {}).setdefault(k, v)
    specs = build_stack(_stack_args(ns), overrides=overrides)
    stack = None
    try:  # a Ctrl-C held back during start-up is delivered when the block ends: the stack must close then too
        with stop_signals_to_main_thread():
            stack = Stack(specs, domain_id=ns.domain_id)
        if stack.base_priority:
            # This thread only polls, but it takes the GIL to do so: preempted by another process while
            # holding it, it would stall the stack's real-time threads (see Stack.base_priority).
            set_realtime_priority(stack.base_priority)
        pol = stack.nodes.get("policy")
        if pol is not None and pol.runner is None:
            raise SystemExit(f"error: no policy to run: {pol.load_error}")
        return stack
    except BaseException:
        if stack is not None:
            stack.close()
        raise


def _fmt(v: Any, spec: str, unit: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:{spec}}{unit}"


def status_line(stack: Any) -> str:
    pol = stack.nodes.get("policy")
    sim = stack.nodes.get("sim")
    parts = []
    if sim is not None:
        s = sim.driver.summary()
        parts.append(f"episodes {s['episodes']}")
        parts.append(f"success {_fmt(None if s['success_rate'] is None else 100 * s['success_rate'], '.0f', '%')}")
        fb = sim.loop.rate.summary(last=500)
        parts.append(f"feedback {_fmt(fb['rate_hz'], '.0f', ' Hz')}")
    if pol is not None:
        lat = pol.latency.summary(last=600)
        rate = pol.tick_rate.summary(last=50)
        parts.append(f"latency p50 {_fmt(lat['p50'], '.2f')} p99 {_fmt(lat['p99'], '.2f')} ms")
        parts.append(f"control {_fmt(rate['rate_hz'], '.1f', ' Hz')}")
        parts.append(f"missed {pol.missed_ticks}")
        parts.append(f"mode {pol.supervisor.mode.value}")
    return " | ".join(parts)


def _write_json(path: str | None, data: dict[str, Any]) -> None:
    if not path:
        return
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(f"wrote {out}")


def _shutdown(stack: Any) -> dict[str, Any]:
    """Final metrics, then close, deaf to further stop signals (:func:`ignore_stop_signals`)."""
    from koopman_control.ros.base import ignore_stop_signals

    ignore_stop_signals()
    try:
        return stack.metrics()
    finally:
        stack.close()


def _sigterm(*_: Any) -> None:
    raise _Stop()


def _supervise(stack: Any, duration: float, **run_kw: Any) -> tuple[dict[str, Any], int]:
    """Run the stack for ``duration`` s (0: until Ctrl-C or SIGTERM), then stop it: (summary, exit code)."""
    from koopman_control.bringup import run_for

    code = 0
    try:
        run_for(stack, duration if duration > 0 else float("inf"), **run_kw)
    except (KeyboardInterrupt, _Stop):
        pass
    except Exception as err:
        print(f"\nerror: {err}", file=sys.stderr)
        code = 1
    finally:
        summary = _shutdown(stack)
    return summary, code


def cmd_run(ns: argparse.Namespace) -> int:
    stack = _start(ns, {"sim": {"auto_reset": True}})
    tty = sys.stdout.isatty()
    last_print = [0.0]

    def show(st: Any) -> None:
        line = status_line(st)
        if tty:
            sys.stdout.write("\r\x1b[2K" + line)
            sys.stdout.flush()
        elif time.monotonic() - last_print[0] >= 5.0:
            print(line, flush=True)
            last_print[0] = time.monotonic()

    summary, code = _supervise(stack, ns.duration, on_tick=show, poll=0.25)
    if tty:
        print()
    lat = summary["latency_ms"]
    print(f"stopped: {summary['episodes']} episodes, success rate {_fmt(summary['success_rate'], '.2f')}, "
          f"latency p50 {_fmt(lat['p50'], '.2f')} ms p99 {_fmt(lat['p99'], '.2f')} ms, "
          f"missed ticks {summary['missed_ticks']}, fallback events {summary['fallback_events']}")
    return code


def cmd_bringup(ns: argparse.Namespace, bench: bool = False) -> int:
    from koopman_control.bringup import TARGETS, meets_targets

    stack = _start(ns, {"sim": {"auto_reset": True}})
    t0 = time.monotonic()
    m, code = _supervise(stack, ns.duration, warmup=ns.warmup)
    m = {"duration_s": round(time.monotonic() - t0 - ns.warmup, 3), "warmup_s": ns.warmup,
         "policy_rate_hz": float(ns.policy_rate) if ns.policy_rate else None, **m}
    if bench:
        m["targets"] = TARGETS
        m["meets_targets"] = meets_targets(m)
        m["machine"] = {"cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0]}
    _write_json(ns.json, m)
    lat = m["latency_ms"]
    fb = m.get("feedback") or {}
    print(f"episodes {m['episodes']}, success rate {_fmt(m['success_rate'], '.2f')}, latency p50 "
          f"{_fmt(lat['p50'], '.3f')} ms p99 {_fmt(lat['p99'], '.3f')} ms (n={lat['count']}), missed ticks "
          f"{m['missed_ticks']}, fallback events {m['fallback_events']}, control "
          f"{_fmt(m['control_rate_hz'], '.2f', ' Hz')}, feedback {_fmt(fb.get('rate_hz'), '.1f', ' Hz')} "
          f"(jitter {_fmt(fb.get('jitter_ms'), '.3f', ' ms')})")
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="koopman-control", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run the stack in simulation with a live status line (Ctrl-C stops)")
    _add_stack_args(p)
    p.add_argument("--duration", type=float, default=0.0, help="stop after S seconds (default: until Ctrl-C)")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("bringup", help="start the stack headless; --duration/--json for a measured run")
    _add_stack_args(p)
    p.add_argument("--duration", type=float, default=0.0, help="seconds to run (default: until Ctrl-C)")
    p.add_argument("--warmup", type=float, default=0.0, help="seconds whose statistics are discarded")
    p.add_argument("--json", default=None, help="write the summary here")
    p.set_defaults(func=cmd_bringup)
    p = sub.add_parser("bench-stack", help="measure latency, missed ticks and feedback rate (JSON)")
    _add_stack_args(p)
    p.add_argument("--duration", type=float, default=60.0, help="measured seconds (default 60)")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds discarded first (default 3)")
    p.add_argument("--json", default=None, help="write the summary here")
    p.set_defaults(func=lambda ns: cmd_bringup(ns, bench=True))
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
    except KeyboardInterrupt:
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    raise SystemExit(main())
