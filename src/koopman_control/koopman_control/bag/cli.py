"""``koopman-control`` subcommands for bags: record, replay, replay-live, bag-info, bag-recover.

Hooked into ``koopman_control.cli`` with ``register(sub)``; also runnable alone as
``python -m koopman_control.bag.cli <command> ...``. Each command prints what it did in words; ``--json OUT``
writes its summary to OUT as well, as ``bringup`` and ``koopman-distill eval`` do. User errors (bad bag,
unknown policy) exit with status 2 and one line naming the problem.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from koopman_control.bag import topics as T
from koopman_control.cli import _write_json

EXAMPLES = {
    "record": "koopman-control record --out bags/run1 --duration 60\n"
              "  koopman-control record --out bags/cam --camera --storage sqlite3 --json bags/cam.json",
    "replay": "koopman-control replay bags/run1 --policies dkoopman,oneflow --out bags/run1_replay\n"
              "  koopman-control replay bags/run1 --policies bc --teacher recorded --json replay.json",
    "replay-live": "koopman-control replay-live bags/run1 --policy oneflow --record bags/run1_live --json live.json",
    "bag-info": "koopman-control bag-info bags/run1\n  koopman-control bag-info bags/run1 --json info.json",
    "bag-recover": "koopman-control bag-recover bags/cut_off --out bags/recovered",
}


def _topics(value: str | None) -> list[str] | None:
    return [t.strip() for t in value.split(",") if t.strip()] if value else None


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


# -- record ---------------------------------------------------------------------------------------------------------
def cmd_record(ns: argparse.Namespace) -> int:
    from koopman_control.bag.recorder import record

    topics = _topics(ns.topics) or list(T.DEFAULT_RECORD)
    if ns.camera and T.CAMERA not in topics:
        topics.append(T.CAMERA)
    if ns.task_file:
        topics += [t for t in task_topics(ns.task_file) if t not in topics]
    if ns.duration is not None and not ns.duration > 0:
        raise ValueError("--duration must be positive")
    summary = record(ns.out, topics=topics, storage=ns.storage, duration_s=ns.duration, record_all=ns.all,
                     log=lambda m: print(m, file=sys.stderr))
    per = ", ".join(f"{t} {c}" for t, c in summary["topics"].items()) or "nothing"
    print(f"wrote {summary['path']} ({summary['storage']}, {summary['messages']} messages, "
          f"{summary['bytes'] / 1e6:.2f} MB, {summary['seconds']:.1f} s): {per}")
    _write_json(ns.json, summary)
    return 0


def task_topics(task: str) -> list[str]:
    """Every topic a task's contract reads or commands on, so that a recording can become its dataset."""
    from koopman_control.contracts import resolve_contract

    contract = resolve_contract(task)
    found = [T.JOINT_STATES, T.ACTION_CHUNK, T.EPISODE, T.EPISODE_RESULT]
    found += [T.in_bag(f.topic) for f in (*contract.observation, *contract.action) if f.topic]
    return list(dict.fromkeys(found))


