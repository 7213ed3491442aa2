"""The camera pipeline: rendered demonstrations, image training windows, teacher trajectories, rollouts.

Frames are rendered with the demonstrations, one per control step (10 Hz), from the fixed camera the policy
will see (``workspace`` by default) at the policy's own resolution, so that no resize separates training
from serving. ``frames[i]`` is rendered right after the physics state of ``obs[i]``, as in closed loop.
The dataset is ``koopman_sim``'s format with ``/images`` and the root attributes ``camera``,
``image_height``, ``image_width``.

Training windows gather frames by index from one ``(N, H, W, 3)`` uint8 store (:class:`FrameWindows`), so
a history of ``To`` frames, and the teacher's ``draws`` trajectories per window, cost no copies of the
images. Image teacher data is the usual teacher-data HDF5 (``obs`` holds the raw *state* windows) plus
``/frame_index (N, To) int64``, rows of the demonstrations' ``/images``, and the attribute
``dataset_path``.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import h5py
import numpy as np
import torch
from tqdm import tqdm

from koopman_distill.data import episode_windows, file_sha256, write_teacher_data
from koopman_distill.evaluate import RolloutStats
from koopman_policy.vision import AUX_KEY, IMAGE_KEY, STATE_KEY, ImageConditioned, ImageDiffusionPolicy

DEFAULT_CAMERA = "workspace"
DEFAULT_SIZE = 64
STATE_PREFIXES = ("q_", "qd_")
#: Training-only read-out targets for the image encoder (see ``koopman_policy.vision.VisionFields``): what the
#: camera must reveal, since the policy is not given it. The pillar's height is fixed by the task.
AUX_NAMES = ("target_x", "target_y", "target_z", "pillar_x", "pillar_y")


def state_columns(obs_names: tuple[str, ...] | list[str]) -> list[int]:
    """Columns of the joint state ``[q, qd]`` in a task observation: what the image policies are given."""
    cols = [i for i, n in enumerate(obs_names) if n.startswith(STATE_PREFIXES)]
    if not cols:
        raise ValueError(f"no joint-state columns (q_*, qd_*) among the observation names {list(obs_names)}")
    return cols


def check_camera(env: Any, camera: str) -> None:
    import mujoco

    model = env.arm.model
    if mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_CAMERA, camera) < 0:
        names = [mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_CAMERA, i) for i in range(model.ncam)]
        raise ValueError(f"unknown camera {camera!r}; the scene has {', '.join(map(str, names))}")


class CameraView:
    """The task env seen through one camera: ``render_frame()`` renders it and times each frame."""

    def __init__(self, env: Any, camera: str) -> None:
        check_camera(env, camera)
        self.env, self.camera = env, camera
        self.render_seconds: list[float] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.env, name)

    def render_frame(self, camera: str | None = None) -> np.ndarray:
        t0 = time.perf_counter()
        frame = self.env.render_frame(camera=camera or self.camera)
        self.render_seconds.append(time.perf_counter() - t0)
        return frame


def make_camera_env(task: str, camera: str, size: tuple[int, int]) -> CameraView:
    import koopman_sim

    height, width = size
    if height < 8 or width < 8:
        raise ValueError(f"image size must be at least 8x8, got {height}x{width}")
    return CameraView(koopman_sim.make(task, width=width, height=height), camera)


def collect_camera(task: str, episodes: int, out: str | Path, seed: int = 0, camera: str = DEFAULT_CAMERA,
                   size: tuple[int, int] = (DEFAULT_SIZE, DEFAULT_SIZE), only_success: bool = True,
                   progress: bool = True) -> dict[str, Any]:
    """Expert demonstrations with one frame per control step; returns the collection summary."""
    from koopman_sim.collect import run_episode, summarize
    from koopman_sim.dataset import side_code, write_dataset
    from koopman_sim.expert import ScriptedExpert

    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    view = make_camera_env(task, camera, size)
    expert = ScriptedExpert(control_dt=view.control_dt)
    records, results = [], []
    began = time.perf_counter()
    for s in tqdm(range(seed, seed + episodes), desc="camera-collect", unit="ep", disable=not progress):
        rec = run_episode(view, expert, s, frame_every=1)
        rec.frames = rec.frames[: rec.steps]  # the last frame follows the last action: no observation
        results.append(rec.result)
        if rec.result.success or not only_success:
            records.append(rec)
    view.close()
    if not records:
        raise ValueError("no successful demonstration to write")
    lengths = [r.steps for r in records]
    sha = write_dataset(
        out, obs=np.concatenate([r.obs for r in records]), action=np.concatenate([r.action for r in records]),
        episode_ends=np.cumsum(lengths, dtype=np.int64), episode_success=[r.result.success for r in records],
        episode_side=[side_code(r.result.side) for r in records], episode_seed=[r.seed for r in records],
        task=task, obs_names=view.obs_names, action_names=view.action_names, control_dt=view.control_dt,
        images=np.concatenate([np.stack(r.frames) for r in records]),
    )
    with h5py.File(out, "a") as f:  # which view the frames show, for the policies' configs
        f.attrs.update(camera=camera, image_height=size[0], image_width=size[1])
    summary = summarize(results, view.control_dt)
    render = np.asarray(view.render_seconds) * 1e3
    summary.update(task=task, seed=seed, camera=camera, image_size=list(size), episodes_written=len(records),
                   steps_written=int(sum(lengths)), out=str(out), sha256=file_sha256(out),
                   written_sha256=sha, render_ms_per_frame={"p50": float(np.median(render)),
                                                             "p99": float(np.percentile(render, 99))},
                   wall_seconds=round(time.perf_counter() - began, 1))
    return summary


# -- training windows -----------------------------------------------------------------------------------------
class FrameWindows:
    """Windows ``(N, To, ...)`` that gather rows of one per-frame store on indexing: image windows from
    ``(frames, H, W, 3)`` uint8, or keypoint windows from ``(frames, 2K)`` precomputed features.

    Quacks like a tensor where the training loop needs it (``len``, ``windows[idx]``), so image batches
    flow through ``koopman_distill.train.train`` unchanged.
    """

    def __init__(self, frames: torch.Tensor, index: torch.Tensor) -> None:
        if frames.dim() < 2:
            raise ValueError(f"the frame store must have one row per frame, got shape {tuple(frames.shape)}")
        if index.dim() != 2 or (len(index) and (int(index.min()) < 0 or int(index.max()) >= len(frames))):
            raise ValueError(f"frame index must be (N, To) with rows of the {len(frames)} frames")
        self.frames, self.index = frames, index.long()

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, idx: torch.Tensor | slice) -> torch.Tensor:
        return self.frames[self.index[idx]]

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.index), self.index.shape[1], *self.frames.shape[1:])


def frame_index_windows(episode_ends: np.ndarray, n_obs_steps: int) -> np.ndarray:
    """Global frame rows ``(N, To)`` of every observation window, padded like ``episode_windows``."""
    rows, start = [], 0
    for end in episode_ends:
        idx = np.arange(int(end) - start)
        first = idx - (n_obs_steps - 1)
        rows.append(start + np.clip(first[:, None] + np.arange(n_obs_steps)[None], 0, len(idx) - 1))
        start = int(end)
    return np.concatenate(rows).astype(np.int64)


@dataclass
class CameraDemos:
    """Demonstrations as image-policy training tensors, with what the policy configs need from the file."""

    tensors: dict[str, Any]  # image (FrameWindows), state (N, To, S), action (N, H, Da)[, aux (N, To, A)]
    aux_table: torch.Tensor | None  # (frames, A): the aux values of every frame, for other frame indices
    state_names: list[str]
    action_names: list[str]
    control_dt: float
    camera: str
    image_size: tuple[int, int]
    sha256: str
    episodes: int


def load_camera_demos(path: str | Path, horizon: int, n_obs_steps: int,
                      aux_names: tuple[str, ...] | list[str] = ()) -> CameraDemos:
    """Training windows of a camera dataset; with ``aux_names`` also those observation columns per frame."""
    from koopman_sim.dataset import load_dataset

    demos = load_dataset(path)
    if demos.images is None:
        raise ValueError(f"{path} has no /images; collect it with `koopman-distill camera-collect`")
    with h5py.File(path, "r") as f:
        camera = str(f.attrs.get("camera", "unknown"))
    cols = state_columns(demos.obs_names)
    windows = episode_windows(demos.obs[:, cols], demos.action, demos.episode_ends, horizon, n_obs_steps)
    index = torch.from_numpy(frame_index_windows(demos.episode_ends, n_obs_steps))
    frames = torch.from_numpy(np.ascontiguousarray(demos.images))
    tensors = {IMAGE_KEY: FrameWindows(frames, index), STATE_KEY: windows["obs"], "action": windows["action"]}
    aux_table = None
    if aux_names:
        missing = [n for n in aux_names if n not in demos.obs_names]
        if missing:
            raise ValueError(f"{path}: no observation columns {missing} for the auxiliary loss")
        aux_table = torch.from_numpy(demos.obs[:, [demos.obs_names.index(n) for n in aux_names]].copy())
        tensors[AUX_KEY] = aux_table[index]
    return CameraDemos(
        tensors=tensors, aux_table=aux_table,
        state_names=[demos.obs_names[i] for i in cols], action_names=list(demos.action_names),
        control_dt=float(demos.control_dt), camera=camera, image_size=tuple(demos.images.shape[1:3]),
        sha256=demos.sha256, episodes=demos.n_episodes,
    )


# -- teacher trajectories -----------------------------------------------------------------------------------------
@torch.no_grad()
def image_teacher_data(teacher: ImageDiffusionPolicy, demos: CameraDemos, out: str | Path, steps: int, draws: int,
                       seed: int, batch_size: int = 256, progress: bool = True, **attrs: Any) -> int:
    """Record ``draws`` deterministic DDIM-``steps`` trajectories per window; returns the trajectory count.

    Each window's frames are encoded once and the conditioning repeated over its draws: the CNN, not the
    U-Net, is the costly part per window.
    """
    if steps < 1 or draws < 1:
        raise ValueError("steps and draws must be positive")
    images: FrameWindows = demos.tensors[IMAGE_KEY]
    state = demos.tensors[STATE_KEY]
    c = teacher.config
    gen = torch.Generator().manual_seed(seed)
    n = len(state)
    noise = torch.randn((n * draws, c.horizon, c.action_dim), generator=gen)  # row j*n + i: draw j of window i
    noise = noise.view(draws, n, c.horizon, c.action_dim)
    chunks: list[torch.Tensor] = []
    timesteps = torch.zeros(0)
    for i in tqdm(range(0, n, batch_size), desc="camera-teacher-data", disable=not progress, dynamic_ncols=True):
        sl = slice(i, min(i + batch_size, n))
        cond = teacher.encode_obs({IMAGE_KEY: images[sl], STATE_KEY: state[sl]})
        b = cond.shape[0]
        traj = teacher.ddim_trajectory(cond.repeat(draws, 1), noise[:, sl].reshape(draws * b, *noise.shape[2:]),
                                       steps)
        chunks.append(traj.states.view(draws, b, *traj.states.shape[1:]))
        timesteps = traj.timesteps
    states = torch.cat(chunks, dim=1).flatten(0, 1)  # draw-major, matching the repeated windows below
    write_teacher_data(out, state.repeat(draws, 1, 1), states, timesteps, steps=steps, draws=draws, seed=seed,
                       **attrs)
    with h5py.File(out, "a") as f:
        f.create_dataset("frame_index", data=images.index.repeat(draws, 1).numpy())
    return len(states)


def read_frame_index(path: str | Path) -> torch.Tensor:
    with h5py.File(path, "r") as f:
        if "frame_index" not in f:
            raise ValueError(f"{path} has no /frame_index: not written by `koopman-distill camera-teacher-data`")
        return torch.from_numpy(f["frame_index"][()])


# -- closed loop ---------------------------------------------------------------------------------------------------
class ImageRunner(Protocol):
    name: str
    method: str
    backend: str
    horizon: int
    n_obs_steps: int
    n_action_steps: int
    action_dim: int
    num_parameters: int
    camera: str
    image_size: tuple[int, int]
    sampler: str | None  # the teacher's ("ddim-10"); None for one-step students

    def predict_action(self, image: np.ndarray, state: np.ndarray, noise: np.ndarray) -> np.ndarray: ...


class TorchImageRunner:
    """A torch image policy behind the numpy interface the rollout uses (images float in [0, 1])."""

    backend = "torch"

    def __init__(self, name: str, policy: ImageConditioned) -> None:
        c = policy.config
        self.name, self.policy, self.method = name, policy, policy.method
        self.horizon, self.n_obs_steps, self.n_action_steps = c.horizon, c.n_obs_steps, c.n_action_steps
        self.action_dim, self.num_parameters = c.action_dim, policy.num_parameters()
        self.camera, self.image_size = c.camera, (c.image_height, c.image_width)
        self.sampler = f"{c.sampler}-{c.num_inference_steps}" if hasattr(c, "sampler") else None

    @torch.no_grad()
    def predict_action(self, image: np.ndarray, state: np.ndarray, noise: np.ndarray) -> np.ndarray:
        obs = {IMAGE_KEY: torch.from_numpy(image[None]), STATE_KEY: torch.from_numpy(state[None])}
        return self.policy.predict_action(obs, torch.from_numpy(noise[None])).numpy()[0]


class OnnxImageRunner:
    """An exported image policy through :class:`koopman_policy.onnx_image_policy.OnnxImagePolicy`."""

    backend = "onnx"

    def __init__(self, name: str, path: str | Path, num_parameters: int = 0) -> None:
        from koopman_policy.onnx_image_policy import OnnxImagePolicy

        self.session = OnnxImagePolicy(path)
        m = self.session.metadata
        self.name, self.method, self.num_parameters = name, m.method, num_parameters
        self.horizon, self.n_obs_steps, self.n_action_steps = m.horizon, m.n_obs_steps, m.n_action_steps
        self.action_dim = m.action_dim
        self.camera, self.image_size = self.session.camera, self.session.image_size
        self.sampler = f"{m.sampler}-{m.num_inference_steps}" if m.sampler else None

    def predict_action(self, image: np.ndarray, state: np.ndarray, noise: np.ndarray) -> np.ndarray:
        return self.session.predict_action(image, state, noise)


def camera_rollout(runner: ImageRunner, episodes: int, seed: int, task: str = "gen3_reach_obstacle",
                   progress: bool = True) -> tuple[RolloutStats, list[float]]:
    """Closed loop with frames rendered at the policy rate; same seeds and noise convention as ``rollout``.

    Returns the stats and the render time of every frame (ms).
    """
    view = make_camera_env(task, runner.camera, runner.image_size)
    cols = state_columns(view.obs_names)
    stats = RolloutStats()
    start = runner.n_obs_steps - 1
    for ep in tqdm(range(episodes), desc=runner.name, disable=not progress, dynamic_ncols=True):
        obs, _ = view.reset(seed=seed + ep)
        rng = np.random.default_rng(seed + ep)
        noise = rng.standard_normal((runner.horizon, runner.action_dim)).astype(np.float32)
        frame = view.render_frame().astype(np.float32) / 255.0
        images = deque([frame] * runner.n_obs_steps, maxlen=runner.n_obs_steps)
        states = deque([obs[cols]] * runner.n_obs_steps, maxlen=runner.n_obs_steps)
        path = [view.arm.ee_pos.copy()]
        done = False
        while not done:
            t0 = time.perf_counter()
            chunk = runner.predict_action(np.stack(images), np.stack(states).astype(np.float32), noise)
            stats.latencies_ms.append((time.perf_counter() - t0) * 1e3)
            for action in chunk[start : start + runner.n_action_steps]:
                obs, _, terminated, truncated, _ = view.step(action)
                done = terminated or truncated
                path.append(view.arm.ee_pos.copy())
                if done:
                    break
                images.append(view.render_frame().astype(np.float32) / 255.0)
                states.append(obs[cols])
        result = view.result()
        stats.successes.append(bool(result.success))
        stats.collisions.append(bool(result.collision))
        stats.sides.append(result.side)
        stats.paths.append(np.asarray(path))
        stats.scenes.append((view.task.target.copy(), view.task.pillar.copy()))
    view.close()
    return stats, [s * 1e3 for s in view.render_seconds]
