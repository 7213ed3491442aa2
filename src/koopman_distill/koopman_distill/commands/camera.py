"""The camera pipeline's subcommands, one per stage, as the state pipeline's:

``camera-collect`` (expert demonstrations with rendered frames), ``camera-teacher`` (image diffusion
teacher), ``camera-teacher-data`` (its DDIM trajectories), ``camera-student`` (the image dynamic-Koopman
student, encoder initialised from the teacher's), ``camera-eval`` (closed loop with frames rendered at the
policy rate; optionally the state policies on the same seeds, and the results recorded in the model cards).
Export is the common ``koopman-distill export``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from koopman_distill.camera import (
    AUX_NAMES,
    DEFAULT_CAMERA,
    DEFAULT_SIZE,
    FrameWindows,
    ImageRunner,
    OnnxImageRunner,
    TorchImageRunner,
    camera_rollout,
    collect_camera,
    image_teacher_data,
    load_camera_demos,
    read_frame_index,
)
from koopman_distill.commands.common import add_train_args, config_overrides, finish, train_config
from koopman_distill.data import file_sha256, read_teacher_data
from koopman_distill.provenance import git_commit
from koopman_distill.train import is_main_process, train
from koopman_policy.checkpoint import load_policy, save_policy
from koopman_policy.vision import (
    AUX_KEY,
    IMAGE_KEY,
    KEYPOINTS_KEY,
    STATE_KEY,
    ImageConditioned,
    ImageDiffusionConfig,
    ImageDiffusionPolicy,
    ImageDKoopmanConfig,
    ImageDKoopmanPolicy,
)

# As ``koopman-distill student``: the OOD threshold is this multiple of the in-distribution 99.9th percentile.
OOD_MARGIN = 2.0


def _threads(args: argparse.Namespace) -> None:
    """On a loaded machine one intra-op thread trains faster than two that fight (measured, see the report)."""
    if args.threads:
        torch.set_num_threads(args.threads)


def _command(args: argparse.Namespace) -> str:
    return getattr(args, "command_line", "koopman-distill " + args.command)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("camera-collect", help="expert demonstrations with camera frames for the image policies")
    p.add_argument("--task", default="gen3_reach_obstacle")
    p.add_argument("--episodes", type=int, required=True)
    p.add_argument("--out", type=Path, required=True, help="dataset file to write (HDF5 with /images)")
    p.add_argument("--seed", type=int, default=0, help="env seed of the first episode")
    p.add_argument("--camera", default=DEFAULT_CAMERA, help=f"scene camera to render (default {DEFAULT_CAMERA})")
    p.add_argument("--size", type=int, nargs=2, default=(DEFAULT_SIZE, DEFAULT_SIZE), metavar=("H", "W"))
    p.add_argument("--json", type=Path, help="write the collection summary here")
    p.set_defaults(func=run_collect)

    p = sub.add_parser("camera-teacher", help="train the image diffusion teacher on camera demonstrations")
    p.add_argument("--data", type=Path, required=True, help="dataset from `koopman-distill camera-collect`")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--aux-loss-weight", type=float, default=1.0,
                   help="weight of the encoder's training-only read-out of target and pillar (0: none)")
    add_train_args(p, steps=3000, lr=1e-3, batch_size=64)
    p.set_defaults(func=run_teacher)

    p = sub.add_parser("camera-teacher-data", help="record the image teacher's DDIM trajectories")
    p.add_argument("--teacher", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="the camera demonstrations the teacher was trained on")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=10, help="DDIM steps per trajectory (default 10)")
    p.add_argument("--draws", type=int, default=4, help="noise samples per observation (default 4)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(func=run_teacher_data)

    p = sub.add_parser("camera-student", help="distil the image teacher into the image dynamic-Koopman student")
    p.add_argument("--teacher", type=Path, required=True)
    p.add_argument("--teacher-data", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="the camera demonstrations (frames)")
    p.add_argument("--threads", type=int, default=0)
    add_train_args(p, steps=8000, lr=1e-3, batch_size=256)
    p.set_defaults(func=run_student)

    p = sub.add_parser("camera-eval", help="closed-loop evaluation of image policies (frames rendered at 10 Hz)")
    p.add_argument("--policies", required=True, help="comma-separated catalogue names or checkpoint directories")
    p.add_argument("--state-policies", default="", help="state policies to run on the same seeds, for comparison")
    p.add_argument("--episodes", type=int, default=50)
    p.add_argument("--seed", type=int, default=1000, help="task seed of the first episode")
    p.add_argument("--backend", choices=("auto", "torch", "onnx"), default="auto")
    p.add_argument("--json", type=Path, required=True, help="results; a markdown table is written beside it")
    p.add_argument("--record", action="store_true", help="add the results to each image policy's card.json")
    p.add_argument("--threads", type=int, default=0)
    p.set_defaults(func=run_eval)


# -- collect ---------------------------------------------------------------------------------------------------
def run_collect(args: argparse.Namespace) -> int:
    summary = collect_camera(args.task, args.episodes, args.out, args.seed, args.camera, tuple(args.size))
    summary["command"] = _command(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"camera-collect: {summary['episodes_written']}/{args.episodes} episodes, {summary['steps_written']} "
          f"frames ({args.camera}, {args.size[0]}x{args.size[1]}), render p50 "
          f"{summary['render_ms_per_frame']['p50']:.1f} ms/frame, {summary['wall_seconds']} s -> {args.out}")
    return 0


# -- teacher ---------------------------------------------------------------------------------------------------
def run_teacher(args: argparse.Namespace) -> int:
    _threads(args)
    if args.aux_loss_weight < 0:
        raise ValueError("--aux-loss-weight must be >= 0")
    aux = AUX_NAMES if args.aux_loss_weight > 0 else ()
    defaults = ImageDiffusionConfig()
    demos = load_camera_demos(args.data, defaults.horizon, defaults.n_obs_steps, aux)
    base = ImageDiffusionConfig(
        obs_dim=len(demos.state_names), action_dim=len(demos.action_names), control_dt=demos.control_dt,
        obs_names=demos.state_names, action_names=demos.action_names, camera=demos.camera,
        image_height=demos.image_size[0], image_width=demos.image_size[1], aux_names=list(aux),
        aux_loss_weight=args.aux_loss_weight,
    )
    config = dataclasses.replace(base, **config_overrides(args.set, dataclasses.asdict(base)))
    if (config.horizon, config.n_obs_steps) != (defaults.horizon, defaults.n_obs_steps):
        demos = load_camera_demos(args.data, config.horizon, config.n_obs_steps, aux)
    if (config.image_height, config.image_width) != demos.image_size:
        raise ValueError(f"the frames are {demos.image_size}, the config asks for "
                         f"{(config.image_height, config.image_width)}: collect at the policy's size")
    torch.manual_seed(args.seed)
    policy = ImageDiffusionPolicy(config)
    policy.fit_normalizers(demos.tensors[STATE_KEY], demos.tensors["action"])
    if aux:
        policy.fit_aux(demos.tensors[AUX_KEY])
    commit = git_commit()  # before training writes checkpoints into --out, which may be tracked
    trained, metrics = train(policy, demos.tensors, train_config(args), args.out, args.resume,
                             desc="camera-teacher")
    card = {
        **_card_head(args, trained, config),
        "data": {"path": str(args.data), "sha256": demos.sha256, "samples": len(demos.tensors[STATE_KEY]),
                 "episodes": demos.episodes},
        "commit": commit,
        "parameters": trained.num_parameters(),
        "training": {**metrics, "threads": torch.get_num_threads()},
    }
    if not is_main_process():
        return 0
    save_policy(trained, args.out, extra={"card": card})
    finish(args.out, card)
    print(f"camera-teacher: {trained.num_parameters()} parameters, final loss {metrics['final_loss']:.4f}, "
          f"{metrics['train_seconds']} s -> {args.out}")
    return 0


def _card_head(args: argparse.Namespace, policy: Any, config: Any) -> dict[str, Any]:
    """The model card fields every camera policy starts with: what it is and which frames it sees."""
    return {"name": args.out.name, "method": policy.method, "command": _command(args), "inputs": "image",
            "camera": config.camera, "image_size": [config.image_height, config.image_width]}


def _load_image_policy(path: Path, cls: type) -> Any:
    policy = load_policy(path)
    if not isinstance(policy, cls):
        raise ValueError(f"{path} holds a {policy.method!r} policy, not {cls.method!r}")
    return policy


# -- teacher data ----------------------------------------------------------------------------------------------
def run_teacher_data(args: argparse.Namespace) -> int:
    _threads(args)
    teacher: ImageDiffusionPolicy = _load_image_policy(args.teacher, ImageDiffusionPolicy)
    c = teacher.config
    demos = load_camera_demos(args.data, c.horizon, c.n_obs_steps)
    began = time.perf_counter()
    n = image_teacher_data(
        teacher, demos, args.out, args.steps, args.draws, args.seed, args.batch_size,
        teacher_sha256=file_sha256(args.teacher / "model.safetensors"), dataset_sha256=demos.sha256,
        dataset_path=str(args.data),
    )
    print(f"camera-teacher-data: {n} trajectories of {args.steps} DDIM steps, "
          f"{time.perf_counter() - began:.0f} s -> {args.out}")
    return 0


# -- student ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def ood_threshold(policy: ImageDKoopmanPolicy, tensors: dict[str, Any], noise: torch.Tensor,
                  batch: int = 1024) -> float:
    """``OOD_MARGIN`` times the 99.9th percentile of the latent residual over the training windows."""
    scores = []
    keys = [k for k in (IMAGE_KEY, KEYPOINTS_KEY, STATE_KEY) if k in tensors]
    for i in range(0, len(noise), batch):
        obs = {k: tensors[k][i : i + batch] for k in keys}
        scores.append(policy.sample_normalized(policy.encode_obs(obs), noise[i : i + batch])[1])
    return float(OOD_MARGIN * np.quantile(torch.cat(scores).numpy(), 0.999))


def run_student(args: argparse.Namespace) -> int:
    _threads(args)
    teacher: ImageDiffusionPolicy = _load_image_policy(args.teacher, ImageDiffusionPolicy)
    data = read_teacher_data(args.teacher_data)
    frame_index = read_frame_index(args.teacher_data)
    t = teacher.config
    demos = load_camera_demos(args.data, t.horizon, t.n_obs_steps, t.aux_names)
    data.check_dataset(demos.sha256, args.data, args.teacher_data)
    shared = ("obs_dim", "action_dim", "horizon", "n_obs_steps", "n_action_steps", "control_dt", "obs_names",
              "action_names", "image_height", "image_width", "camera", "vision_dims", "keypoints", "aux_names",
              "aux_loss_weight")
    # The encoder stays the teacher's (freeze_vision): distilling with it fine-tuned reached the same closed-loop
    # success at equal steps (0.18 vs 0.18 over 50 episodes) and made each step several times dearer, since
    # frozen keypoints are computed once per frame (below) instead of per sample and step.
    base = ImageDKoopmanConfig(**{k: getattr(t, k) for k in shared}, freeze_vision=True)
    config = dataclasses.replace(base, **config_overrides(args.set, dataclasses.asdict(base)))
    if tuple(data.states.shape[2:]) != (config.horizon, config.action_dim) or len(frame_index) != len(data.obs):
        raise ValueError(f"teacher data {tuple(data.states.shape)} / frame index {tuple(frame_index.shape)} do not "
                         "match the teacher")
    torch.manual_seed(args.seed)
    policy = ImageDKoopmanPolicy(config)
    policy.copy_normalizers(teacher)
    policy.init_vision_from(teacher)
    frames: FrameWindows = demos.tensors[IMAGE_KEY]
    if config.freeze_vision:
        store = policy.encode_frames(frames.frames)
        tensors = {KEYPOINTS_KEY: FrameWindows(store, frame_index), STATE_KEY: data.obs, "states": data.states}
    else:
        tensors = {IMAGE_KEY: FrameWindows(frames.frames, frame_index), STATE_KEY: data.obs, "states": data.states}
    if demos.aux_table is not None:
        tensors[AUX_KEY] = demos.aux_table[frame_index]
    commit = git_commit()  # before training writes checkpoints into --out, which may be tracked
    trained, metrics = train(policy, tensors, train_config(args), args.out, args.resume, desc="camera-student")
    threshold = ood_threshold(trained, tensors, data.states[:, 0])
    card = {
        **_card_head(args, trained, config),
        "teacher": {"path": str(args.teacher), "sha256": data.attrs.get("teacher_sha256", "")},
        "data": {"path": str(args.teacher_data), "sha256": data.sha256, "dataset_path": str(args.data),
                 "dataset_sha256": demos.sha256, "trajectories": len(data.obs)},
        "commit": commit,
        "parameters": trained.num_parameters(),
        "training": {**metrics, "threads": torch.get_num_threads()},
        "ood_threshold": threshold,
    }
    if not is_main_process():
        return 0
    save_policy(trained, args.out, extra={"card": card, "ood_threshold": threshold})
    finish(args.out, card)
    print(f"camera-student: {trained.num_parameters()} parameters, final loss {metrics['final_loss']:.4f}, "
          f"{metrics['train_seconds']} s, OOD threshold {threshold:.4g} -> {args.out}")
    return 0


# -- eval ------------------------------------------------------------------------------------------------------
def load_image_runner(name_or_path: str, backend: str = "auto") -> tuple[ImageRunner, Path | None]:
    """A catalogue name or checkpoint directory -> runner and card.

    ``auto`` runs the ONNX file when there is one, the teacher's too: its ``policy.onnx`` is DDIM-10, the
    sampler whose trajectories the student distils, where the checkpoint's DDPM-100 would cost 100 U-Net
    calls per chunk.
    """
    from koopman_policy.catalog import resolve_policy

    entry = resolve_policy(name_or_path)
    policy = load_policy(entry.checkpoint) if entry.checkpoint else None
    if policy is not None and not isinstance(policy, ImageConditioned):
        raise ValueError(f"{name_or_path!r} is a {policy.method!r} policy, not an image policy")
    onnx = entry.onnx if entry.onnx is not None and entry.onnx.is_file() else None
    use_onnx = backend == "onnx" or (backend == "auto" and onnx is not None)
    if use_onnx:
        if onnx is None:
            raise FileNotFoundError(f"policy {entry.name!r} has no ONNX file")
        params = policy.num_parameters() if policy is not None else 0
        return OnnxImageRunner(entry.name, onnx, params), entry.card
    if policy is None:
        raise FileNotFoundError(f"policy {entry.name!r} has no checkpoint")
    return TorchImageRunner(entry.name, policy), entry.card


def markdown_table(results: dict[str, dict]) -> str:
    lines = ["| policy | inputs | method | backend | success | collision | left fraction | latency p50 / p99 (ms) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        left = "–" if r["left_fraction"] is None else f"{r['left_fraction']:.2f}"
        lines.append(f"| {name} | {r['inputs']} | {r['method']} | {r['backend']} | {r['success_rate']:.2f} | "
                     f"{r['collision_rate']:.2f} | {left} | {r['latency_ms']['p50']:.2f} / "
                     f"{r['latency_ms']['p99']:.2f} |")
    return "\n".join(lines) + "\n"


def run_eval(args: argparse.Namespace) -> int:
    from koopman_distill.evaluate import rollout
    from koopman_distill.runners import load_runner

    _threads(args)
    names = [n.strip() for n in args.policies.split(",") if n.strip()]
    state_names = [n.strip() for n in args.state_policies.split(",") if n.strip()]
    if not names or args.episodes < 1:
        raise ValueError("--policies needs at least one name and --episodes must be positive")
    runners = {n: load_image_runner(n, args.backend) for n in names}
    results: dict[str, dict] = {}
    for name, (runner, card) in runners.items():
        began = time.perf_counter()
        stats, render_ms = camera_rollout(runner, args.episodes, args.seed)
        results[name] = {
            "inputs": "image", "method": runner.method, "backend": runner.backend, "sampler": runner.sampler,
            **stats.summary(),
            "camera": runner.camera, "image_size": list(runner.image_size), "seed": args.seed,
            "render_ms_per_frame": {"p50": float(np.median(render_ms)), "p99": float(np.percentile(render_ms, 99))},
            "wall_seconds": round(time.perf_counter() - began, 1), "parameters": runner.num_parameters,
        }
        if args.record and card is not None and card.is_file():
            data = json.loads(card.read_text())
            data["evaluation"] = {"command": _command(args), **results[name]}
            card.write_text(json.dumps(data, indent=2) + "\n")
    for name in state_names:
        runner = load_runner(name)
        stats = rollout(runner, args.episodes, args.seed)
        results[name] = {"inputs": "state", "method": runner.method, "backend": runner.backend, **stats.summary(),
                         "seed": args.seed, "parameters": runner.num_parameters}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    table = markdown_table(results)
    args.json.with_suffix(".md").write_text(table)
    print(table)
    return 0
