"""One way to load a policy: a catalogue name or path, resolved once, opened with the runtime it needs.

Serving (the policy and teacher nodes), evaluation (``koopman_distill.runners``) and replay
(``koopman_control.bag.replay``) all call :func:`open_policy`. The backend says which of the entry's files runs:

* ``onnx``: its ONNX export through ONNX Runtime, with the runtime the file's metadata ``kind`` names
  (:func:`koopman_policy.onnx_policy.load_onnx`): the one-step ``policy.onnx``, or when a teacher has only its
  ``denoiser.onnx`` (or ``teacher_from_denoiser`` asks for it), the numpy DDIM loop over it. The file's sha256
  is checked against the model card. No torch.
* ``torch``: the checkpoint, rebuilt in PyTorch (torch is imported then, and only then).
* ``auto``: the ONNX export when there is one, else the checkpoint; except that a diffusion teacher with its
  checkpoint runs the checkpoint's own sampler (the evaluation's reference, DDPM-100), where its export is
  DDIM-k.
* ``stack``: what the live stack runs: the ONNX export, or the checkpoint of a policy never exported.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from koopman_policy.catalog import PolicyEntry, resolve_policy
from koopman_policy.checkpoint import CONFIG
from koopman_policy.onnx_policy import ModelLoadError, load_onnx

BACKENDS = ("onnx", "torch", "auto", "stack")
#: Methods whose checkpoint samples with many denoiser calls (``auto`` runs it rather than the DDIM-k export).
DIFFUSION_TEACHERS = ("teacher", "teacher_image")


@dataclass
class LoadedPolicy:
    """A resolved policy and the runtime serving it."""

    entry: PolicyEntry
    model: Any  # OnnxPolicy or OnnxDenoiserLoop (backend "onnx"), a koopman_policy BasePolicy ("torch")
    backend: str  # "onnx" or "torch": what runs, whichever backend was asked for
    source: Path  # the ONNX file or the checkpoint directory

    @property
    def name(self) -> str:
        return self.entry.name


def _exported(entry: PolicyEntry, denoiser_first: bool = False) -> tuple[Path, str] | None:
    """The file the ONNX backend serves and its catalogue field: the one-step export, else a denoiser (the
    other way round with ``denoiser_first``)."""
    for field in ("onnx_denoiser", "onnx") if denoiser_first else ("onnx", "onnx_denoiser"):
        path = getattr(entry, field)
        if path is not None and path.is_file():
            return path, field
    return None


def open_policy(
    name_or_path: str | Path | None = None,
    backend: str = "onnx",
    *,
    root: str | Path | None = None,
    providers: Sequence[str] | None = None,
    intra_op_threads: int = 1,
    seed: int = 0,
    teacher_steps: int = 10,
    teacher_from_denoiser: bool = False,
) -> LoadedPolicy:
    """Resolve a catalogue name (None: the default), checkpoint directory or ``.onnx`` file once and open it.

    ``providers``, ``intra_op_threads`` and ``seed`` (the runtime's own noise) go to ONNX Runtime;
    ``teacher_steps`` is the DDIM step count of a teacher served from its denoiser; ``teacher_from_denoiser``
    serves a teacher that has one from it even where an unrolled sampler graph exists (the live stack: the
    denoiser opens in about a second and takes any step count, where Push-T's unrolled DDIM-30 graph took 60 s
    to open on this 2-core machine). Raises the catalogue's
    UnknownPolicyError or CatalogError, ModelLoadError for an ONNX file that is missing or cannot be served,
    FileNotFoundError for a checkpoint that is not there.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    entry = resolve_policy(name_or_path, root=root)
    exported = _exported(entry, teacher_from_denoiser)
    checkpoint = entry.checkpoint if entry.checkpoint is not None and (entry.checkpoint / CONFIG).is_file() else None
    if backend == "auto":
        reference = entry.method in DIFFUSION_TEACHERS and checkpoint is not None
        backend = "torch" if reference or exported is None else "onnx"
    elif backend == "stack":
        backend = "onnx" if exported is not None or checkpoint is None else "torch"
    if backend == "torch":
        if checkpoint is None:
            where = f" ({entry.checkpoint} has no {CONFIG})" if entry.checkpoint is not None else ""
            raise FileNotFoundError(f"policy {entry.name!r} has no PyTorch checkpoint{where}")
        from koopman_policy.checkpoint import load_policy

        return LoadedPolicy(entry, load_policy(checkpoint), "torch", checkpoint)
    if exported is None:
        wanted = entry.onnx or entry.onnx_denoiser
        if wanted is None:
            raise ModelLoadError(f"policy {entry.name!r} names no ONNX file")
        raise ModelLoadError(f"policy {entry.name!r}: ONNX file {wanted} does not exist; export it from its "
                             "checkpoint: koopman-distill export --checkpoint DIR")
    path, field = exported
    try:
        model = load_onnx(path, providers=list(providers) if providers else None, intra_op_threads=intra_op_threads,
                          seed=seed, expected_sha256=entry.expected_sha256(field), sampler="ddim",
                          num_inference_steps=teacher_steps)
    except ModelLoadError as err:
        raise ModelLoadError(f"policy {entry.name!r}: {err}") from None
    return LoadedPolicy(entry, model, "onnx", path)