# -- replay (offline) -----------------------------------------------------------------------------------------------
def cmd_replay(ns: argparse.Namespace) -> int:
    from koopman_control.bag.reader import load_run
    from koopman_control.bag.replay import replay
    from koopman_control.bag.report import write_report

    policies = _topics(ns.policies) or []
    if not policies:
        raise ValueError("--policies needs at least one policy name or path")
    t0 = time.perf_counter()
    run = load_run(ns.bag, allow_unsorted=ns.allow_unsorted)
    t_load = time.perf_counter() - t0
    res = replay(run, policies, teacher=ns.teacher, backend=ns.backend, seed=ns.seed,
                 progress=lambda m: print(m, file=sys.stderr), fallback=ns.teacher_fallback, obs_source=ns.obs_source)
    wall = time.perf_counter() - t0
    res.summary["replay_wall_s"] = {"load": t_load, "total": wall,
                                    "realtime_factor": res.summary["duration_s"] / wall if wall > 0 else None}
    out = Path(ns.out) if ns.out else Path(str(Path(ns.bag).resolve()).rstrip("/") + "_replay")
    files = write_report(res, out, list(run.joint_names), plots=ns.plots)
    res.summary["files"] = files
    Path(files["json"]).write_text(json.dumps(res.summary, indent=2) + "\n")
    rtf = res.summary["replay_wall_s"]["realtime_factor"]
    print(f"replayed {res.summary['ticks']} observations ({res.summary['duration_s']:.1f} s of recording) through "
          f"{len(policies)} policies in {wall:.2f} s ({rtf:.0f}x real time)")
    for name, p in res.summary["policies"].items():
        er, et = p["error_vs_recorded"], p["error_vs_teacher"] or {}
        print(f"  {name:>16}: rmse vs recorded {fmt(er['rmse'])} rad, vs teacher {fmt(et.get('rmse'))} rad, jerk "
              f"rms {fmt(p['jerk_executed']['rms'])} rad/s^3, latency p50 {fmt(p['latency_ms']['p50'])} ms p99 "
              f"{fmt(p['latency_ms']['p99'])} ms")
    print(f"report: {files['markdown']}")
    _write_json(ns.json, res.summary)
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
    pl, st = out["player"], out["stack"]
    lat = st.get("latency_ms") or {}
    print(f"played {pl['published']}/{pl['messages']} messages ({pl['bag_duration_s']:.1f} s at "
          f"x{pl['rate']:g}) in {pl['wall_s'] or 0:.1f} s, late {pl['late']}; policy {st.get('policy')}: "
          f"latency p50 {fmt(lat.get('p50'))} ms p99 {fmt(lat.get('p99'))} ms, missed ticks "
          f"{st.get('missed_ticks')}, mode {st.get('mode')}")
    if "recorded" in out:
        print(f"recorded the live run to {out['recorded']['path']} ({out['recorded']['messages']} messages)")
    _write_json(ns.json, out)
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
    print(f"{info['path']}: {info['storage']}, {info['message_count']} messages, {info['duration_s']:.2f} s, "
          f"{info['size_bytes'] / 1e6:.2f} MB")
    for name, t in info["topics"].items():
        print(f"  {name:<28} {t['type']:<40} {t['count']}")
    _write_json(ns.json, info)
    return 0


def cmd_recover(ns: argparse.Namespace) -> int:
    from koopman_control.bag.recover import recover

    res = recover(ns.bag, ns.out, storage=ns.storage)
    print(f"recovered {res['messages']} messages into {res['out']}"
          + (f" ({res['unreadable']} untyped messages dropped)" if res["unreadable"] else ""))
    _write_json(ns.json, res)
    return 0


def _parser(sub: argparse._SubParsersAction, name: str, help_text: str, description: str) -> argparse.ArgumentParser:
    """A subcommand whose help has its description (wrapped) and its example (as written)."""
    return sub.add_parser(name, help=help_text, description=textwrap.fill(description, 100),
                          epilog=f"example:\n  {EXAMPLES[name]}", formatter_class=argparse.RawDescriptionHelpFormatter)


