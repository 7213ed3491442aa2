"""Arguments and steps shared by the training subcommands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from koopman_distill.train import STATE_META, STATE_WEIGHTS, TrainConfig


def add_train_args(parser: argparse.ArgumentParser, steps: int, lr: float, batch_size: int = 256) -> None:
    parser.add_argument("--out", required=True, type=Path, help="checkpoint directory to write")
    parser.add_argument("--steps", type=int, default=steps, help=f"optimiser steps (default {steps})")
    parser.add_argument("--batch-size", type=int, default=batch_size)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from the state saved in --out")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a field of the policy's config (repeatable), e.g. operator=decomposed")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch intra-op threads (0: torch's default); on a loaded machine one thread trains "
                             "faster than two that fight")


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The training loop's settings; also sets ``--threads``."""
    if args.steps < 1 or args.batch_size < 1 or args.threads < 0:
        raise ValueError("--steps and --batch-size must be positive, --threads >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    return TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                       save_every=max(100, args.steps // 10))


def config_overrides(pairs: list[str], fields: dict[str, Any]) -> dict[str, Any]:
    """Parse ``FIELD=VALUE`` pairs with the type of each field's current value."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"--set {pair!r}: expected FIELD=VALUE with FIELD one of {sorted(fields)}")
        current = fields[key]
        if isinstance(current, bool):
            out[key] = raw.lower() in ("1", "true", "yes")
        elif isinstance(current, tuple | list):
            out[key] = tuple(int(v) for v in raw.split(","))
        else:
            out[key] = type(current)(raw)
    return out


def finish(out: Path, card: dict[str, Any]) -> None:
    """Write the model card beside the checkpoint and drop the resumable state."""
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    for name in (STATE_WEIGHTS, STATE_META):
        (out / name).unlink(missing_ok=True)
