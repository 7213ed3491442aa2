"""ONNX export of the image policies: inputs ``image``, ``state``, ``noise``; outputs as every policy.

The graph's ``image`` input is ``(batch, n_obs_steps, H, W, 3)`` float32 RGB in [0, 1] (what
``koopman_control``'s camera ingest emits), ``state`` the raw ``(batch, n_obs_steps, state_dim)`` joint
state, ``noise`` standard normal ``(batch, horizon, action_dim)``; outputs ``action`` (raw) and ``ood_score``.
The metadata is the state policies' (``obs_*`` then describe the state) plus the keys of
:meth:`koopman_policy.vision.ImageConditioned.image_metadata` (``inputs``, ``image_height``, ``image_width``,
``image_layout``, ``image_mean``/``image_std``, ``camera``), so a runtime knows which frames to feed.
The image teacher is exported as DDIM-k unrolled, like the state teacher; it has no separate denoiser file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from koopman_policy import onnx_export as ox
from koopman_policy.teacher import DiffusionPolicy
from koopman_policy.vision import IMAGE_KEY, IMAGE_POLICY_INPUTS, STATE_KEY, ImageConditioned


def export_image_policy(policy: ImageConditioned, path: str | Path, metadata_extra: dict[str, Any] | None = None,
                        *, teacher_steps: int = ox.DEFAULT_TEACHER_STEPS) -> Path:
    """Write ``policy``'s three-input graph with its metadata; returns the path."""
    path = Path(path)
    extra = {**policy.image_metadata(), **(metadata_extra or {})}
    sha = extra.pop("weights_sha256", None)
    meta = ox.policy_metadata(policy, extra)
    if sha is not None:
        meta["weights_sha256"] = sha
    if isinstance(policy, DiffusionPolicy):
        policy = ox._teacher_as_ddim(policy, teacher_steps)
        meta.update(sampler="ddim", num_inference_steps=teacher_steps)
    example = policy.export_example_inputs(batch=2)
    dynamic = {name: {0: "batch"} for name in (*IMAGE_POLICY_INPUTS, *ox.POLICY_OUTPUTS)}
    ox._trace(policy.export_module(), tuple(example.values()), path, IMAGE_POLICY_INPUTS, ox.POLICY_OUTPUTS,
              dynamic)
    shapes = {k: ["batch", *v.shape[1:]] for k, v in example.items()}
    ox._write_metadata(path, meta, IMAGE_POLICY_INPUTS, shapes)
    return path


def random_inputs(policy: ImageConditioned, n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Frames uniform in [0, 1], states over (and a little beyond) the normaliser's range, normal noise."""
    c = policy.config
    low, high = policy.obs_normalizer.bounds()
    u = torch.rand((n, c.n_obs_steps, c.obs_dim), generator=gen) * 1.2 - 0.1
    return {
        IMAGE_KEY: torch.rand((n, c.n_obs_steps, *policy.image_shape), generator=gen),
        STATE_KEY: low + u * (high - low),
        "noise": torch.randn((n, c.horizon, c.action_dim), generator=gen),
    }


def check_image_parity(policy: ImageConditioned, path: str | Path, samples: int = 200, seed: int = 0,
                       batch: int = 100) -> ox.ParityReport:
    """ONNX Runtime against ``policy.export_module()`` on the same random inputs (max abs differences)."""
    meta = ox.read_metadata(path)
    if isinstance(policy, DiffusionPolicy):
        policy = ox._teacher_as_ddim(policy, int(meta["num_inference_steps"]))
    module = policy.export_module()
    was_training = module.training
    module.eval()
    session = ox._session(Path(path))
    gen = torch.Generator().manual_seed(seed)
    worst = {"action": 0.0, "ood_score": 0.0}
    try:
        for start in range(0, samples, batch):
            inputs = random_inputs(policy, min(batch, samples - start), gen)
            with torch.no_grad():
                ref = [t.numpy() for t in module(*inputs.values())]
            out = session.run(list(ox.POLICY_OUTPUTS), {k: v.numpy() for k, v in inputs.items()})
            act = float(np.abs(out[0] - ref[0]).max())
            ood = float((np.abs(out[1] - ref[1]) / np.maximum(1.0, np.abs(ref[1]))).max())
            worst = {"action": max(worst["action"], act), "ood_score": max(worst["ood_score"], ood)}
    finally:
        module.train(was_training)
    return ox.ParityReport(samples, worst)