def _json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", default=None, metavar="OUT", help="also write the summary as JSON here")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the bag subcommands to ``koopman-control``'s subparsers; each sets ``func``."""
    storages = ("mcap", "sqlite3")
    p = _parser(sub, "record", "record the stack's topics to a rosbag2 bag (Ctrl-C stops, bag kept)",
                "Subscribe to the stack's topics as their publishers appear, with a QoS that matches them, and "
                "write every message unchanged to a new bag that `ros2 bag info/play` open. Ctrl-C, SIGTERM or "
                "--duration close it; data reaches the file every second, so a bag cut off by a crash is rebuilt "
                "with bag-recover.")
    p.add_argument("--out", required=True, metavar="BAG", help="bag folder to create (never overwritten)")
    p.add_argument("--duration", type=float, default=None, help="stop after S seconds (default: Ctrl-C)")
    p.add_argument("--storage", choices=storages, default="mcap", help="storage plugin (default mcap)")
    p.add_argument("--topics", default=None, help=f"comma-separated topics (default: {','.join(T.DEFAULT_RECORD)})")
    p.add_argument("--camera", action="store_true", help=f"also record {T.CAMERA}")
    p.add_argument("--task-file", default=None, metavar="TASK",
                   help="also record every topic of this task's contract (a task file or a built-in task)")
    p.add_argument("--all", action="store_true", help="record every topic that appears")
    _json_arg(p)
    p.set_defaults(func=_guard(cmd_record))

    p = _parser(sub, "replay", "run policies offline over a bag's observations and report (faster than real time)",
                "Answer every recorded observation with each policy as the policy node would (same model files, "
                "same noise seed, the teacher fallback simulated), compare the chunks with the recorded ones and "
                "with a reference, and write report.md, report.json and plots to --out.")
    p.add_argument("bag", help="recorded bag (folder, or .mcap/.db3 file)")
    p.add_argument("--policies", required=True, help="comma-separated catalogue names or paths")
    p.add_argument("--teacher", default="auto", help="reference: a policy name, 'recorded' (/teacher/action_chunk), "
                                                      "'none', or 'auto' (default)")
    p.add_argument("--backend", choices=("stack", "auto", "torch", "onnx"), default="stack",
                   help="stack: ONNX as the live stack serves it (default; PyTorch when no export exists)")
    p.add_argument("--seed", type=int, default=0, help="noise seed, as the policy node's 'seed' (default 0)")
    p.add_argument("--out", default=None, metavar="DIR", help="report folder (default: BAG_replay next to the bag)")
    p.add_argument("--obs-source", choices=("auto", "recorded", "rebuild"), default="auto",
                   help="observations: the recorded /policy/observation (auto, when present) or rebuilt from "
                        "/joint_states as the ingest builds them")
    p.add_argument("--plots", action=argparse.BooleanOptionalAction, default=True,
                   help="write the PNG plots (default yes)")
    p.add_argument("--teacher-fallback", action=argparse.BooleanOptionalAction, default=True,
                   help="simulate the supervisor's fallback to the teacher (default yes)")
    p.add_argument("--allow-unsorted", action="store_true", help="drop samples whose stamps go backwards instead "
                                                                  "of refusing the bag")
    _json_arg(p)
    p.set_defaults(func=_guard(cmd_replay))

    p = _parser(sub, "replay-live", "play a bag's sensor topics into the live stack at recorded timing",
                "Start the stack in this process without the sim and play the bag's robot-side topics (joint "
                "states, task) into it at the recorded timing, restamped to now: the live nodes answer the "
                "recorded run. --record keeps what they publish as a new bag.")
    p.add_argument("bag", help="recorded bag (folder, or .mcap/.db3 file)")
    p.add_argument("--rate", type=float, default=1.0, help="playback speed factor in (0, 100] (default 1)")
    p.add_argument("--policy", default="", help="policy to run (default: the catalogue's default)")
    p.add_argument("--teacher-fallback", action=argparse.BooleanOptionalAction, default=True,
                   help="run the teacher node and fall back to it (default yes)")
    p.add_argument("--topics", default=None, help="comma-separated topics to play (default: robot-side topics)")
    p.add_argument("--record", default=None, metavar="NEW_BAG", help="record the live run to this new bag")
    p.add_argument("--storage", choices=storages, default="mcap", help="storage of the --record bag (default mcap)")
    p.add_argument("--tail", type=float, default=0.5, help="seconds to keep running after the last message")
    p.add_argument("--timeout", type=float, default=0.0, help="give up after S seconds (0 = never)")
    p.add_argument("--domain-id", type=int, default=None, help="ROS_DOMAIN_ID of the stack (default: the "
                                                                "environment's)")
    _json_arg(p)
    p.set_defaults(func=_guard(cmd_replay_live))

    p = _parser(sub, "bag-info", "topics, types, counts and duration of a bag",
                "Read a bag's metadata and index (not its messages): storage, duration, size, and each topic "
                "with its type and message count.")
    p.add_argument("bag", help="bag (folder, or .mcap/.db3 file)")
    _json_arg(p)
    p.set_defaults(func=_guard(cmd_info))

    p = _parser(sub, "bag-recover", "rebuild a readable bag from one whose recording was cut off",
                "Salvage every complete message of a bag whose recording was cut off (crash, kill -9, power "
                "loss, full disk) into a new, closed bag; the broken one is only read. Messages whose topic was "
                "declared in the lost part cannot be typed and are counted as dropped.")
    p.add_argument("bag", help="the cut-off bag (folder, or .mcap/.db3 file)")
    p.add_argument("--out", required=True, metavar="NEW_BAG", help="new bag folder")
    p.add_argument("--storage", choices=storages, default=None, help="storage of the new bag (default: as the source)")
    _json_arg(p)
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
    parser = argparse.ArgumentParser(prog="koopman-control", description="rosbag2 tools of koopman_control: "
                                     "record, replay, replay-live, bag-info, bag-recover")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    ns = parser.parse_args(argv)
    return int(ns.func(ns))


if __name__ == "__main__":
    raise SystemExit(main())
