"""``koopman-distill fidelity``: how closely each student reproduces the teacher's map from noise to chunk.

A one-step student is trained to send the teacher's noise ``x_T`` to the teacher's chunk ``x_0`` for the same
observation. Closed-loop coverage says whether it works; this says how it fails. At observation histories
the teacher met (a ``visit`` file, ideally from seeds nothing was trained on) and ``--draws`` noises each:

- ``paired``: mean squared distance between the student's and the teacher's chunk for the same noise;
- ``to_mean``: the same between the two chunks averaged over the noises (the observation's mean push);
- ``spread``: the chunks' variance over the noises at one observation, as a fraction of the teacher's.

Chunks are compared in the teacher's normalised action units ([-1, 1] over the training range). A student
that has learned the map has ``paired`` near 0 and ``spread`` near 1; one that ignores the noise has ``spread``
0 and ``paired = to_mean + teacher_spread`` (the teacher's own variance over the noises): it can at best
average the pushes.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from koopman_distill.cli import COMMANDS, UserError
from koopman_distill.data import read_visited
from koopman_distill.runners import Runner, load_runner


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fidelity", help=COMMANDS["fidelity"], description=__doc__.splitlines()[0],
                       epilog="example: koopman-distill fidelity --teacher pusht_teacher --policies "
                              "pusht_dkoopman,pusht_oneflow --visited data/pusht_visited_heldout.h5 "
                              "--json results/fidelity_pusht.json")
    p.add_argument("--teacher", required=True, help="the teacher (its ONNX sampler is the reference)")
    p.add_argument("--policies", required=True, help="comma-separated students: catalogue names or paths")
    p.add_argument("--visited", required=True, type=Path, help="observation histories (koopman-distill visit)")
    p.add_argument("--observations", type=int, default=256, help="histories drawn from the file")
    p.add_argument("--draws", type=int, default=8, help="noises per history")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", required=True, type=Path, help="results file")
    p.set_defaults(func=run)


def _chunks(runner: Runner, obs: np.ndarray, noise: np.ndarray, low: np.ndarray, high: np.ndarray,
            progress: bool = True) -> np.ndarray:
    """(M, K, H, Da) chunks of ``runner`` in normalised units for histories ``obs`` (M, To, Do) and noises
    ``noise`` (M, K, H, Da)."""
    out = np.empty(noise.shape, np.float64)
    for i in tqdm(range(obs.shape[0]), desc=runner.name, disable=not progress, dynamic_ncols=True):
        for k in range(noise.shape[1]):
            out[i, k] = runner.predict_action(obs[i], noise[i, k])
    return 2.0 * (out - low) / (high - low) - 1.0


def compare(student: np.ndarray, teacher: np.ndarray) -> dict[str, float]:
    """The three figures of the module docstring for chunks (M, K, H, Da) of the same histories and noises."""
    def msd(a: np.ndarray, b: np.ndarray) -> float:
        return float(((a - b) ** 2).sum(axis=(-2, -1)).mean())

    t_spread = teacher.var(axis=1).sum(axis=(-2, -1))
    s_spread = student.var(axis=1).sum(axis=(-2, -1))
    return {"paired": msd(student, teacher), "to_mean": msd(student.mean(1), teacher.mean(1)),
            "spread": float(s_spread.mean() / t_spread.mean()), "teacher_spread": float(t_spread.mean())}


def run(args: argparse.Namespace) -> int:
    if args.observations < 1 or args.draws < 2:
        raise UserError("--observations must be >= 1 and --draws >= 2 (a spread needs two noises)")
    teacher = load_runner(args.teacher, "onnx")
    runners = [load_runner(n.strip(), "onnx") for n in args.policies.split(",") if n.strip()]
    for r in runners:
        if (r.horizon, r.action_dim, r.n_obs_steps, r.obs_names) != (
                teacher.horizon, teacher.action_dim, teacher.n_obs_steps, teacher.obs_names):
            raise UserError(f"{r.name} does not share the teacher's observation and chunk layout")
    histories = read_visited(args.visited, teacher.n_obs_steps, teacher.obs_dim).numpy()
    rng = np.random.default_rng(args.seed)
    pick = rng.choice(len(histories), size=min(args.observations, len(histories)), replace=False)
    obs = histories[np.sort(pick)]
    noise = rng.standard_normal((len(obs), args.draws, teacher.horizon, teacher.action_dim)).astype(np.float32)
    meta = teacher.model.metadata  # type: ignore[attr-defined]
    low, high = np.asarray(meta.action_low, np.float64), np.asarray(meta.action_high, np.float64)
    reference = _chunks(teacher, obs, noise, low, high)
    rows = {r.name: compare(_chunks(r, obs, noise, low, high), reference) | {"method": r.method} for r in runners}
    result = {"command": args.command_line, "teacher": teacher.name, "sampler": teacher.sampler,
              "visited": str(args.visited), "observations": len(obs), "draws": args.draws, "seed": args.seed,
              "units": "teacher-normalised actions, summed over the chunk", "policies": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"fidelity to {teacher.name} ({teacher.sampler}), {len(obs)} histories x {args.draws} noises; the "
          f"teacher's own spread {next(iter(rows.values()))['teacher_spread']:.4f}" if rows else "")
    for name, row in rows.items():
        print(f"  {name:24s} paired {row['paired']:.4f}  to_mean {row['to_mean']:.4f}  spread {row['spread']:.3f}")
    return 0
