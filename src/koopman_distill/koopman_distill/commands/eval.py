"""``koopman-distill eval``: closed-loop task metrics, distance to the teacher, latency.

``--task`` picks the environment and its metrics (Gen3: success, collision, mode balance; Push-T: success
and mean max coverage). Writes JSON keyed by policy name, a markdown table beside it and a plot of the
paths (the Gen3 hand or the Push-T disc). ``--policies`` also takes the reference policies ``hold`` and
``random_target`` (``koopman_distill.evaluate``). ``--mode-states N`` adds the per-state mode fractions of
every policy (``N`` start states x ``--mode-draws`` noises, compared with the teacher's on the same states).
Camera policies are evaluated beside state ones, on the same seeds under the same noise protocol, with frames
rendered at their rate (their rows add the camera, frame size and render time; they have no MMD).
"""

from __future__ import annotations

import argparse
import json
import math
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import torch

import koopman_sim
from koopman_distill.cli import COMMANDS
from koopman_distill.data import episode_windows
from koopman_distill.evaluate import (
    MODES,
    NOISE,
    REFERENCES,
    RolloutStats,
    mmd_to_teacher,
    mode_counts,
    mode_summary,
    reference_runner,
    rollout,
    teacher_reference,
)
from koopman_distill.runners import FINISH_STEPS, Runner, TeacherFinishedRunner, TorchRunner, load_runner
from koopman_policy.teacher import refine_start


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help=COMMANDS["eval"])
    p.add_argument("--policies", required=True, help="comma-separated names from config/policies.yaml or paths")
    p.add_argument("--task", default="gen3_reach_obstacle",
                   help=f"environment to evaluate in: {', '.join(koopman_sim.TASKS)} (default gen3_reach_obstacle)")
    p.add_argument("--episodes", type=int, default=100)
    p.add_argument("--seed", type=int, default=1000, help="task seed of the first episode")
    p.add_argument("--json", required=True, type=Path, help="results file; .md and .png are written beside it")
    p.add_argument("--teacher", default=None,
                   help="reference policy for mmd_to_teacher (default: the task's teacher, teacher or pusht_teacher)")
    p.add_argument("--data", help="demonstrations to draw MMD observations from (default: task start states)")
    p.add_argument("--mmd-obs", type=int, default=32)
    p.add_argument("--mmd-draws", type=int, default=32)
    p.add_argument("--backend", choices=("auto", "torch", "onnx"), default="auto")
    p.add_argument("--noise-per", choices=("episode", "decision"), default=None,
                   help="hold each episode's noise or redraw it per decision (default: the task's convention, "
                        "see koopman_distill.evaluate)")
    p.add_argument("--noise-scale", type=float, default=1.0,
                   help="multiply every noise draw the policies are given (a sampling temperature, for diagnosis; "
                        "default 1)")
    p.add_argument("--finish-progress", type=float, default=None,
                   help="diagnosis: each student's chunk finished by the teacher's DDIM-30 from this progress, "
                        "re-noised with its own noise (what teacher-data --refine records; PyTorch checkpoints)")
    p.add_argument("--batch-episodes", type=int, default=1,
                   help="run this many episodes in lockstep, one batched policy call per decision (faster for a "
                        "multi-step teacher; the latency is then that of a batched call; default 1)")
    p.add_argument("--update-cards", action="store_true",
                   help="record each policy's results in its model card under 'evaluation'")
    p.add_argument("--mode-states", type=int, default=0,
                   help="start states for the per-state mode fractions (default 0: not measured)")
    p.add_argument("--mode-draws", type=int, default=32, help="noise draws per start state (default 32)")
    p.add_argument("--mode-seed", type=int, default=20_000,
                   help="task seed of the first mode start state (default 20000, clear of the episodes')")
    p.add_argument("--mode-steps", type=int, default=None,
                   help="control steps after which a draw that has not committed counts as 'none' "
                        "(default: the episode's end)")
    p.set_defaults(func=run)


