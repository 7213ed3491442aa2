"""``koopman-sim``: collect demonstrations, watch/render expert rollouts, benchmark the simulator.

collect, rollout and bench print their summary as JSON on stdout (progress and status go to stderr);
``--json OUT`` also writes it to OUT. Errors in the arguments or inputs (unknown task, missing model or output
directory...) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

# Nothing heavy at module level: `koopman-sim --help` must not wait for MuJoCo or torch; each command imports
# what it runs.
DEFAULT_TASK = "gen3_reach_obstacle"
EXAMPLES = {
    "collect": "koopman-sim collect --task gen3_reach_obstacle --episodes 400 --seed 0 --out data/gen3_demos.h5 "
               "--json data/gen3_demos.json\n"
               "  koopman-sim collect --task pusht --episodes 20 --out pusht.h5 --no-only-success",
    "rollout": "koopman-sim rollout --episodes 3 --seed 7 --render rollout.png",
    "view": "koopman-sim view --seed 3\n  koopman-sim view --episodes 2 --out strip.png   # without a display",
    "bench": "koopman-sim bench --seconds 20 --json bench_sim.json",
}


def _has_display() -> bool:
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def _parser(sub: argparse._SubParsersAction, name: str, help_text: str, description: str) -> argparse.ArgumentParser:
    """A subcommand whose help has its description (wrapped) and its example (as written)."""
    return sub.add_parser(name, help=help_text, description=textwrap.fill(description, 100),
                          epilog=f"example:\n  {EXAMPLES[name]}", formatter_class=argparse.RawDescriptionHelpFormatter)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="koopman-sim", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp: argparse.ArgumentParser, episodes_default: int | None) -> None:
        sp.add_argument("--task", default=DEFAULT_TASK, help=f"task name (default {DEFAULT_TASK})")
        if episodes_default is None:
            sp.add_argument("--episodes", type=_positive_int, required=True, help="number of episodes")
        else:
            sp.add_argument("--episodes", type=_positive_int, default=episodes_default,
                            help=f"number of episodes (default {episodes_default})")
        sp.add_argument("--seed", type=int, default=0, help="env seed of the first episode (then +1 each)")
        sp.add_argument("--model", default=None, help="alternative Gen3 MJCF with the same joint names")

    c = _parser(sub, "collect", "collect expert demonstrations into an HDF5 dataset",
                "Run the task's scripted expert for env seeds S..S+N-1 and write the episodes to an HDF5 dataset "
                "(koopman_sim.dataset); the summary (episodes, success_rate, collision_rate, left_fraction, "
                "sha256, ...) covers every episode run, whichever are written.")
    common(c, None)
    c.add_argument("--out", required=True, metavar="HDF5", help="output .hdf5 path")
    c.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="also write the summary JSON here")
    c.add_argument("--only-success", action=argparse.BooleanOptionalAction, default=True,
                   help="write only successful episodes (default, for training); --no-only-success keeps every "
                        "episode with its success and side flags")
    c.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="show a progress bar (default yes)")
    c.add_argument("--camera", default=None, metavar="NAME",
                   help="also record a frame of this scene camera per control step (e.g. workspace): the camera "
                        "policies' demonstrations")
    c.add_argument("--image-size", type=_positive_int, nargs=2, default=(64, 64), metavar=("H", "W"),
                   help="frame size with --camera (default 64 64, the camera policies' own resolution)")

    r = _parser(sub, "rollout", "run the expert with a live status line, optionally render",
                "Run the Gen3 expert with a one-line live status on stderr; --render writes a frame strip (PNG) "
                "or, when ffmpeg is installed, a video. Rendering is offscreen (MUJOCO_GL=egl without a display).")
    common(r, 3)
    r.add_argument("--render", default=None, metavar="OUT",
                   help="write frames to OUT.png (strip) or OUT.mp4 (needs ffmpeg)")

    v = _parser(sub, "view", "interactive viewer (or rendered strip when there is no display)",
                "Watch the Gen3 expert in MuJoCo's interactive viewer; without a display, render a frame strip "
                "to --out instead.")
    common(v, 1)
    v.add_argument("--out", default="koopman_sim_view.png", metavar="PNG",
                   help="strip written when there is no display (default koopman_sim_view.png)")

    b = _parser(sub, "bench", "headless real-time factor",
                "Real-time factor of the headless simulation on one core: physics alone, and with the expert "
                "in the loop.")
    b.add_argument("--seconds", type=_positive_float, default=20.0, help="simulated seconds to run (default 20)")
    b.add_argument("--json", dest="json_out", default=None, metavar="OUT", help="also write the result JSON here")
    return p


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _check_writable(path: str | None) -> None:
    if path is None:
        return
    parent = Path(path).expanduser().resolve().parent
    if not parent.is_dir():
        raise CliError(f"output directory does not exist: {parent}")


def _check_model(path: str | None) -> None:
    if path is not None and not Path(path).is_file():
        raise CliError(f"model file not found: {path}")


def _print_summary(summary: dict[str, Any], json_out: str | None) -> None:
    """The summary as JSON on stdout and, with ``--json OUT``, in OUT (said on stderr: stdout stays JSON)."""
    text = json.dumps(summary, indent=2)
    print(text)
    if json_out:
        Path(json_out).write_text(text + "\n")
        print(f"wrote {json_out}", file=sys.stderr)


def _cmd_collect(args: argparse.Namespace) -> int:
    from koopman_sim import check_task
    from koopman_sim.collect import collect

    check_task(args.task)
    _check_model(args.model)
    _check_writable(args.out)
    _check_writable(args.json_out)
    summary = collect(
        args.task,
        args.episodes,
        args.out,
        seed=args.seed,
        only_success=args.only_success,
        model_path=args.model,
        progress=args.progress,
        camera=args.camera,
        image_size=tuple(args.image_size),
    )
    _print_summary(summary, args.json_out)
    return 0


def _status(ep: int, n: int, step: int, info: dict, successes: int, done_eps: int) -> str:
    return (
        f"episode {ep}/{n}  step {step:3d}  t={info['time']:4.1f}s  distance {info['distance']:.3f} m  "
        f"side {info['side'] or '-':5s}  success so far {successes}/{done_eps}"
    )


def _rollout(args: argparse.Namespace, render_to: str | None) -> int:
    from koopman_sim import check_task, make
    from koopman_sim.collect import run_episode
    from koopman_sim.expert import ScriptedExpert

    check_task(args.task)
    if args.task == "pusht":
        raise CliError("rollout and view drive the Gen3 expert; for pusht, collect prints the expert's summary")
    _check_model(args.model)
    _check_writable(render_to)
    if render_to is not None and Path(render_to).suffix.lower() not in (".png", ".mp4"):
        raise CliError(f"--render must end in .png or .mp4, got {render_to!r}")
    env = make(args.task, model_path=args.model)
    expert = ScriptedExpert(model_path=args.model, control_dt=env.control_dt)
    live = sys.stderr.isatty()
    rows: list[list[Any]] = []
    successes = 0
    results = []
    for i in range(args.episodes):
        seed = args.seed + i

        def on_step(step: int, info: dict, ep: int = i + 1, wins: int = successes) -> None:
            if live:
                line = _status(ep, args.episodes, step, info, wins, ep - 1)
                print("\r" + line, end="", file=sys.stderr)

        frame_every = 5 if render_to else None
        rec = run_episode(env, expert, seed, on_step=on_step, frame_every=frame_every)
        res = rec.result
        successes += res.success
        results.append(res)
        rows.append(rec.frames)
        info = {"time": res.duration, "distance": res.final_distance, "side": res.side}
        line = _status(i + 1, args.episodes, rec.steps, info, successes, i + 1)
        outcome = "success" if res.success else ("collision" if res.collision else "timeout")
        print(("\r" if live else "") + f"{line}  -> {outcome}", file=sys.stderr)
    env.close()
    from koopman_sim.collect import summarize

    print(json.dumps(summarize(results, env.control_dt)))
    if render_to:
        from koopman_sim.render import save_frames

        _, note = save_frames(render_to, rows, fps=round(1 / (5 * env.control_dt)))
        print(note, file=sys.stderr)
    return 0


def _cmd_view(args: argparse.Namespace) -> int:
    if not _has_display():
        print(f"no display found; rendering a frame strip to {args.out} instead", file=sys.stderr)
        return _rollout(args, args.out)
    import mujoco.viewer

    from koopman_sim import check_task, make
    from koopman_sim.collect import episode_side, expert_rng
    from koopman_sim.expert import ScriptedExpert

    check_task(args.task)
    if args.task == "pusht":
        raise CliError("rollout and view drive the Gen3 expert; for pusht, collect prints the expert's summary")
    _check_model(args.model)
    env = make(args.task, model_path=args.model)
    expert = ScriptedExpert(model_path=args.model, control_dt=env.control_dt)
    with mujoco.viewer.launch_passive(env.arm.model, env.arm.data) as viewer:
        for i in range(args.episodes):
            obs, _ = env.reset(seed=args.seed + i)
            expert.reset(obs, expert_rng(args.seed + i), side=episode_side(args.seed + i))
            done = False
            while viewer.is_running() and not done:
                t0 = time.perf_counter()
                obs, _, term, trunc, info = env.step(expert.act(obs))
                done = term or trunc
                viewer.sync()
                time.sleep(max(0.0, env.control_dt - (time.perf_counter() - t0)))
            print(f"episode {i + 1}: success={info['success']} side={info['side']}", file=sys.stderr)
    env.close()
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from koopman_sim.bench import realtime_factor

    _check_writable(args.json_out)
    _print_summary(realtime_factor(args.seconds), args.json_out)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # argparse itself exits 2 on bad arguments
    if not _has_display():
        os.environ.setdefault("MUJOCO_GL", "egl")  # must be set before mujoco is first imported
    commands = {"collect": _cmd_collect, "bench": _cmd_bench, "view": _cmd_view}
    try:
        if args.command == "rollout":
            return _rollout(args, args.render)
        return commands[args.command](args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (CliError, ValueError, FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        prefix = "\n" if sys.stderr.isatty() else ""
        print(f"{prefix}koopman-sim: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
