"""``koopman-distill teacher-data``: record the teacher's sampling trajectories for distillation.

For each observation history of the demonstrations and each of ``--draws`` noise samples, the teacher's
deterministic DDIM sampler (eta = 0, a discretisation of its probability-flow ODE) runs ``--steps`` steps;
every intermediate state is stored, since the flow and consistency students train on them. ``--visited``
adds the observation histories of closed-loop rollouts (``koopman-distill visit``) to the demonstrations'.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm import tqdm

from koopman_distill.cli import COMMANDS
from koopman_distill.data import episode_windows, file_sha256, read_visited, write_teacher_data
from koopman_distill.images import record_teacher_data
from koopman_policy.checkpoint import load_policy
from koopman_policy.teacher import DiffusionPolicy
from koopman_sim.dataset import load_dataset


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("teacher-data", help=COMMANDS["teacher-data"])
    p.add_argument("--teacher", required=True, type=Path, help="teacher checkpoint directory")
    p.add_argument("--data", required=True, help="demonstrations the teacher was trained on")
    p.add_argument("--visited", nargs="*", type=Path, default=[],
                   help="visited-state files (koopman-distill visit) whose histories are labelled too")
    p.add_argument("--out", required=True, type=Path, help="HDF5 file to write")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps per trajectory (default 10)")
    p.add_argument("--draws", type=int, default=4, help="noise samples per observation (default 4)")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)


@torch.no_grad()
def run(args: argparse.Namespace) -> int:
    teacher = load_policy(args.teacher)
    if not isinstance(teacher, DiffusionPolicy):
        raise ValueError(f"{args.teacher} holds a {teacher.method!r} policy, not the diffusion teacher")
    if getattr(teacher, "image_inputs", False):  # the camera teacher (koopman_distill.images)
        return record_teacher_data(args, teacher)
    if args.steps < 1 or args.draws < 1:
        raise ValueError("--steps and --draws must be positive")
    c = teacher.config
    demos = load_dataset(args.data)
    obs = episode_windows(demos.obs, demos.action, demos.episode_ends, c.horizon, c.n_obs_steps)["obs"]
    visited = [read_visited(path, c.n_obs_steps, c.obs_dim) for path in args.visited]
    obs = torch.cat([obs, *visited]).repeat(args.draws, 1, 1)
    gen = torch.Generator().manual_seed(args.seed)
    noise = torch.randn((len(obs), c.horizon, c.action_dim), generator=gen)
    chunks, timesteps = [], None
    for i in tqdm(range(0, len(obs), args.batch_size), desc="teacher-data", dynamic_ncols=True):
        o, x = obs[i : i + args.batch_size], noise[i : i + args.batch_size]
        traj = teacher.ddim_trajectory(teacher.encode_obs(o), x, args.steps)
        chunks.append(traj.states)
        timesteps = traj.timesteps
    states = torch.cat(chunks)
    write_teacher_data(
        args.out, obs, states, timesteps,
        teacher_sha256=file_sha256(args.teacher / "model.safetensors"),
        dataset_sha256=demos.sha256, visited_sha256=",".join(file_sha256(p) for p in args.visited),
        steps=args.steps, draws=args.draws, seed=args.seed,
    )
    extra = f" ({sum(len(v) for v in visited)} visited histories per draw)" if visited else ""
    print(f"teacher-data: {len(obs)} trajectories of {args.steps} DDIM steps{extra} -> {args.out}")
    return 0
