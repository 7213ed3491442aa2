"""``koopman-distill export``: checkpoint -> ONNX for the controller, with a parity check.

Writes ``policy.onnx`` (the teacher: DDIM-k unrolled, plus ``denoiser.onnx`` beside it; state and camera
policies alike), compares ONNX Runtime with PyTorch on random inputs (``koopman_policy.onnx_export.check_parity``:
the largest difference of the chunk and of the OOD score in raw units), and records each file's sha256 in the
checkpoint's ``card.json`` (``exports``) so that the runtime can refuse a file that is not the one exported.
Every file carries the observation and action contract, the checkpoint's or, for one trained before contracts,
its built-in task's (``koopman_distill.contracts``); the card records it too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import gen3_description as gen3
from koopman_distill.cli import COMMANDS, UserError
from koopman_distill.contracts import checkpoint_contract
from koopman_policy.checkpoint import CONFIG, WEIGHTS, read_config
from koopman_policy.contract import Contract
from koopman_policy.onnx_export import DEFAULT_TEACHER_STEPS, OPSET, PARITY_TOL, ExportResult, export_checkpoint


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help=COMMANDS["export"])
    p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint directory (model.safetensors + "
                   "config.json)")
    p.add_argument("--out", type=Path, default=None, help="ONNX file to write (default: CHECKPOINT/policy.onnx)")
    p.add_argument("--ood-threshold", type=float, default=None,
                   help="OOD score above which the controller flags an observation (stored in the metadata)")
    p.add_argument("--parity-samples", type=int, default=1000,
                   help="random inputs for the ONNX Runtime vs PyTorch check (0 skips it)")
    p.add_argument("--teacher-steps", type=int, default=DEFAULT_TEACHER_STEPS,
                   help="DDIM steps unrolled into the teacher's policy.onnx")
    p.set_defaults(func=run)


def _record_in_card(directory: Path, result: ExportResult) -> None:
    card_path = directory / "card.json"
    if not card_path.is_file():
        return
    files = [(result.policy_path, result.policy_sha256, result.parity)]
    if result.denoiser_path is not None:
        files.append((result.denoiser_path, result.denoiser_sha256, result.denoiser_parity))
    # The card describes the files beside it only.
    files = [f for f in files if f[0].parent.resolve() == directory.resolve()]
    if not files:
        return
    card = json.loads(card_path.read_text())
    card["contract"] = result.contract.to_dict()
    exports = card.setdefault("exports", {})
    for path, sha, parity in files:
        exports[path.name] = {"sha256": sha, "opset": OPSET,
                              "parity_max_abs": None if parity is None else parity.worst}
    card_path.write_text(json.dumps(card, indent=2) + "\n")


def action_limits(directory: Path, contract: Contract) -> dict[str, list[float]]:
    """The targets the robot accepts, as the export's action limits (the controller refuses chunks beyond them).

    The contract's, where its action features give ``limits`` (Push-T's pusher takes targets past the table's
    walls); else the Gen3's joint limits when the policy commands the Gen3's joints; else nothing, and the
    export falls back to the range seen in training, which a sound chunk can leave by a little (measured: a
    dkoopman chunk with joint_2 at 0.378 rad against the demonstrations' minimum of 0.395 sent the controller
    into its fallback).
    """
    if contract.action and all(f.limits is not None for f in contract.action):
        return {"action_limit_low": [x for f in contract.action for x in f.limits.lower],
                "action_limit_high": [x for f in contract.action for x in f.limits.upper]}
    names = read_config(directory)["config"].get("action_names") or []
    if list(names) != list(gen3.JOINT_NAMES):
        return {}
    return {"action_limit_low": gen3.JOINT_LOWER.tolist(), "action_limit_high": gen3.JOINT_UPPER.tolist()}


def run(args: argparse.Namespace) -> int:
    directory: Path = args.checkpoint
    for name in (CONFIG, WEIGHTS):
        if not (directory / name).is_file():
            raise UserError(f"{directory} is not a checkpoint directory (no {name})")
    if args.out is not None and args.out.suffix != ".onnx":
        raise UserError(f"--out must name an .onnx file, got {args.out}")
    if args.parity_samples < 0 or args.teacher_steps < 1:
        raise UserError("--parity-samples must be >= 0 and --teacher-steps >= 1")
    meta = read_config(directory)
    contract = checkpoint_contract(meta["method"], meta["config"])
    result = export_checkpoint(directory, args.out, ood_threshold=args.ood_threshold,
                               metadata_extra=action_limits(directory, contract), parity_samples=args.parity_samples,
                               teacher_steps=args.teacher_steps, contract=contract)
    _record_in_card(directory, result)
    ok = True
    rows = [(result.policy_path, result.policy_sha256, result.parity)]
    if result.denoiser_path is not None:
        rows.append((result.denoiser_path, result.denoiser_sha256, result.denoiser_parity))
    for path, sha, parity in rows:
        print(f"export: {path} (opset {OPSET}, sha256 {sha}, contract of task {result.contract.task!r})")
        if parity is not None:
            errs = ", ".join(f"{k} {v:.2e}" for k, v in parity.max_abs.items())
            verdict = "ok" if parity.ok else "FAILED"
            print(f"parity: ONNX Runtime vs PyTorch on {parity.samples} random inputs, max abs {errs} "
                  f"(tolerance {PARITY_TOL:g}): {verdict}")
            ok = ok and parity.ok
    return 0 if ok else 1
