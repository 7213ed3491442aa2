"""Training tensors: demonstration windows for the teacher, teacher trajectories for the students.

Windows follow Diffusion Policy's sequence sampler: for every time step t of an episode, the observation
window is ``[t - To + 1, t]`` and the action window ``[t - To + 1, t - To + 1 + H)``, padded by repeating
the first observation / last action at the episode's edges.

Teacher data (written by ``koopman-distill teacher-data``) is HDF5 with keys
``/obs (N, To, Do) float32`` raw observations, ``/states (N, K + 1, H, Da) float32`` the teacher's DDIM
trajectory in normalised action space (``states[:, 0]`` = x_T, ``states[:, -1]`` = x_0) and
``/timesteps (K + 1,) int64``; attributes ``teacher_sha256``, ``dataset_sha256``, ``steps``, ``draws`` and
``visited_sha256`` (the visited-state files it also ran on, comma-separated).

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


@dataclass
class TeacherData:
    obs: torch.Tensor
    states: torch.Tensor
    timesteps: torch.Tensor
    sha256: str
    attrs: dict

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"obs": self.obs, "states": self.states}


def write_teacher_data(path: str | Path, obs: torch.Tensor, states: torch.Tensor, timesteps: torch.Tensor,
                       **attrs: object) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".partial")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("obs", data=obs.numpy().astype(np.float32))
        f.create_dataset("states", data=states.numpy().astype(np.float32))
        f.create_dataset("timesteps", data=timesteps.numpy().astype(np.int64))
        for key, value in attrs.items():
            f.attrs[key] = value
    tmp.replace(path)  # a crash mid-write never leaves a truncated file under the real name


def read_teacher_data(path: str | Path) -> TeacherData:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"teacher data {path} does not exist (run `koopman-distill teacher-data`)")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in ("obs", "states", "timesteps") if k not in f]
            if missing:
                raise ValueError(f"teacher data {path} lacks {missing}")
            obs, states, timesteps = f["obs"][()], f["states"][()], f["timesteps"][()]
            attrs = dict(f.attrs)
    except OSError as err:
        raise ValueError(f"teacher data {path} cannot be read: {err}") from None
    if obs.ndim != 3 or states.ndim != 4 or len(obs) != len(states) or states.shape[1] != len(timesteps):
        raise ValueError(f"teacher data {path} has inconsistent shapes: obs {obs.shape}, states {states.shape}")
    return TeacherData(torch.from_numpy(obs), torch.from_numpy(states), torch.from_numpy(timesteps),
                       file_sha256(path), attrs)


def write_visited(path: str | Path, obs: np.ndarray, **attrs: object) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".partial")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("obs", data=np.asarray(obs, dtype=np.float32))
        for key, value in attrs.items():
            f.attrs[key] = value
    tmp.replace(path)


def read_visited(path: str | Path, n_obs_steps: int, obs_dim: int) -> torch.Tensor:
    """Observation histories ``(N, To, Do)`` of a visited-state file, checked against the teacher's shape."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"visited states {path} do not exist (run `koopman-distill visit`)")
    try:
        with h5py.File(path, "r") as f:
            if "obs" not in f:
                raise ValueError(f"visited states {path} lack /obs")
            obs = f["obs"][()]
    except OSError as err:
        raise ValueError(f"visited states {path} cannot be read: {err}") from None
    if obs.ndim != 3 or tuple(obs.shape[1:]) != (n_obs_steps, obs_dim):
        raise ValueError(f"visited states {path} hold histories of shape {obs.shape[1:]}, "
                         f"the teacher takes ({n_obs_steps}, {obs_dim})")
    if not np.isfinite(obs).all():
        raise ValueError(f"visited states {path} contain NaN or inf")
    return torch.from_numpy(obs.astype(np.float32))
