"""``koopman-distill visit``: record the observation histories a policy meets in closed loop.

The students are distilled on teacher trajectories, but the demonstrations alone cover only the expert's
states; in closed loop the teacher, and a student more so, drift to states the expert never reached.
Labelling visited states with the teacher (``teacher-data --visited``) is the offline form of DAgger: the
teacher, not the expert, gives the labels, so nothing beyond the teacher is learned. Measured on Push-T
(width-256 oneflow, DDIM-10 labels, 200 teacher episodes added to the demonstrations): the student's chunk
error to the teacher for the same noise, on 4 episodes of its own, fell from 0.0042 to 0.0019 (normalised
units; two teacher noises differ by 0.0071), yet its mean max coverage stayed where it was (0.298, 0.291):
the data is cheap and kept, the gains came from the sampler distilled and the width (see the Makefile).
Rollout seeds should differ from the evaluation's (``eval --seed``, default 1000).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import koopman_sim
from koopman_distill.cli import COMMANDS
from koopman_distill.data import write_visited
from koopman_distill.evaluate import rollout
from koopman_distill.runners import load_runner


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("visit", help=COMMANDS["visit"])
    p.add_argument("--policy", required=True, help="name from config/policies.yaml or a checkpoint path")
    p.add_argument("--task", default="gen3_reach_obstacle", help=f"one of {', '.join(koopman_sim.TASKS)}")
    p.add_argument("--episodes", type=int, default=200)
    p.add_argument("--seed", type=int, default=5000, help="task seed of the first episode (keep clear of eval's)")
    p.add_argument("--backend", choices=("auto", "torch", "onnx"), default="auto")
    p.add_argument("--out", required=True, type=Path, help="HDF5 file to write")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.episodes < 1:
        raise ValueError("--episodes must be positive")
    runner = load_runner(args.policy, args.backend)
    stats = rollout(runner, args.episodes, args.seed, task=args.task, keep_histories=True)
    summary = stats.summary()
    results = {k: v for k, v in summary.items() if isinstance(v, float)}
    write_visited(args.out, np.stack(stats.histories), policy=runner.name, task=args.task, seed=args.seed,
                  episodes=args.episodes, command=args.command_line, **results)
    shown = ", ".join(f"{k} {v:.3f}" for k, v in results.items())
    print(f"visit: {len(stats.histories)} histories from {args.episodes} episodes of {runner.name} ({shown}) "
          f"-> {args.out}")
    return 0
