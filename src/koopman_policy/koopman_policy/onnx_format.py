"""What an exported ONNX file promises: its graph inputs and outputs, its metadata keys, its hash.

Shared by the export (:mod:`koopman_policy.onnx_export`, torch and ``onnx``) and the runtime
(:mod:`koopman_policy.onnx_policy`, ONNX Runtime and numpy), so neither imports the other; this module imports
neither torch nor ``onnx``. Every metadata value is a JSON-encoded string in the model's ``metadata_props``.

Two kinds of file (metadata ``kind``): a ``policy`` maps an observation and noise to a raw action chunk and an
OOD score in one call (its observation inputs are ``obs``, or ``image`` and ``state`` for a camera policy; the
metadata key ``inputs`` lists them in graph order), a ``denoiser`` is the teacher's U-Net for a numpy DDIM/DDPM
loop. Every file carries its observation and action ``contract`` (:mod:`koopman_policy.contract`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

#: 2: every file carries ``inputs`` and its ``contract``.
FORMAT_VERSION = 2
KINDS = ("policy", "denoiser")

POLICY_INPUTS = ("obs", "noise")
IMAGE_POLICY_INPUTS = ("image", "state", "noise")
POLICY_OUTPUTS = ("action", "ood_score")
DENOISER_INPUTS = ("sample", "timestep", "obs")
DENOISER_OUTPUTS = ("eps",)

#: Metadata every exported file carries.
POLICY_KEYS = (
    "format_version", "kind", "method", "inputs", "obs_dim", "action_dim", "horizon", "n_obs_steps",
    "n_action_steps", "control_dt", "obs_layout", "obs_names", "action_names", "obs_low", "obs_high", "action_low",
    "action_high", "action_limit_low", "action_limit_high", "training_commit", "weights_sha256", "uses_noise",
    "config", "contract",
)
#: Added to a teacher denoiser's metadata: what a numpy DDIM/DDPM loop needs.
SCHEDULER_KEYS = (
    "num_train_timesteps", "beta_schedule", "beta_start", "beta_end", "clip_sample", "clip_sample_range",
    "prediction_type", "set_alpha_to_one", "steps_offset", "timestep_spacing",
)
OBS_LAYOUT = "(batch, n_obs_steps, obs_dim) float32, raw units, oldest observation first"
STATE_LAYOUT = "state: (batch, n_obs_steps, obs_dim) float32, raw units, oldest first"
IMAGE_LAYOUT = "(batch, n_obs_steps, height, width, 3) float32 RGB in [0, 1] (uint8 / 255), oldest frame first"
#: How to make a file that predates the contract usable again.
REEXPORT_HINT = "re-export it from its checkpoint: koopman-distill export --checkpoint DIR"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_METADATA_PROPS = 14  # ModelProto.metadata_props; StringStringEntryProto: key = 1, value = 2


def read_metadata(path: str | Path) -> dict[str, Any]:
    """Decoded ``metadata_props`` of an ONNX file, read from its protobuf encoding without a session (which
    would optimise the whole graph) or the export-side ``onnx`` package. ValueError when the bytes are not a
    protobuf message or a value is not JSON."""
    out: dict[str, Any] = {}
    for number, value in _fields(memoryview(Path(path).read_bytes())):
        if number == _METADATA_PROPS and isinstance(value, memoryview):
            entry = {n: v for n, v in _fields(value) if isinstance(v, memoryview)}
            key, text = bytes(entry.get(1, b"")).decode(), bytes(entry.get(2, b"")).decode()
            out[key] = json.loads(text)
    return out


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise ValueError("not a protobuf message: truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview) -> Iterator[tuple[int, int | memoryview]]:
    """(field number, value) of each field of one protobuf message; length-delimited values as memoryviews."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, value
            continue
        if wire == 2:
            size, pos = _varint(buf, pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
        else:
            raise ValueError(f"not a protobuf message: wire type {wire} at byte {pos}")
        if number == 0 or pos + size > len(buf):
            raise ValueError(f"not a protobuf message: field {number} of {size} bytes at byte {pos} overruns "
                             f"{len(buf)} bytes")
        yield number, buf[pos : pos + size]
        pos += size