def mmd_observations(args: argparse.Namespace, n_obs_steps: int, horizon: int) -> torch.Tensor:
    rng = np.random.default_rng(args.seed)
    if args.data:
        from koopman_sim.dataset import load_dataset

        demos = load_dataset(args.data)
        obs = episode_windows(demos.obs, demos.action, demos.episode_ends, horizon, n_obs_steps)["obs"]
        return obs[rng.choice(len(obs), size=args.mmd_obs, replace=False)]
    env = koopman_sim.make(args.task)
    starts = [env.reset(seed=10_000 + args.seed + i)[0] for i in range(args.mmd_obs)]
    env.close()
    return torch.from_numpy(np.stack([[o] * n_obs_steps for o in starts]).astype(np.float32))


DEFAULT_TEACHER = {"gen3_reach_obstacle": "teacher", "pusht": "pusht_teacher"}


def _mmd(result: dict[str, Any]) -> str:
    return "–" if result["mmd_to_teacher"] is None else f"{result['mmd_to_teacher']:.4f}"


def markdown_table(results: dict[str, dict], task: str = "gen3_reach_obstacle") -> str:
    if task == "pusht":
        lines = ["| policy | method | backend | mean max coverage | success (coverage > 0.95) | MMD² to teacher "
                 "| latency p50 / p99 (ms) | parameters |", "|---|---|---|---|---|---|---|---|"]
        for name, r in results.items():
            lines.append(
                f"| {name} | {r['method']} | {r['backend']} | {r['mean_coverage']:.3f} | {r['success_rate']:.2f} "
                f"| {_mmd(r)} | {r['latency_ms']['p50']:.3f} / {r['latency_ms']['p99']:.3f} "
                f"| {r['parameters']:,} |")
        return "\n".join(lines) + "\n"
    head = ("| policy | method | backend | success | collision | left fraction | MMD² to teacher "
            "| latency p50 / p99 (ms) | parameters |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        left = "–" if r["left_fraction"] is None else f"{r['left_fraction']:.2f}"
        lines.append(
            f"| {name} | {r['method']} | {r['backend']} | {r['success_rate']:.2f} | {r['collision_rate']:.2f} "
            f"| {left} | {_mmd(r)} | {r['latency_ms']['p50']:.3f} / {r['latency_ms']['p99']:.3f} "
            f"| {r['parameters']:,} |"
        )
    return "\n".join(lines) + "\n"


def modes_table(results: dict[str, dict], task: str) -> str:
    """Per-state mode fractions (mean and sd across states) and the RMS difference to the teacher's."""
    modes = MODES[task]
    lines = ["| policy | " + " | ".join(modes) + " | RMS diff. to teacher (per state, max over modes) |",
             "|---|" + "---|" * (len(modes) + 1)]
    for name, r in results.items():
        m = r.get("modes")
        if m is None:
            continue
        cells = [f"{m['fraction'][k]:.2f} ± {m['fraction_sd_across_states'][k]:.2f}" for k in modes]
        diff = m.get("rms_diff_to_reference")
        lines.append(f"| {name} | " + " | ".join(cells) + (f" | {max(diff.values()):.3f} |" if diff else " | – |"))
    return "\n".join(lines) + "\n"


CAPTION_CHARS_PER_INCH = 13  # 10 pt DejaVu Sans, with a margin


def save_panels(fig: Any, caption: str, path: Path, dpi: int) -> None:
    """Caption, lay out, save and close a grid of policy panels.

    A caption wider than the figure (one or two panels) is broken before its key in brackets, then wrapped,
    rather than cut off at the image's edges.
    """
    import matplotlib.pyplot as plt

    width = int(fig.get_figwidth() * CAPTION_CHARS_PER_INCH)
    if len(caption) > width:
        caption = "\n".join(textwrap.fill(line, width) for line in caption.replace(" (", "\n(", 1).split("\n"))
    fig.suptitle(caption, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def plot_pusht(stats: dict[str, RolloutStats], path: Path) -> None:
    """Every episode's disc path on the table, one panel per policy, with the goal T."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from koopman_sim.pusht_expert import T_OUTLINE
    from koopman_sim.tasks.pusht import GOAL_POSE

    c, s = np.cos(GOAL_POSE[2]), np.sin(GOAL_POSE[2])
    goal = T_OUTLINE @ np.array([[c, s], [-s, c]]) + GOAL_POSE[:2]
    cols = min(3, len(stats))
    rows = -(-len(stats) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 3.6 * rows), squeeze=False)
    for ax, (name, st) in zip(axes.flat, stats.items(), strict=False):
        ax.add_patch(plt.Polygon(goal, color="tab:green", alpha=0.25))
        for p, ok in zip(st.paths, st.successes, strict=True):
            ax.plot(p[:, 0], p[:, 1], color="tab:blue" if ok else "tab:gray", alpha=0.3, lw=0.7)
        summary = st.summary()
        ax.set_title(f"{name}: coverage {summary['mean_coverage']:.2f}, success {summary['success_rate']:.2f}",
                     fontsize=9)
        ax.set_xlim(0, 512)
        ax.set_ylim(0, 512)
        ax.set_aspect("equal")
    for ax in axes.flat[len(stats):]:
        ax.axis("off")
    save_panels(fig, "Push-T disc paths (blue success, grey not; goal pose green)", path, dpi=110)


def plot_paths(stats: dict[str, RolloutStats], path: Path) -> None:
    """Top view of every episode's hand path, one panel per policy, on the task's workspace."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(stats))
    rows = -(-len(stats) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, (name, s) in zip(axes.flat, stats.items(), strict=False):
        for p, ok, coll in zip(s.paths, s.successes, s.collisions, strict=True):
            color = "tab:red" if coll else ("tab:green" if ok else "tab:gray")
            ax.plot(p[:, 0], p[:, 1], color=color, alpha=0.3, lw=0.8)
        for target, pillar in s.scenes[:1]:
            ax.add_patch(plt.Circle(pillar[:2], 0.035, color="black", alpha=0.6))
            ax.plot(*target[:2], marker="*", color="gold", ms=12, mec="black")
        summary = s.summary()
        left = summary["left_fraction"]
        ax.set_title(f"{name}: success {summary['success_rate']:.2f}, collision {summary['collision_rate']:.2f}, "
                     f"left {'–' if left is None else f'{left:.2f}'}", fontsize=9)
        ax.set_xlim(0.15, 0.75)
        ax.set_ylim(-0.25, 0.25)
        ax.set_aspect("equal")
        ax.set_xlabel("x (m)")
        ax.set_ylabel("y (m)")
    for ax in axes.flat[len(stats):]:
        ax.axis("off")
    save_panels(fig, "End-effector paths, top view (green success, red collision, grey timeout; pillar and target "
                "of the first episode)", path, dpi=120)


def _refine_start_ok(progress: float) -> bool:
    try:
        refine_start(progress, FINISH_STEPS)
    except ValueError:
        return False
    return True


def run(args: argparse.Namespace) -> int:
    names = [n.strip() for n in args.policies.split(",") if n.strip()]
    if not names or args.episodes < 1:
        raise ValueError("--policies needs at least one name and --episodes must be positive")
    koopman_sim.check_task(args.task)
    if args.mode_states < 0 or args.mode_draws < 2:
        raise ValueError("--mode-states must be >= 0 and --mode-draws at least 2")
    if not (math.isfinite(args.noise_scale) and args.noise_scale > 0):  # as rollout checks it, before loading
        raise ValueError(f"--noise-scale must be positive, got {args.noise_scale}")
    if args.noise_scale != 1.0 and args.update_cards:
        raise ValueError(f"--update-cards records a model's own evaluation, not one at --noise-scale "
                         f"{args.noise_scale}")
    if args.batch_episodes < 1 or (args.batch_episodes > 1 and args.update_cards):
        raise ValueError(f"--batch-episodes must be at least 1, and 1 with --update-cards (a card records the "
                         f"latency of one decision; got {args.batch_episodes})")
    if args.finish_progress is not None and (args.update_cards or not _refine_start_ok(args.finish_progress)):
        raise ValueError(f"--finish-progress must lie in (0, 1) with a step of DDIM-30 left either side, and is a "
                         f"diagnosis --update-cards does not record (got {args.finish_progress})")
    teacher_name = args.teacher or DEFAULT_TEACHER[args.task]
    backend = "torch" if args.finish_progress is not None else args.backend
    loaded = {n: load_runner(n, backend) for n in names if n not in REFERENCES}
    # The MMD reference needs the PyTorch teacher, also when the teacher itself is evaluated through ONNX.
    evaluated_teacher = loaded.get(teacher_name)
    teacher_runner = (evaluated_teacher if isinstance(evaluated_teacher, TorchRunner)
                      else load_runner(teacher_name, "torch"))
    teacher = teacher_runner.policy
    runners: dict[str, Runner] = {n: loaded[n] if n in loaded else reference_runner(n, args.task, teacher_runner)
                                  for n in names}
    if args.finish_progress is not None:
        runners = {n: TeacherFinishedRunner.of(r, teacher, args.finish_progress)
                   if TeacherFinishedRunner.finishable(r) else r for n, r in runners.items()}
    obs = mmd_observations(args, teacher_runner.n_obs_steps, teacher_runner.horizon)
    reference = teacher_reference(teacher, obs, args.mmd_draws, args.seed)
    results, stats = {}, {}
    for name, runner in runners.items():
        stats[name] = rollout(runner, args.episodes, args.seed, task=args.task, noise_per=args.noise_per,
                              noise_scale=args.noise_scale, batch=args.batch_episodes)
        camera = {"camera": runner.camera, "image_size": list(runner.image_size)} if runner.image_size else {}
        results[name] = {
            "task": args.task,
            "method": runner.method,
            "backend": runner.backend,
            "inputs": "image" if runner.image_size else "state",
            **camera,
            "sampler": runner.sampler,
            **({"noise_scale": args.noise_scale} if args.noise_scale != 1.0 else {}),
            **({"batch_episodes": args.batch_episodes} if args.batch_episodes > 1 else {}),
            **({"finished_by_teacher_from": args.finish_progress} if isinstance(runner, TeacherFinishedRunner) else {}),
            **stats[name].summary(),
            "mmd_to_teacher": None if runner.image_size else mmd_to_teacher(runner, teacher, obs, reference,
                                                                            args.seed + 1),
            "parameters": runner.num_parameters,
        }
    if args.mode_states:
        modes = MODES[args.task]
        count = lambda r: mode_counts(r, args.task, args.mode_states, args.mode_draws, args.mode_seed,  # noqa: E731
                                      args.mode_steps)
        counts = {name: count(runner) for name, runner in runners.items()}
        reference = counts.get(teacher_name)
        if reference is None:
            reference = count(teacher_runner)
        for name in runners:
            results[name]["modes"] = {"seed": args.mode_seed, "max_steps": args.mode_steps,
                                      "reference": teacher_name,
                                      **mode_summary(counts[name], modes, reference)}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    table = markdown_table(results, args.task)
    if args.mode_states:
        table += "\n" + modes_table(results, args.task)
    args.json.with_suffix(".md").write_text(table)
    (plot_pusht if args.task == "pusht" else plot_paths)(stats, args.json.with_suffix(".png"))
    if args.update_cards:
        for name, runner in runners.items():
            if runner.card is not None and runner.card.is_file():
                card = json.loads(runner.card.read_text())
                card["evaluation"] = {"command": args.command_line, "task": args.task, "seed": args.seed,
                                      "noise_per": args.noise_per or NOISE[args.task],
                                      **results[name]}
                runner.card.write_text(json.dumps(card, indent=2) + "\n")
    print(table)
    return 0
