"""The camera policies' side of the shared training commands: what differs when the demonstrations have frames.

``koopman-distill teacher`` trains the image teacher (``teacher_image``) when its dataset has ``/images``
(``koopman-sim collect --camera NAME``), ``teacher-data`` records that teacher's DDIM trajectories with the frame
rows each window sees, ``student`` distils its image dynamic-Koopman student (``dkoopman_image``); collection,
export, evaluation, benchmark and serving are the state policies' own.

A camera policy observes the joint state and the frames (its contract: the task's joint features plus the
camera's image feature, ``koopman_policy.contract.camera_contract``), never the target and pillar: the encoder
learns to see them, helped during training only by a read-out of ``AUX_NAMES`` from its keypoints
(``koopman_policy.vision``; ``--set aux_loss_weight=0`` trains without). The student keeps the teacher's encoder
(``freeze_vision``): distilling with it fine-tuned reached the same closed-loop success at equal steps (0.18 vs
0.18 over 50 episodes) and made each step several times dearer, since frozen keypoints are computed once per
frame instead of per sample and step.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from koopman_distill.commands.common import config_overrides, finish, train_config
from koopman_distill.contracts import as_config, dataset_contract
from koopman_distill.data import (
    FrameWindows,
    TeacherData,
    episode_windows,
    file_sha256,
    frame_index_windows,
    write_teacher_data,
)
from koopman_distill.provenance import git_commit
from koopman_distill.train import is_main_process, train
from koopman_policy.checkpoint import WEIGHTS, save_policy
from koopman_policy.contract import camera_contract
from koopman_policy.vision import (
    AUX_KEY,
    IMAGE_KEY,
    KEYPOINTS_KEY,
    STATE_KEY,
    ImageDiffusionConfig,
    ImageDiffusionPolicy,
    ImageDKoopmanConfig,
    ImageDKoopmanPolicy,
)
from koopman_sim.dataset import DemoDataset, load_dataset

#: Training-only read-out targets of the image encoder (``koopman_policy.vision.VisionFields``): what the camera
#: must reveal, since the policy is not given it. The pillar's height is fixed by the task.
AUX_NAMES = ("target_x", "target_y", "target_z", "pillar_x", "pillar_y")


@dataclass
class CameraDemos:
    """Demonstrations as image-policy training tensors."""

    tensors: dict[str, Any]  # image (FrameWindows), state (N, To, S), action (N, H, Da)[, aux (N, To, A)]
    aux_table: torch.Tensor | None  # (frames, A): the aux values of every frame, for other frame indices


def camera_demos(demos: DemoDataset, state_names: Sequence[str], horizon: int, n_obs_steps: int,
                 aux_names: Sequence[str] = ()) -> CameraDemos:
    """Training windows of a dataset with frames: the ``state_names`` columns, the frames, the ``aux_names``."""
    if demos.images is None:
        raise ValueError(f"{demos.path} has no /images; collect it with koopman-sim collect --camera NAME")
    missing = [n for n in (*state_names, *aux_names) if n not in demos.obs_names]
    if missing:
        raise ValueError(f"{demos.path}: no observation columns {missing}")
    cols = [demos.obs_names.index(n) for n in state_names]
    windows = episode_windows(demos.obs[:, cols], demos.action, demos.episode_ends, horizon, n_obs_steps)
    index = torch.from_numpy(frame_index_windows(demos.episode_ends, n_obs_steps))
    frames = torch.from_numpy(np.ascontiguousarray(demos.images))
    tensors = {IMAGE_KEY: FrameWindows(frames, index), STATE_KEY: windows["obs"], "action": windows["action"]}
    aux_table = None
    if aux_names:
        aux_table = torch.from_numpy(demos.obs[:, [demos.obs_names.index(n) for n in aux_names]].copy())
        tensors[AUX_KEY] = aux_table[index]
    return CameraDemos(tensors, aux_table)


def _card_head(args: argparse.Namespace, method: str, config: Any) -> dict[str, Any]:
    """The model card fields every camera policy starts with: what it is and which frames it sees."""
    return {"name": args.out.name, "method": method, "command": args.command_line, "inputs": "image",
            "camera": config.camera, "image_size": [config.image_height, config.image_width]}


# -- teacher -------------------------------------------------------------------------------------------------
def train_teacher(args: argparse.Namespace, demos: DemoDataset) -> int:
    """``koopman-distill teacher`` on demonstrations with frames."""
    recorded = dataset_contract(demos)
    image = recorded.image
    if image is None:
        raise ValueError(f"{demos.path} has frames but its contract names no camera")
    contract = camera_contract(recorded, image.image, image.topic)
    aux = [n for n in AUX_NAMES if n in demos.obs_names]
    base = ImageDiffusionConfig(
        obs_dim=len(contract.obs_names), action_dim=len(demos.action_names), control_dt=float(demos.control_dt),
        obs_names=list(contract.obs_names), action_names=list(demos.action_names), camera=image.image.camera,
        image_height=image.image.height, image_width=image.image.width, aux_names=aux,
        aux_loss_weight=1.0 if aux else 0.0, contract=as_config(contract),
    )
    config = dataclasses.replace(base, **config_overrides(args.set, dataclasses.asdict(base)))
    if config.aux_loss_weight <= 0:
        config = dataclasses.replace(config, aux_names=[], aux_loss_weight=0.0)
    if (config.image_height, config.image_width) != tuple(demos.images.shape[1:3]):
        raise ValueError(f"the frames are {tuple(demos.images.shape[1:3])}, the config asks for "
                         f"{(config.image_height, config.image_width)}: collect at the policy's size")
    cam = camera_demos(demos, config.obs_names, config.horizon, config.n_obs_steps, config.aux_names)
    torch.manual_seed(args.seed)
    policy = ImageDiffusionPolicy(config)
    policy.fit_normalizers(cam.tensors[STATE_KEY], cam.tensors["action"])
    if config.aux_names:
        policy.fit_aux(cam.tensors[AUX_KEY])
    commit = git_commit()  # before training writes checkpoints into --out, which may be tracked
    trained, metrics = train(policy, cam.tensors, train_config(args), args.out, args.resume, desc="teacher")
    card = {
        **_card_head(args, trained.method, config),
        "data": {"path": str(args.data), "sha256": demos.sha256, "samples": len(cam.tensors[STATE_KEY]),
                 "episodes": demos.n_episodes},
        "commit": commit,
        "parameters": trained.num_parameters(),
        "training": {**metrics, "threads": torch.get_num_threads()},
    }
    if not is_main_process():
        return 0
    save_policy(trained, args.out, extra={"card": card})
    finish(args.out, card)
    print(f"teacher: {trained.num_parameters()} parameters (camera {config.camera}, "
          f"{config.image_height}x{config.image_width}), final loss {metrics['final_loss']:.4f}, "
          f"{metrics['train_seconds']} s -> {args.out}")
    return 0


# -- teacher data --------------------------------------------------------------------------------------------
@torch.no_grad()
def record_teacher_data(args: argparse.Namespace, teacher: ImageDiffusionPolicy) -> int:
    """``koopman-distill teacher-data`` for the image teacher: ``draws`` DDIM trajectories per window, each
    window's frames encoded once and its conditioning repeated over the draws (the CNN, not the U-Net, is the
    costly part per window); ``/frame_index`` keeps the frame rows of every trajectory."""
    if args.visited:
        raise ValueError("--visited: visited states hold no frames, so they cannot label the camera teacher")
    if args.steps < 1 or args.draws < 1:
        raise ValueError("--steps and --draws must be positive")
    c = teacher.config
    demos = load_dataset(args.data)
    cam = camera_demos(demos, c.obs_names, c.horizon, c.n_obs_steps)
    images: FrameWindows = cam.tensors[IMAGE_KEY]
    state = cam.tensors[STATE_KEY]
    began = time.perf_counter()
    gen = torch.Generator().manual_seed(args.seed)
    n = len(state)
    noise = torch.randn((n * args.draws, c.horizon, c.action_dim), generator=gen)  # row j*n + i: draw j, window i
    noise = noise.view(args.draws, n, c.horizon, c.action_dim)
    chunks: list[torch.Tensor] = []
    timesteps = torch.zeros(0)
    for i in tqdm(range(0, n, args.batch_size), desc="teacher-data", dynamic_ncols=True):
        sl = slice(i, min(i + args.batch_size, n))
        cond = teacher.encode_obs({IMAGE_KEY: images[sl], STATE_KEY: state[sl]})
        b = cond.shape[0]
        traj = teacher.ddim_trajectory(cond.repeat(args.draws, 1),
                                       noise[:, sl].reshape(args.draws * b, *noise.shape[2:]), args.steps)
        chunks.append(traj.states.view(args.draws, b, *traj.states.shape[1:]))
        timesteps = traj.timesteps
    states = torch.cat(chunks, dim=1).flatten(0, 1)  # draw-major, matching the repeated windows below
    write_teacher_data(args.out, state.repeat(args.draws, 1, 1), states, timesteps,
                       frame_index=images.index.repeat(args.draws, 1), steps=args.steps, draws=args.draws,
                       seed=args.seed, teacher_sha256=file_sha256(args.teacher / WEIGHTS),
                       dataset_sha256=demos.sha256, dataset_path=str(args.data))
    print(f"teacher-data: {len(states)} trajectories of {args.steps} DDIM steps with frames, "
          f"{time.perf_counter() - began:.0f} s -> {args.out}")
    return 0


# -- student -------------------------------------------------------------------------------------------------
@torch.no_grad()
def _ood_threshold(policy: ImageDKoopmanPolicy, tensors: dict[str, Any], noise: torch.Tensor, margin: float,
                   batch: int = 1024) -> float:
    """``margin`` times the 99.9th percentile of the latent residual over the training windows, in batches
    (a window's frames are gathered only for its batch)."""
    scores = []
    keys = [k for k in (IMAGE_KEY, KEYPOINTS_KEY, STATE_KEY) if k in tensors]
    for i in range(0, len(noise), batch):
        obs = {k: tensors[k][i : i + batch] for k in keys}
        scores.append(policy.sample_normalized(policy.encode_obs(obs), noise[i : i + batch])[1])
    return float(margin * np.quantile(torch.cat(scores).numpy(), 0.999))


def train_student(args: argparse.Namespace, teacher: ImageDiffusionPolicy, data: TeacherData,
                  ood_margin: float) -> int:
    """``koopman-distill student`` from the image teacher: the image dynamic-Koopman student, its encoder the
    teacher's (frozen), its frames from the demonstrations the teacher data was recorded on (``--demos``, by
    default the file the teacher data names)."""
    if not isinstance(teacher, ImageDiffusionPolicy):
        raise ValueError(f"{args.teacher} holds a {teacher.method!r} policy, not the camera teacher "
                         f"({ImageDiffusionPolicy.method})")
    if args.method != "dkoopman":
        raise ValueError(f"--method {args.method}: the camera teacher distils into dkoopman only (dkoopman_image)")
    if data.frame_index is None:
        raise ValueError(f"{args.teacher_data} has no /frame_index: record it with koopman-distill teacher-data "
                         f"--teacher {args.teacher}")
    demos_path = Path(args.demos or data.attrs.get("dataset_path", ""))
    demos = load_dataset(demos_path)
    data.check_dataset(demos.sha256, demos_path, args.teacher_data)
    t = teacher.config
    shared = ("obs_dim", "action_dim", "horizon", "n_obs_steps", "n_action_steps", "control_dt", "obs_names",
              "action_names", "image_height", "image_width", "camera", "vision_dims", "keypoints", "aux_names",
              "aux_loss_weight", "contract")
    base = ImageDKoopmanConfig(**{k: getattr(t, k) for k in shared}, freeze_vision=True)
    config = dataclasses.replace(base, **config_overrides(args.set, dataclasses.asdict(base)))
    if tuple(data.states.shape[2:]) != (config.horizon, config.action_dim):
        raise ValueError(f"teacher data chunks {tuple(data.states.shape[2:])} do not match the teacher's "
                         f"(horizon, action_dim) = ({config.horizon}, {config.action_dim})")
    cam = camera_demos(demos, t.obs_names, t.horizon, t.n_obs_steps, t.aux_names)
    torch.manual_seed(args.seed)
    policy = ImageDKoopmanPolicy(config)
    policy.copy_normalizers(teacher)
    policy.init_vision_from(teacher)
    frames: FrameWindows = cam.tensors[IMAGE_KEY]
    if config.freeze_vision:
        store = policy.encode_frames(frames.frames)
        tensors = {KEYPOINTS_KEY: FrameWindows(store, data.frame_index), STATE_KEY: data.obs, "states": data.states}
    else:
        tensors = {IMAGE_KEY: FrameWindows(frames.frames, data.frame_index), STATE_KEY: data.obs,
                   "states": data.states}
    if cam.aux_table is not None:
        tensors[AUX_KEY] = cam.aux_table[data.frame_index]
    commit = git_commit()  # before training writes checkpoints into --out, which may be tracked
    trained, metrics = train(policy, tensors, train_config(args), args.out, args.resume, desc="dkoopman_image")
    threshold = _ood_threshold(trained, tensors, data.states[:, 0], ood_margin)
    card = {
        **_card_head(args, trained.method, config),
        "teacher": {"path": str(args.teacher), "sha256": data.attrs.get("teacher_sha256", "")},
        "data": {"path": str(args.teacher_data), "sha256": data.sha256, "dataset_path": str(demos_path),
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
    print(f"dkoopman_image: {trained.num_parameters()} parameters, final loss {metrics['final_loss']:.4f}, "
          f"{metrics['train_seconds']} s, OOD threshold {threshold:.4g} -> {args.out}")
    return 0
