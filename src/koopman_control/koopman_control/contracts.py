"""Contracts as the stack receives them: a parameter naming a built-in task, a task file, or the JSON a model
carries; and the plausibility bounds of the joints a contract reads.

Plain Python: the stack description, the ingest and the policy node share it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from koopman_policy.contract import Contract, ContractError, Feature

DEFAULT_TASK = "gen3_reach_obstacle"


def resolve_contract(spec: str) -> Contract:
    """``spec``: JSON (a model's contract), a path to a task file, or a built-in task's name ("" = the default
    task). Raises ContractError naming what is wrong."""
    from koopman_sim import UnknownTaskError, task_file

    text = spec.strip()
    if text.startswith("{"):
        return Contract.from_json(text, "contract parameter")
    if text.endswith((".yaml", ".yml")) or "/" in text:
        if not Path(text).is_file():
            raise ContractError(f"task file {text} does not exist")
        return Contract.from_file(text)
    try:
        return Contract.from_file(str(task_file(text or DEFAULT_TASK)))
    except UnknownTaskError as err:
        raise ContractError(f"{err} (or give a task file path)") from None


def policy_contract(policy: str | None, root: str | Path | None = None) -> Contract:
    """The contract a catalogue policy (or a path) was exported with, read from its ONNX metadata without
    loading the model; ContractError when the file carries none."""
    from koopman_policy.catalog import resolve_policy

    try:
        entry = resolve_policy(policy or None, root=root)
    except ValueError as err:
        raise ContractError(str(err)) from None
    path = entry.onnx if entry.onnx is not None and entry.onnx.is_file() else entry.onnx_denoiser
    if path is None or not path.is_file():
        raise ContractError(f"policy {entry.name!r} has no ONNX export (koopman-distill export)")
    from koopman_policy.onnx_format import REEXPORT_HINT, read_metadata

    try:
        meta = read_metadata(path)
    except (OSError, ValueError) as err:
        raise ContractError(f"{path}: not a readable ONNX file: {err}") from None
    if "contract" not in meta:
        raise ContractError(f"{path} carries no observation and action contract: {REEXPORT_HINT}")
    return with_unwrap_reference(Contract.from_dict(meta["contract"], f"the contract of {path}"), meta)


def with_unwrap_reference(contract: Contract, meta: dict) -> Contract:
    """The contract with each continuous joint's ``reference`` where it lacks one: the middle of the model's
    training range of that joint (its ONNX metadata's obs_low/obs_high), the branch a wrapped reading of the
    joint is unwrapped onto (a ros2_control driver reports the Gen3's joint_3 near -pi where the training data
    has it near pi)."""
    names = list(meta.get("obs_names", []))
    lo, hi = meta.get("obs_low"), meta.get("obs_high")
    if lo is None or hi is None:
        return contract
    d = contract.to_dict()
    for f in d["observation"]:
        if f["kind"] == "joint_position" and any(f.get("continuous", [])) and "reference" not in f:
            idx = [names.index(n) if n in names else None for n in f["names"]]
            if None not in idx:
                f["reference"] = [(float(lo[i]) + float(hi[i])) / 2 for i in idx]
    return Contract.from_dict(d, "contract")


def joint_bounds(joints: Sequence[str], features: Sequence[Feature]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lower, upper, rated speed) per joint: a feature's own ``limits``, else the Gen3 description's for its
    joints, else unbounded (checked for finiteness only)."""
    import gen3_description as gen3

    known = {j: (gen3.JOINT_LOWER[k], gen3.JOINT_UPPER[k], gen3.VELOCITY_LIMITS[k])
             for k, j in enumerate(gen3.JOINT_NAMES)}
    for f in features:
        if f.limits is not None:
            for k, j in enumerate(f.joints):
                known[j] = (f.limits.lower[k], f.limits.upper[k], f.limits.speed[k])
    rows = [known.get(j, (-np.inf, np.inf, np.inf)) for j in joints]
    lower, upper, speed = (np.array(col, dtype=np.float64) for col in zip(*rows, strict=True))
    return lower, upper, speed
