"""``koopman-control`` subcommands for bags: record, replay, replay-live, bag-info, bag-recover.

Hooked into ``koopman_control.cli`` with ``register(sub)``; also runnable alone as
``python -m koopman_control.bag.cli <command> ...``. User errors (bad bag, unknown policy) exit with status 2
and one line naming the problem.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from koopman_control.bag import topics as T


def _topics(value: str | None) -> list[str] | None:
    return [t.strip() for t in value.split(",") if t.strip()] if value else None


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def _print_json(data: dict[str, Any]) -> None:
    print(json.dumps(data, indent=2, default=str))


# -- record ---------------------------------------------------------------------------------------------------------
def cmd_record(ns: argparse.Namespace) -> int:
    from koopman_control.bag.recorder import record

    topics = _topics(ns.topics) or list(T.DEFAULT_RECORD)
    if ns.camera and T.CAMERA not in topics:
        topics.append(T.CAMERA)
    if ns.duration is not None and not ns.duration > 0:
        raise ValueError("--duration must be positive")
    log = (lambda _m: None) if ns.json else (lambda m: print(m, file=sys.stderr))
    summary = record(ns.out, topics=topics, storage=ns.storage, duration_s=ns.duration, record_all=ns.all, log=log)
    if ns.json:
        _print_json(summary)
    else:
        per = ", ".join(f"{t} {c}" for t, c in summary["topics"].items()) or "nothing"
        print(f"wrote {summary['path']} ({summary['storage']}, {summary['messages']} messages, "
              f"{summary['bytes'] / 1e6:.2f} MB, {summary['seconds']:.1f} s): {per}")
    return 0


# -- replay (offline) -----------------------------------------------------------------------------------------------
def cmd_replay(ns: argparse.Namespace) -> int:
    from koopman_control.bag.reader import load_run
    from koopman_control.bag.replay import replay
    from koopman_control.bag.report import write_report

    policies = _topics(ns.policies) or []
    if not policies:
        raise ValueError("--policies needs at least one policy name or path")
    say = (lambda _m: None) if ns.json else (lambda m: print(m, file=sys.stderr))
    t0 = time.perf_counter()
    run = load_run(ns.bag, allow_unsorted=ns.allow_unsorted)
    t_load = time.perf_counter() - t0
    res = replay(run, policies, teacher=ns.teacher, backend=ns.backend, seed=ns.seed, progress=say,
                 fallback=not ns.no_fallback, obs_source=ns.obs_source)
    wall = time.perf_counter() - t0
    res.summary["replay_wall_s"] = {"load": t_load, "total": wall,
                                    "realtime_factor": res.summary["duration_s"] / wall if wall > 0 else None}
    out = Path(ns.out) if ns.out else Path(str(Path(ns.bag).resolve()).rstrip("/") + "_replay")
    files = write_report(res, out, list(run.joint_names), plots=not ns.no_plots)
    res.summary["files"] = files
    Path(files["json"]).write_text(json.dumps(res.summary, indent=2) + "\n")
    if ns.json:
        _print_json(res.summary)
        return 0
    rtf = res.summary["replay_wall_s"]["realtime_factor"]
    print(f"replayed {res.summary['ticks']} observations ({res.summary['duration_s']:.1f} s of recording) through "
          f"{len(policies)} policies in {wall:.2f} s ({rtf:.0f}x real time)")
    for name, p in res.summary["policies"].items():
        er, et = p["error_vs_recorded"], p["error_vs_teacher"] or {}
        print(f"  {name:>16}: rmse vs recorded {fmt(er['rmse'])} rad, vs teacher {fmt(et.get('rmse'))} rad, jerk "
              f"rms {fmt(p['jerk_executed']['rms'])} rad/s^3, latency p50 {fmt(p['latency_ms']['p50'])} ms p99 "
              f"{fmt(p['latency_ms']['p99'])} ms")
    print(f"report: {files['markdown']}")
    return 0


# -- replay-live ----------------------------------------------------------------------------------------------------
#: Stack parameters of a live replay (``replay-live`` and ``replay.launch.py``). A replay asks how the policy
#: answers each recorded observation, so it plans on every tick rather than following a plan for
#: n_action_steps ticks (which would make a chunk depend on the plan's phase, not on the observation).
REPLAY_OVERRIDES: dict[str, dict[str, Any]] = {"policy": {"execute_steps": 1}}


def cmd_replay_live(ns: argparse.Namespace) -> int:
    """The bag's sensor topics played into the in-process stack (no sim), optionally recording the result."""
    import rclpy
    from rclpy.signals import SignalHandlerOptions

    from koopman_control.bag.recorder import BagRecorder
    from koopman_control.bringup import Stack
    from koopman_control.stack import StackArgs, build_stack

    if not 0 < ns.rate <= 100:
        raise ValueError(f"--rate must be in (0, 100], got {ns.rate}")
    args = StackArgs(use_sim=True, policy=ns.policy or "", teacher_fallback=ns.teacher_fallback)
    specs = [s for s in build_stack(args, overrides=REPLAY_OVERRIDES) if s.name not in ("sim", "kortex_bridge")]
    specs.append(player_spec(ns.bag, ns.rate, _topics(ns.topics)))
    ctx = rclpy.Context()
    rclpy.init(context=ctx, domain_id=ns.domain_id, signal_handler_options=SignalHandlerOptions.NO)
    rec: BagRecorder | None = None
    stack: Stack | None = None
    out: dict[str, Any] = {}
    try:
        if ns.record:
            rec = BagRecorder(ns.record, context=ctx, storage=ns.storage,
                              custom_data={"koopman.replay_of": str(ns.bag), "koopman.rate": f"{ns.rate:g}"},
                              log=lambda _m: None).start()
        stack = Stack(specs, context=ctx)
        player = stack.nodes["bag_player"]
        deadline = time.monotonic() + ns.timeout if ns.timeout else None
        try:
            while not player.done.wait(0.25):
                stack.check()
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"playback not finished after {ns.timeout} s")
            time.sleep(ns.tail)  # the chunks for the last observations
        except KeyboardInterrupt:
            pass
        out = {"player": player.metrics(), "stack": stack.metrics()}
    finally:
        if stack is not None:
            stack.close()
        if rec is not None:
            out["recorded"] = rec.stop()
        ctx.try_shutdown()
    out["stack"].pop("nodes", None)
    if ns.json:
        _print_json(out)
    else:
        pl, st = out["player"], out["stack"]
        lat = st.get("latency_ms") or {}
        print(f"played {pl['published']}/{pl['messages']} messages ({pl['bag_duration_s']:.1f} s at "
              f"x{pl['rate']:g}) in {pl['wall_s'] or 0:.1f} s, late {pl['late']}; policy {st.get('policy')}: "
              f"latency p50 {fmt(lat.get('p50'))} ms p99 {fmt(lat.get('p99'))} ms, missed ticks "
              f"{st.get('missed_ticks')}, mode {st.get('mode')}")
        if "recorded" in out:
            print(f"recorded the live run to {out['recorded']['path']} ({out['recorded']['messages']} messages)")
    return 0 if out["player"]["state"] == "done" else 1


