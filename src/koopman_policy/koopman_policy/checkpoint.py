"""Checkpoints as ``model.safetensors`` plus ``config.json``: nothing is ever unpickled.

``config.json`` holds ``{"method": ..., "config": {...}, "extra": {...}}``; ``extra`` carries provenance
(training command, data hash, commit) and anything a caller wants kept beside the weights. Reading a
checkpoint's config needs no torch (the catalogue does it where only the ONNX runtime is installed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from koopman_policy.base import BasePolicy

WEIGHTS = "model.safetensors"
CONFIG = "config.json"


class CheckpointError(ValueError):
    """A checkpoint directory that is missing, incomplete or inconsistent."""


def save_policy(policy: BasePolicy, directory: str | Path, extra: dict[str, Any] | None = None) -> Path:
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in policy.state_dict().items()}
    save_file(state, str(directory / WEIGHTS))
    meta = {"method": policy.method, "config": policy.config.to_dict(), "extra": extra or {}}
    (directory / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def read_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"no {CONFIG} in checkpoint directory {directory}")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(meta, dict) or "method" not in meta or "config" not in meta:
        raise CheckpointError(f"{path} lacks 'method' or 'config'")
    return meta


def load_policy(directory: str | Path, map_location: str = "cpu") -> BasePolicy:
    """Rebuild a policy from its directory; strict: every tensor must match the config's shapes."""
    from safetensors.torch import load_file

    from koopman_policy.registry import policy_class

    directory = Path(directory)
    meta = read_config(directory)
    cls = policy_class(meta["method"])
    policy = cls(cls.config_class.from_dict(meta["config"]))
    weights = directory / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"no {WEIGHTS} in checkpoint directory {directory}")
    try:
        state = load_file(str(weights), device=map_location)
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{weights} cannot be read: {err}") from None
    try:
        policy.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{weights} does not match its config: {err}") from None
    return policy.eval()


def load_extra(directory: str | Path) -> dict[str, Any]:
    return read_config(directory).get("extra", {})


def to_device(policy: BasePolicy, device: str) -> BasePolicy:
    import torch

    return policy.to(torch.device(device))
