"""``koopman-distill teacher``: train the diffusion teacher on demonstrations."""

from __future__ import annotations

import argparse
import dataclasses

import torch

from koopman_distill.cli import COMMANDS
from koopman_distill.commands.common import add_train_args, config_overrides, finish, train_config
from koopman_distill.contracts import as_config, dataset_contract
from koopman_distill.data import episode_windows
from koopman_distill.images import train_teacher
from koopman_distill.provenance import git_commit
from koopman_distill.train import is_main_process, train
from koopman_policy.checkpoint import save_policy
from koopman_policy.teacher import DiffusionConfig, DiffusionPolicy
from koopman_sim.dataset import load_dataset


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("teacher", help=COMMANDS["teacher"])
    p.add_argument("--data", required=True, help="demonstrations written by `koopman-sim collect`")
    add_train_args(p, steps=8000, lr=1e-3)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    demos = load_dataset(args.data)
    if demos.images is not None:  # camera demonstrations: the image teacher (koopman_distill.images)
        return train_teacher(args, demos)
    base = DiffusionConfig(
        obs_dim=demos.obs.shape[1],
        action_dim=demos.action.shape[1],
        control_dt=float(demos.control_dt),
        obs_names=list(demos.obs_names),
        action_names=list(demos.action_names),
        contract=as_config(dataset_contract(demos)),
    )
    config = dataclasses.replace(base, **config_overrides(args.set, dataclasses.asdict(base)))
    tensors = episode_windows(demos.obs, demos.action, demos.episode_ends, config.horizon, config.n_obs_steps)
    torch.manual_seed(args.seed)
    policy = DiffusionPolicy(config)
    policy.fit_normalizers(tensors["obs"], tensors["action"])
    commit = git_commit()  # before training writes checkpoints into --out, which may be tracked
    trained, metrics = train(policy, tensors, train_config(args), args.out, args.resume, desc="teacher")
    card = {
        "name": args.out.name,
        "method": "teacher",
        "command": args.command_line,
        "data": {"path": str(args.data), "sha256": demos.sha256, "samples": len(tensors["obs"]),
                 "episodes": len(demos.episode_ends)},
        "commit": commit,
        "parameters": trained.num_parameters(),
        "training": metrics,
    }
    if not is_main_process():
        return 0
    save_policy(trained, args.out, extra={"card": card})
    finish(args.out, card)
    print(f"teacher: {trained.num_parameters()} parameters, final loss {metrics['final_loss']:.4f}, "
          f"{metrics['train_seconds']} s -> {args.out}")
    return 0
