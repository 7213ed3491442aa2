"""Training tensors: demonstration windows for the teacher, teacher trajectories for the students.

Windows follow Diffusion Policy's sequence sampler: for every time step t of an episode, the observation
window is ``[t - To + 1, t]`` and the action window ``[t - To + 1, t - To + 1 + H)``, padded by repeating
the first observation / last action at the episode's edges.

Teacher data (written by ``koopman-distill teacher-data``) is HDF5 with keys
``/obs (N, To, Do) float32`` raw observations, ``/states (N, K + 1, H, Da) float32`` the teacher's DDIM
trajectory in normalised action space (``states[:, 0]`` = x_T, ``states[:, -1]`` = x_0) and
``/timesteps (K + 1,) int64``; attributes ``teacher_sha256``, ``dataset_sha256``, ``steps``, ``draws`` and
``visited_sha256`` (the visited-state files it also ran on, comma-separated). A camera teacher's data holds the
raw *state* windows in ``/obs`` and adds ``/frame_index (N, To) int64``, the rows of the demonstrations'
``/images`` each window sees, and the attribute ``dataset_path``.

Camera windows gather frames by index from one ``(frames, H, W, 3)`` uint8 store (:class:`FrameWindows`), so a
history of ``To`` frames, and the teacher's ``draws`` trajectories per window, cost no copies of the images.

Visited states (written by ``koopman-distill visit``) is HDF5 with ``/obs (N, To, Do) float32``: the
observation histories a policy met in closed loop, with the rollout's settings and results as attributes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def episode_windows(
    obs: np.ndarray, action: np.ndarray, episode_ends: np.ndarray, horizon: int, n_obs_steps: int
) -> dict[str, torch.Tensor]:
    """All (observation history, action chunk) training pairs of a demonstration set."""
    obs_windows, action_windows = [], []
    start = 0
    for end in episode_ends:
        length = int(end) - start
        if length <= 0:
            raise ValueError(f"episode ending at {end} is empty")
        idx = np.arange(length)
        first = idx - (n_obs_steps - 1)
        obs_idx = np.clip(first[:, None] + np.arange(n_obs_steps)[None], 0, length - 1)
        act_idx = np.clip(first[:, None] + np.arange(horizon)[None], 0, length - 1)
        obs_windows.append(obs[start:end][obs_idx])
        action_windows.append(action[start:end][act_idx])
        start = int(end)
    return {
        "obs": torch.from_numpy(np.concatenate(obs_windows).astype(np.float32)),
        "action": torch.from_numpy(np.concatenate(action_windows).astype(np.float32)),
    }


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
    """Global frame rows ``(N, To)`` of every observation window, padded like :func:`episode_windows`."""
    rows, start = [], 0
    for end in episode_ends:
        idx = np.arange(int(end) - start)
        first = idx - (n_obs_steps - 1)
        rows.append(start + np.clip(first[:, None] + np.arange(n_obs_steps)[None], 0, len(idx) - 1))
        start = int(end)
    return np.concatenate(rows).astype(np.int64)


@dataclass
class TeacherData:
    obs: torch.Tensor
    states: torch.Tensor
    timesteps: torch.Tensor
    sha256: str
    attrs: dict
    frame_index: torch.Tensor | None = None  # camera teacher data: rows of the demonstrations' frames

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"obs": self.obs, "states": self.states}

    def check_dataset(self, sha256: str, data_path: str | Path, path: str | Path) -> None:
        """Refuse demonstrations other than those this teacher data (read from ``path``) was recorded on."""
        if self.attrs.get("dataset_sha256") not in (None, sha256):
            raise ValueError(f"{path} was recorded on another dataset than {data_path}")


def _write_h5(path: str | Path, datasets: dict[str, np.ndarray], attrs: dict[str, object]) -> None:
    """Write datasets and attributes under a temporary name, then rename: a crash mid-write never leaves a
    truncated file under the real name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".partial")
    with h5py.File(tmp, "w") as f:
        for key, data in datasets.items():
            f.create_dataset(key, data=data)
        for key, value in attrs.items():
            f.attrs[key] = value
    tmp.replace(path)


def _read_h5(path: str | Path, keys: tuple[str, ...], what: str, command: str,
             optional: tuple[str, ...] = ()) -> tuple[list[np.ndarray | None], dict]:
    """The datasets ``keys`` (then ``optional``, None where absent) and the attributes of ``what`` (written by
    ``koopman-distill command``); a missing, unreadable or incomplete file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist (run `koopman-distill {command}`)")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in keys if k not in f]
            if missing:
                raise ValueError(f"{what} {path} lacks {missing}")
            return [f[k][()] for k in keys] + [f[k][()] if k in f else None for k in optional], dict(f.attrs)
    except OSError as err:
        raise ValueError(f"{what} {path} cannot be read: {err}") from None


def write_teacher_data(path: str | Path, obs: torch.Tensor, states: torch.Tensor, timesteps: torch.Tensor,
                       frame_index: torch.Tensor | None = None, **attrs: object) -> None:
    datasets = {"obs": obs.numpy().astype(np.float32), "states": states.numpy().astype(np.float32),
                "timesteps": timesteps.numpy().astype(np.int64)}
    if frame_index is not None:
        datasets["frame_index"] = frame_index.numpy().astype(np.int64)
    _write_h5(path, datasets, attrs)


def read_teacher_data(path: str | Path) -> TeacherData:
    (obs, states, timesteps, frame_index), attrs = _read_h5(path, ("obs", "states", "timesteps"), "teacher data",
                                                            "teacher-data", optional=("frame_index",))
    if obs.ndim != 3 or states.ndim != 4 or len(obs) != len(states) or states.shape[1] != len(timesteps):
        raise ValueError(f"teacher data {path} has inconsistent shapes: obs {obs.shape}, states {states.shape}")
    if frame_index is not None and frame_index.shape != obs.shape[:2]:
        raise ValueError(f"teacher data {path}: frame_index {frame_index.shape} does not match obs {obs.shape}")
    return TeacherData(torch.from_numpy(obs), torch.from_numpy(states), torch.from_numpy(timesteps),
                       file_sha256(path), attrs, None if frame_index is None else torch.from_numpy(frame_index))


def write_visited(path: str | Path, obs: np.ndarray, **attrs: object) -> None:
    _write_h5(path, {"obs": np.asarray(obs, dtype=np.float32)}, attrs)


def read_visited(path: str | Path, n_obs_steps: int, obs_dim: int) -> torch.Tensor:
    """Observation histories ``(N, To, Do)`` of a visited-state file, checked against the teacher's shape."""
    (obs,), _ = _read_h5(path, ("obs",), "visited states", "visit")
    if obs.ndim != 3 or tuple(obs.shape[1:]) != (n_obs_steps, obs_dim):
        raise ValueError(f"visited states {path} hold histories of shape {obs.shape[1:]}, "
                         f"the teacher takes ({n_obs_steps}, {obs_dim})")
    if not np.isfinite(obs).all():
        raise ValueError(f"visited states {path} contain NaN or inf")
    return torch.from_numpy(obs.astype(np.float32))
