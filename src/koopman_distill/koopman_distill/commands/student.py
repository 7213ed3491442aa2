"""``koopman-distill student --method M``: distil the teacher into a one-step student."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import torch

from koopman_distill.cli import COMMANDS
from koopman_distill.commands.common import add_train_args, config_overrides, finish, train_config
from koopman_distill.data import TeacherData, episode_windows, file_sha256, read_teacher_data
from koopman_distill.images import train_student
from koopman_distill.provenance import git_commit
from koopman_distill.train import is_main_process, train
from koopman_policy.base import BasePolicy, PolicyConfig
from koopman_policy.checkpoint import WEIGHTS, load_extra, load_policy, save_policy
from koopman_policy.registry import STUDENT_METHODS, policy_class
from koopman_policy.students.kdm import KoopmanStudent
from koopman_policy.students.oneflow import OneFlowPolicy
from koopman_policy.teacher import DiffusionPolicy
from koopman_sim.dataset import load_dataset

# The OOD threshold is this multiple of the 99.9th percentile of the in-distribution latent residual:
# a margin so that ordinary observations never trip the teacher fallback, while inputs off the training
# distribution (measured in the evaluation) do.
OOD_MARGIN = 2.0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("student", help=COMMANDS["student"])
    p.add_argument("--method", required=True, choices=STUDENT_METHODS)
    p.add_argument("--teacher", required=True, type=Path, help="teacher checkpoint directory")
    p.add_argument("--teacher-data", required=True, type=Path, help="file from `koopman-distill teacher-data`")
    p.add_argument("--demos", type=Path,
                   help="the teacher's demonstration dataset, for a student with a demonstration loss "
                        "(oneflow's demo_loss_weight)")
    p.add_argument("--init", type=Path,
                   help="continue from this trained student of the same method (its config, --set on top)")
    add_train_args(p, steps=6000, lr=1e-3)
    p.set_defaults(func=run)


@torch.no_grad()
def ood_threshold(policy: KoopmanStudent, obs: torch.Tensor, noise: torch.Tensor) -> float:
    obs_n = policy.encode_obs(obs)
    scores = torch.cat([policy.sample_normalized(obs_n[i : i + 4096], noise[i : i + 4096])[1]
                        for i in range(0, len(obs), 4096)])
    return float(OOD_MARGIN * np.quantile(scores.numpy(), 0.999))


def demo_windows(args: argparse.Namespace, config: PolicyConfig, data: TeacherData
                 ) -> tuple[dict[str, torch.Tensor] | None, dict | None]:
    """The demonstration windows a student with a demonstration loss trains on, and their card entry; they
    must be the data the teacher (and so the teacher data) was made from."""
    wanted = getattr(config, "demo_loss_weight", 0.0) > 0
    if args.demos is None:
        if wanted:
            raise ValueError(f"{args.method}: demo_loss_weight > 0 needs --demos (the teacher's dataset)")
        return None, None
    if not wanted:
        raise ValueError(f"--demos is read only by a student with demo_loss_weight > 0 ({args.method} has none)")
    demos = load_dataset(args.demos)
    data.check_dataset(demos.sha256, args.demos, args.teacher_data)
    if (demos.obs.shape[1], demos.action.shape[1]) != (config.obs_dim, config.action_dim):
        raise ValueError(f"{args.demos} holds obs/action of width {demos.obs.shape[1]}/{demos.action.shape[1]}, "
                         f"the teacher takes {config.obs_dim}/{config.action_dim}")
    windows = episode_windows(demos.obs, demos.action, demos.episode_ends, config.horizon, config.n_obs_steps)
    return windows, {"path": str(args.demos), "sha256": demos.sha256, "windows": len(windows["obs"])}


def attach_refinement(policy: BasePolicy, init: BasePolicy | None, teacher: BasePolicy, data: TeacherData
                      ) -> dict | None:
    """Give a refining student (oneflow's refine_steps > 0) its source, the --init student, and the noise level
    the teacher's trajectories have at refine_progress; returns the card's entry."""
    if not isinstance(policy, OneFlowPolicy) or policy.config.refine_steps <= 0:
        return None
    config = policy.config
    if init is None:
        raise ValueError("oneflow: refine_steps > 0 needs --init, the trained student whose refined chunks it learns")
    if not isinstance(teacher, DiffusionPolicy):
        raise ValueError(f"refine_steps > 0 reads the noise schedule of the diffusion teacher, not a {teacher.method}")
    steps = len(data.timesteps) - 1
    index = config.refine_progress * steps
    if abs(index - round(index)) > 1e-6:
        raise ValueError(f"refine_progress {config.refine_progress} is not a point of the teacher data's "
                         f"{steps}-step trajectories (a multiple of 1/{steps})")
    t = int(data.timesteps[round(index)])
    alpha_bar = float(teacher.ddpm.alphas_cumprod[t])
    policy.attach_refinement_source(init, alpha_bar)
    return {"steps": config.refine_steps, "progress": config.refine_progress, "diffusion_step": t,
            "alpha_bar": alpha_bar}


def init_provenance(path: Path) -> dict:
    """What a continued student started from: its weights' hash and its own card's command and commit."""
    card = load_extra(path).get("card", {})
    return {"path": str(path), "sha256": file_sha256(path / WEIGHTS), "command": card.get("command", ""),
            "commit": card.get("commit", ""), "training": card.get("training", {})}


def run(args: argparse.Namespace) -> int:
    teacher = load_policy(args.teacher)
    data = read_teacher_data(args.teacher_data)
    if getattr(teacher, "image_inputs", False):  # the camera teacher (koopman_distill.images)
        return train_student(args, teacher, data, OOD_MARGIN)
    cls = policy_class(args.method)
    if "refined_by" in data.attrs and not issubclass(cls, KoopmanStudent):
        raise ValueError(f"{args.teacher_data} holds refined end points (teacher-data --refine), which only the "
                         f"Koopman students (kdm, dkoopman) are trained on, not {args.method}")
    t = teacher.config
    base = cls.config_class(
        obs_dim=t.obs_dim, action_dim=t.action_dim, horizon=t.horizon, n_obs_steps=t.n_obs_steps,
        n_action_steps=t.n_action_steps, control_dt=t.control_dt, obs_names=t.obs_names,
        action_names=t.action_names, contract=t.contract,
    )
    init = load_policy(args.init) if args.init else None
    if init is not None:
        if init.method != args.method:
            raise ValueError(f"--init {args.init} is a {init.method} student, not {args.method}")
        base = init.config
    config = dataclasses.replace(base, **config_overrides(args.set, dataclasses.asdict(base)))
    if tuple(data.states.shape[2:]) != (config.horizon, config.action_dim):
        raise ValueError(f"teacher data chunks {tuple(data.states.shape[2:])} do not match the teacher's "
                         f"(horizon, action_dim) = ({config.horizon}, {config.action_dim})")
    torch.manual_seed(args.seed)
    policy = cls(config)
    policy.copy_normalizers(teacher)
    if init is not None:
        try:
            policy.load_state_dict(init.state_dict())
        except RuntimeError as err:
            raise ValueError(f"--init {args.init}: its weights do not fit this config ({err})") from None
    initialised = init is None and policy.init_from_teacher(teacher)
    refinement = attach_refinement(policy, init, teacher, data)
    demos, demos_card = demo_windows(args, config, data)
    init_card = init_provenance(args.init) if args.init else None  # before --out, which may be --init, changes
    commit = git_commit()  # before training writes checkpoints into --out, which may be tracked
    trained, metrics = train(policy, data.tensors(), train_config(args), args.out, args.resume,
                             desc=args.method, demos=demos)
    extra: dict = {}
    if isinstance(trained, KoopmanStudent) and trained.has_ood_score:
        extra["ood_threshold"] = ood_threshold(trained, data.obs, data.states[:, 0])
    card = {
        "name": args.out.name,
        "method": args.method,
        "command": args.command_line,
        "teacher": {"path": str(args.teacher), "sha256": data.attrs.get("teacher_sha256", "")},
        "data": {"path": str(args.teacher_data), "sha256": data.sha256,
                 "dataset_sha256": data.attrs.get("dataset_sha256", ""),
                 "visited_sha256": data.attrs.get("visited_sha256", ""), "trajectories": len(data.obs),
                 **{k: data.attrs[k] for k in ("refined_by", "refined_by_sha256", "refine_progress")
                    if k in data.attrs}},
        "commit": commit,
        "parameters": trained.num_parameters(),
        "initialised_from_teacher": initialised,
        **({"initialised_from": init_card} if init_card else {}),
        **({"demos": demos_card} if demos_card else {}),
        **({"refinement": refinement} if refinement else {}),
        "training": metrics,
        **extra,
    }
    if not is_main_process():
        return 0
    save_policy(trained, args.out, extra={"card": card, **extra})
    finish(args.out, card)
    print(f"{args.method}: {trained.num_parameters()} parameters, final loss {metrics['final_loss']:.4f}, "
          f"{metrics['train_seconds']} s -> {args.out}")
    return 0
