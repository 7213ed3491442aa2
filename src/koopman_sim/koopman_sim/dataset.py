"""Demonstration datasets in HDF5 (one file per collection run).

Layout (format_version 1), N control steps over E episodes, stored back to back:

  /obs              (N, obs_dim)     float32  observation at each control step (before the action)
  /action           (N, action_dim)  float32  action applied at that step (absolute joint targets, rad)
  /episode_ends     (E,)             int64    exclusive end index of each episode in /obs, /action
                                              (same convention as diffusion_policy's ReplayBuffer)
  /episode_success  (E,)             bool     task success flag of each episode
  /episode_side     (E,)             int8     side the hand passed the obstacle: 0 left, 1 right, -1 none
  /episode_seed     (E,)             int64    env reset seed, so any episode can be replayed
  /images           (N, h, w, 3)     uint8    optional camera frames
  root attributes: task (str), obs_names (list of str), action_names (list of str), control_dt (float, s),
                   format_version (int), contract (str, optional: the observation and action contract as JSON,
                   ``koopman_policy.contract``; with /images it has the camera's image feature)

``load_dataset`` returns a ``DemoDataset`` that also carries the sha256 of the file, so training runs can
record exactly which data they used.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

__all__ = [
    "FORMAT_VERSION",
    "SIDE_CODES",
    "DatasetError",
    "DemoDataset",
    "file_sha256",
    "load_dataset",
    "side_code",
    "write_dataset",
]

FORMAT_VERSION = 1
SIDE_CODES: dict[str | None, int] = {"left": 0, "right": 1, None: -1}
REQUIRED_KEYS = ("obs", "action", "episode_ends", "episode_success", "episode_side", "episode_seed")
REQUIRED_ATTRS = ("task", "obs_names", "action_names", "control_dt", "format_version")


class DatasetError(ValueError):
    """A dataset file that is unreadable, incomplete or inconsistent."""


def side_code(side: str | None) -> int:
    if side not in SIDE_CODES:
        raise ValueError(f"side must be 'left', 'right' or None, got {side!r}")
    return SIDE_CODES[side]


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class DemoDataset:
    """In-memory copy of a dataset file (see module docstring for the meaning of each array)."""

    obs: np.ndarray
    action: np.ndarray
    episode_ends: np.ndarray
    episode_success: np.ndarray
    episode_side: np.ndarray
    episode_seed: np.ndarray
    task: str
    obs_names: tuple[str, ...]
    action_names: tuple[str, ...]
    control_dt: float
    format_version: int
    sha256: str
    path: str
    images: np.ndarray | None = None
    contract: str | None = None  # JSON; None in datasets written before contracts

    @property
    def n_episodes(self) -> int:
        return len(self.episode_ends)

    @property
    def n_steps(self) -> int:
        return len(self.obs)

    @property
    def episode_starts(self) -> np.ndarray:
        return np.concatenate([[0], self.episode_ends[:-1]]).astype(np.int64)

    def episode_slice(self, i: int) -> slice:
        """Rows of episode i in obs/action."""
        if not -self.n_episodes <= i < self.n_episodes:
            raise IndexError(f"episode {i} out of range (dataset has {self.n_episodes})")
        i %= self.n_episodes
        return slice(int(self.episode_starts[i]), int(self.episode_ends[i]))


def _validate(
    obs: np.ndarray,
    action: np.ndarray,
    episode_ends: np.ndarray,
    episode_success: np.ndarray,
    episode_side: np.ndarray,
    episode_seed: np.ndarray,
    obs_names: tuple[str, ...],
    action_names: tuple[str, ...],
    images: np.ndarray | None,
    where: str,
) -> None:
    def fail(msg: str) -> None:
        raise DatasetError(f"{where}: {msg}")

    if obs.ndim != 2 or action.ndim != 2:
        fail(f"obs and action must be 2-D, got shapes {obs.shape} and {action.shape}")
    n = len(obs)
    if len(action) != n:
        fail(f"obs has {n} rows but action has {len(action)}")
    if obs.shape[1] != len(obs_names):
        fail(f"obs has {obs.shape[1]} columns but {len(obs_names)} obs_names")
    if action.shape[1] != len(action_names):
        fail(f"action has {action.shape[1]} columns but {len(action_names)} action_names")
    e = len(episode_ends)
    per_episode = {
        "episode_success": episode_success,
        "episode_side": episode_side,
        "episode_seed": episode_seed,
    }
    for name, arr in per_episode.items():
        if arr.shape != (e,):
            fail(f"{name} must have shape ({e},) like episode_ends, got {arr.shape}")
    if episode_ends.ndim != 1:
        fail(f"episode_ends must be 1-D, got shape {episode_ends.shape}")
    if e and (np.any(np.diff(episode_ends) <= 0) or episode_ends[0] <= 0 or episode_ends[-1] != n):
        fail(f"episode_ends must be strictly increasing, positive and end at N={n}")
    if e == 0 and n != 0:
        fail("steps present but no episode_ends")
    if not np.all(np.isin(episode_side, (-1, 0, 1))):
        fail("episode_side values must be -1, 0 or 1")
    if images is not None and (images.ndim != 4 or len(images) != n or images.shape[-1] != 3):
        fail(f"images must have shape (N={n}, h, w, 3), got {images.shape}")


def write_dataset(
    path: str | Path,
    *,
    obs: np.ndarray,
    action: np.ndarray,
    episode_ends: np.ndarray,
    episode_success: np.ndarray,
    episode_side: np.ndarray,
    episode_seed: np.ndarray,
    task: str,
    obs_names: tuple[str, ...] | list[str],
    action_names: tuple[str, ...] | list[str],
    control_dt: float,
    images: np.ndarray | None = None,
    contract: str | None = None,
) -> str:
    """Write a dataset (layout in the module docstring) atomically; returns the file's sha256."""
    path = Path(path)
    arrays = {
        "obs": np.asarray(obs, dtype=np.float32),
        "action": np.asarray(action, dtype=np.float32),
        "episode_ends": np.asarray(episode_ends, dtype=np.int64),
        "episode_success": np.asarray(episode_success, dtype=bool),
        "episode_side": np.asarray(episode_side, dtype=np.int8),
        "episode_seed": np.asarray(episode_seed, dtype=np.int64),
    }
    img = None if images is None else np.asarray(images, dtype=np.uint8)
    _validate(
        **arrays, obs_names=tuple(obs_names), action_names=tuple(action_names), images=img, where=str(path)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        for k, v in arrays.items():
            f.create_dataset(k, data=v)
        if img is not None:
            f.create_dataset("images", data=img, chunks=(1, *img.shape[1:]), compression="gzip")
        f.attrs["task"] = task
        f.attrs["obs_names"] = list(obs_names)
        f.attrs["action_names"] = list(action_names)
        f.attrs["control_dt"] = float(control_dt)
        f.attrs["format_version"] = FORMAT_VERSION
        if contract is not None:
            f.attrs["contract"] = contract
    tmp.replace(path)
    return file_sha256(path)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _names(value: object) -> tuple[str, ...]:
    return tuple(v.decode() if isinstance(v, bytes) else str(v) for v in np.atleast_1d(value))


def load_dataset(path: str | Path, load_images: bool = True) -> DemoDataset:
    """Read and validate a dataset file; raises FileNotFoundError or DatasetError naming the problem."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    try:
        with h5py.File(path, "r") as f:
            missing = [k for k in REQUIRED_KEYS if k not in f]
            if missing:
                raise DatasetError(f"{path}: missing dataset key(s) {', '.join('/' + k for k in missing)}")
            missing_attrs = [a for a in REQUIRED_ATTRS if a not in f.attrs]
            if missing_attrs:
                raise DatasetError(f"{path}: missing root attribute(s) {', '.join(missing_attrs)}")
            arrays = {k: f[k][()] for k in REQUIRED_KEYS}
            images = f["images"][()] if load_images and "images" in f else None
            attrs = dict(f.attrs)
    except OSError as exc:
        raise DatasetError(f"{path}: not a readable HDF5 file ({exc})") from exc
    version = int(attrs["format_version"])
    if version != FORMAT_VERSION:
        raise DatasetError(f"{path}: format_version {version} not supported (expected {FORMAT_VERSION})")
    task = attrs["task"]
    obs_names, action_names = _names(attrs["obs_names"]), _names(attrs["action_names"])
    _validate(**arrays, obs_names=obs_names, action_names=action_names, images=images, where=str(path))
    return DemoDataset(
        obs=arrays["obs"].astype(np.float32, copy=False),
        action=arrays["action"].astype(np.float32, copy=False),
        episode_ends=arrays["episode_ends"].astype(np.int64, copy=False),
        episode_success=arrays["episode_success"].astype(bool, copy=False),
        episode_side=arrays["episode_side"].astype(np.int8, copy=False),
        episode_seed=arrays["episode_seed"].astype(np.int64, copy=False),
        task=task.decode() if isinstance(task, bytes) else str(task),
        obs_names=obs_names,
        action_names=action_names,
        control_dt=float(attrs["control_dt"]),
        format_version=version,
        sha256=file_sha256(path),
        path=str(path),
        images=images,
        contract=None if "contract" not in attrs else _text(attrs["contract"]),
    )