def player_spec(bag: str | Path, rate: float = 1.0, topics: list[str] | None = None,
                exit_when_done: bool = False) -> Any:
    """The bag player as a stack node (for ``Stack`` / the launch file)."""
    from koopman_control.stack import NodeSpec

    overrides: dict[str, Any] = {"bag": str(bag), "rate": float(rate), "exit_when_done": exit_when_done}
    if topics:
        overrides["topics"] = list(topics)
    return NodeSpec("bag_player_node", "bag_player", "koopman_control.nodes.bag_player_node:BagPlayerNode", (),
                    overrides)


# -- inspection and recovery ------------------------------------------------------------------------------------------
def cmd_info(ns: argparse.Namespace) -> int:
    from koopman_control.bag.reader import inspect_bag

    info = inspect_bag(ns.bag).to_dict()
    if ns.json:
        _print_json(info)
        return 0
    print(f"{info['path']}: {info['storage']}, {info['message_count']} messages, {info['duration_s']:.2f} s, "
          f"{info['size_bytes'] / 1e6:.2f} MB")
    for name, t in info["topics"].items():
        print(f"  {name:<28} {t['type']:<40} {t['count']}")
    return 0


def cmd_recover(ns: argparse.Namespace) -> int:
    from koopman_control.bag.recover import recover

    res = recover(ns.bag, ns.out, storage=ns.storage)
    if ns.json:
        _print_json(res)
    else:
        print(f"recovered {res['messages']} messages into {res['out']}"
              + (f" ({res['unreadable']} untyped messages dropped)" if res["unreadable"] else ""))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add the bag subcommands to ``koopman-control``'s subparsers; each sets ``func``."""
    p = sub.add_parser("record", help="record the stack's topics to a rosbag2 bag (Ctrl-C stops, bag kept)")
    p.add_argument("--out", required=True, help="bag folder to create (never overwritten)")
    p.add_argument("--duration", type=float, default=None, help="stop after S seconds (default: Ctrl-C)")
    p.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap", help="storage plugin (default mcap)")
    p.add_argument("--topics", default=None, help=f"comma-separated topics (default: {','.join(T.DEFAULT_RECORD)})")
    p.add_argument("--camera", action="store_true", help=f"also record {T.CAMERA}")
    p.add_argument("--all", action="store_true", help="record every topic that appears")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_guard(cmd_record))

    p = sub.add_parser("replay", help="run policies offline over a bag's observations and report (faster than real "
                                      "time)")
    p.add_argument("bag", help="recorded bag (folder, or .mcap/.db3 file)")
    p.add_argument("--policies", required=True, help="comma-separated catalogue names or paths")
    p.add_argument("--teacher", default="auto", help="reference: a policy name, 'recorded' (/teacher/action_chunk), "
                                                      "'none', or 'auto' (default)")
    p.add_argument("--backend", choices=("stack", "auto", "torch", "onnx"), default="stack",
                   help="stack: ONNX as the live stack serves it (default; PyTorch when no export exists)")
    p.add_argument("--seed", type=int, default=0, help="noise seed, as the policy node's 'seed' (default 0)")
    p.add_argument("--out", default=None, help="report folder (default: BAG_replay next to the bag)")
    p.add_argument("--obs-source", choices=("auto", "recorded", "rebuild"), default="auto",
                   help="observations: the recorded /policy/observation (auto, when present) or rebuilt from "
                        "/joint_states as the ingest builds them")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-fallback", action="store_true", help="simulate the supervisor with teacher fallback off")
    p.add_argument("--allow-unsorted", action="store_true", help="drop samples whose stamps go backwards instead "
                                                                  "of refusing the bag")
    p.add_argument("--json", action="store_true", help="print the full summary as JSON on stdout")
    p.set_defaults(func=_guard(cmd_replay))

    p = sub.add_parser("replay-live", help="play a bag's sensor topics into the live stack at recorded timing")
    p.add_argument("bag")
    p.add_argument("--rate", type=float, default=1.0, help="playback speed factor (default 1)")
    p.add_argument("--policy", default="", help="policy to run (default: the catalogue's default)")
    p.add_argument("--teacher-fallback", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--topics", default=None, help="comma-separated topics to play (default: robot-side topics)")
    p.add_argument("--record", default=None, help="record the live run to this new bag")
    p.add_argument("--storage", choices=("mcap", "sqlite3"), default="mcap")
    p.add_argument("--tail", type=float, default=0.5, help="seconds to keep running after the last message")
    p.add_argument("--timeout", type=float, default=0.0, help="give up after S seconds (0 = never)")
    p.add_argument("--domain-id", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_guard(cmd_replay_live))

    p = sub.add_parser("bag-info", help="topics, types, counts and duration of a bag")
    p.add_argument("bag")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_guard(cmd_info))

    p = sub.add_parser("bag-recover", help="rebuild a readable bag from one whose recording was cut off")
    p.add_argument("bag")
    p.add_argument("--out", required=True, help="new bag folder")
    p.add_argument("--storage", choices=("mcap", "sqlite3"), default=None, help="default: as the source")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_guard(cmd_recover))


def _guard(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """User errors (bad bag, unknown policy, existing --out) -> one line on stderr and status 2."""

    def run(ns: argparse.Namespace) -> int:
        from koopman_control.bag.reader import BagError
        from koopman_control.core.policy_runner import PolicyLoadError

        try:
            return int(func(ns) or 0)
        except (BagError, PolicyLoadError, ValueError, OSError, TimeoutError, RuntimeError) as err:
            print(f"koopman-control {ns.command}: error: {err}", file=sys.stderr)
            return 2

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="koopman-control", description="rosbag2 tools of koopman_control")
    register(parser.add_subparsers(dest="command", required=True))
    ns = parser.parse_args(argv)
    return int(ns.func(ns))


if __name__ == "__main__":
    raise SystemExit(main())
