"""Load any policy by catalogue name or path behind one numpy interface for evaluation.

Students run through ONNX Runtime when their ``.onnx`` file exists (what the robot runs), otherwise
through PyTorch; the teacher runs in PyTorch with its configured sampler, or through its ONNX export (DDIM-k)
for a catalogue entry that names only that.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from koopman_policy.base import BasePolicy
from koopman_policy.catalog import resolve_policy
from koopman_policy.checkpoint import load_policy


class Runner(Protocol):
    name: str
    method: str
    horizon: int
    n_obs_steps: int
    n_action_steps: int
    obs_dim: int
    action_dim: int
    num_parameters: int
    backend: str
    card: Path | None

    def predict_action(self, obs_history: np.ndarray, noise: np.ndarray) -> np.ndarray: ...


@dataclass
class TorchRunner:
    name: str
    policy: BasePolicy
    card: Path | None = None
    backend: str = "torch"

    def __post_init__(self) -> None:
        c = self.policy.config
        self.method = self.policy.method
        self.horizon, self.n_obs_steps, self.n_action_steps = c.horizon, c.n_obs_steps, c.n_action_steps
        self.obs_dim, self.action_dim = c.obs_dim, c.action_dim
        self.num_parameters = self.policy.num_parameters()

    @torch.no_grad()
    def predict_action(self, obs_history: np.ndarray, noise: np.ndarray) -> np.ndarray:
        squeeze = obs_history.ndim == 2
        obs = torch.from_numpy(np.asarray(obs_history, np.float32))
        eps = torch.from_numpy(np.asarray(noise, np.float32))
        if squeeze:
            obs, eps = obs[None], eps[None]
        chunk = self.policy.predict_action(obs, eps).numpy()
        return chunk[0] if squeeze else chunk


@dataclass
class OnnxRunner:
    name: str
    path: Path
    num_parameters: int
    card: Path | None = None
    backend: str = "onnx"

    def __post_init__(self) -> None:
        from koopman_policy.onnx_policy import OnnxPolicy

        self.session = OnnxPolicy(self.path)
        meta = self.session.metadata
        self.method = meta.method
        self.horizon, self.n_obs_steps, self.n_action_steps = meta.horizon, meta.n_obs_steps, meta.n_action_steps
        self.obs_dim, self.action_dim = meta.obs_dim, len(meta.action_names)

    def predict_action(self, obs_history: np.ndarray, noise: np.ndarray) -> np.ndarray:
        return self.session.predict_action(obs_history, noise)


def onnx_parameters(path: Path) -> int:
    """Float values stored in an ONNX graph, for an export without its checkpoint: the weights plus a few
    normaliser and schedule constants (the Gen3 teacher: 1,181,213 against its checkpoint's 1,181,127; an
    unrolled DDIM graph stores the U-Net's weights once)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return int(sum(np.prod(t.dims) for t in model.graph.initializer
                   if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) >= 1 and np.prod(t.dims) > 1))


def load_runner(name_or_path: str, backend: str = "auto") -> Runner:
    entry = resolve_policy(name_or_path)
    if backend not in ("auto", "torch", "onnx"):
        raise ValueError(f"backend must be auto, torch or onnx, got {backend!r}")
    checkpoint = load_policy(entry.checkpoint) if entry.checkpoint else None
    onnx = entry.onnx if entry.onnx and Path(entry.onnx).is_file() else None
    # A teacher runs its checkpoint's sampler unless the entry has only the ONNX export (DDIM-k unrolled).
    prefer_onnx = entry.method != "teacher" or checkpoint is None
    if backend == "onnx" or (backend == "auto" and onnx is not None and prefer_onnx):
        if onnx is None:
            raise FileNotFoundError(f"policy {entry.name!r} has no ONNX file")
        params = checkpoint.num_parameters() if checkpoint is not None else onnx_parameters(Path(onnx))
        return OnnxRunner(entry.name, Path(onnx), params, entry.card)
    if checkpoint is None:
        raise FileNotFoundError(f"policy {entry.name!r} has no PyTorch checkpoint")
    return TorchRunner(entry.name, checkpoint, entry.card)
