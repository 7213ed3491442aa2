"""The policy catalogue: short names for the model files under ``models/``.

``config/policies.yaml``::

    policies:
      dkoopman: {method: dkoopman, checkpoint: models/gen3_dkoopman, onnx: models/gen3_dkoopman/policy.onnx,
                 card: models/gen3_dkoopman/card.json}
      teacher:  {method: teacher, checkpoint: models/gen3_teacher, onnx: models/gen3_teacher/policy.onnx,
                 onnx_denoiser: models/gen3_teacher/denoiser.onnx, card: models/gen3_teacher/card.json}
    default: dkoopman

A camera policy adds ``inputs: image`` (default ``state``): it observes frames plus the joint state. ``task``
(default ``gen3_reach_obstacle``) names the environment a policy was trained for, so tools that compare
policies (the benchmark's speedup over the teacher) only compare those of one task.
Relative paths are relative to the catalogue root (the directory holding ``config/``). Files need not exist
to be resolved: loading them is where a missing file is reported, with its path. A checkpoint directory
(with ``config.json``) or an ``.onnx`` file can be named directly instead of a catalogue name.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

CATALOG = Path("config") / "policies.yaml"
ROOT_ENV = "KOOPMAN_CONTROL_ROOT"
_PATH_FIELDS = ("checkpoint", "onnx", "onnx_denoiser", "card")
_FIELDS = ("method", "inputs", "task", *_PATH_FIELDS)
DEFAULT_TASK = "gen3_reach_obstacle"
#: What a policy observes: the task's state vector, or camera frames plus the joint state (``inputs: image``).
INPUTS = ("state", "image")


class UnknownPolicyError(ValueError):
    """A name that is neither in the catalogue nor a path to a checkpoint or ONNX file."""


class CatalogError(ValueError):
    """A catalogue file that cannot be read or does not follow the format."""


@dataclass(frozen=True)
class PolicyEntry:
    name: str
    method: str
    checkpoint: Path | None = None
    onnx: Path | None = None
    onnx_denoiser: Path | None = None
    card: Path | None = None
    inputs: str = "state"
    task: str = DEFAULT_TASK

    def card_data(self) -> dict[str, Any]:
        """The model card (JSON or YAML), or ``{}`` when there is none."""
        if self.card is None or not self.card.is_file():
            return {}
        text = self.card.read_text()
        data = json.loads(text) if self.card.suffix == ".json" else yaml.safe_load(text)
        return data if isinstance(data, dict) else {}

    def expected_sha256(self, which: str = "onnx") -> str | None:
        """The sha256 the card records for ``onnx`` or ``onnx_denoiser`` (written by ``koopman-distill export``)."""
        path = getattr(self, which)
        exports = self.card_data().get("exports", {})
        entry = exports.get(path.name) if path is not None and isinstance(exports, dict) else None
        return entry.get("sha256") if isinstance(entry, dict) else None


@dataclass(frozen=True)
class Catalog:
    root: Path
    policies: dict[str, PolicyEntry]
    default: str | None


def find_root(start: str | Path | None = None) -> Path:
    """Where ``config/policies.yaml`` lives: ``$KOOPMAN_CONTROL_ROOT``, else the nearest directory above
    ``start`` (default: the working directory) that has one, else the source checkout of this package."""
    if os.environ.get(ROOT_ENV):
        return Path(os.environ[ROOT_ENV])
    here = Path(start or Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / CATALOG).is_file():
            return candidate
    return Path(__file__).resolve().parents[3]


def load_catalog(root: str | Path | None = None) -> Catalog:
    root = Path(root) if root is not None else find_root()
    path = root / CATALOG
    if not path.is_file():
        return Catalog(root, {}, None)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise CatalogError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("policies", {}), dict):
        raise CatalogError(f"{path}: expected a mapping with a 'policies:' mapping")
    policies: dict[str, PolicyEntry] = {}
    for name, spec in (data.get("policies") or {}).items():
        if not isinstance(spec, dict) or "method" not in spec:
            raise CatalogError(f"{path}: policy {name!r} needs a mapping with at least 'method'")
        unknown = set(spec) - set(_FIELDS)
        if unknown:
            raise CatalogError(f"{path}: policy {name!r} has unknown fields {sorted(unknown)}; known: {_FIELDS}")
        paths = {k: (root / spec[k]) if spec.get(k) else None for k in _PATH_FIELDS}
        inputs = str(spec.get("inputs", "state"))
        if inputs not in INPUTS:
            raise CatalogError(f"{path}: policy {name!r} has inputs {inputs!r}; known: {', '.join(INPUTS)}")
        policies[str(name)] = PolicyEntry(name=str(name), method=str(spec["method"]), inputs=inputs,
                                          task=str(spec.get("task", DEFAULT_TASK)), **paths)
    default = data.get("default")
    if default is not None and default not in policies:
        raise CatalogError(f"{path}: default {default!r} is not one of {sorted(policies)}")
    return Catalog(root, policies, default)


def _entry_from_path(path: Path) -> PolicyEntry:
    if path.is_dir():
        from koopman_policy.checkpoint import read_config

        meta = read_config(path)
        existing = {f: path / n for f, n in (("onnx", "policy.onnx"), ("onnx_denoiser", "denoiser.onnx"),
                                             ("card", "card.json"))}
        files = {f: (p if p.is_file() else None) for f, p in existing.items()}
        # Image policies' configs carry the frame size (koopman_policy.vision.VisionFields).
        inputs = "image" if "image_height" in meta["config"] else "state"
        return PolicyEntry(name=path.resolve().name, method=str(meta["method"]), checkpoint=path, inputs=inputs,
                           **files)
    from koopman_policy.onnx_format import read_metadata

    try:
        meta = read_metadata(path)
    except (OSError, ValueError) as err:
        raise UnknownPolicyError(f"{path}: not a readable ONNX file: {err}") from None
    field = "onnx_denoiser" if meta.get("kind") == "denoiser" else "onnx"
    inputs = "image" if "image" in (meta.get("inputs") or ()) else "state"
    return PolicyEntry(name=path.stem, method=str(meta.get("method", "unknown")), inputs=inputs, **{field: path})


def resolve_policy(name_or_path: str | Path | None = None, root: str | Path | None = None) -> PolicyEntry:
    """A catalogue name (``None``: the default), a checkpoint directory or an ``.onnx`` file -> entry."""
    catalog = load_catalog(root)
    if name_or_path is None:
        if catalog.default is None:
            raise UnknownPolicyError(f"no default policy in {catalog.root / CATALOG}")
        return catalog.policies[catalog.default]
    key = str(name_or_path)
    if key in catalog.policies:
        return catalog.policies[key]
    path = Path(key)
    if path.is_dir() and (path / "config.json").is_file():
        return _entry_from_path(path)
    if path.is_file() and path.suffix == ".onnx":
        return _entry_from_path(path)
    known = ", ".join(sorted(catalog.policies)) or "none"
    raise UnknownPolicyError(
        f"unknown policy {key!r}: not a name in {catalog.root / CATALOG} (known: {known}), "
        "nor a checkpoint directory with config.json, nor an .onnx file"
    )
