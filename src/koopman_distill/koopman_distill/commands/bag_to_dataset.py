"""``koopman-distill bag-to-dataset``: recorded rosbag2 runs -> a demonstration dataset for training.

Turns bags recorded with ``koopman-control record`` (on the real arm or in simulation) into the HDF5 format of
``koopman_sim.dataset``, so ``koopman-distill teacher --data`` retrains on them. Observations are rebuilt as the
live ingest builds them; actions are the commanded joint targets at the policy rate (or the next measured
position for bags without commands): see :mod:`koopman_control.bag.dataset` for the exact derivation.
Reading bags needs ``koopman_control`` (and its ``rosbags`` dependency), not a ROS installation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bag-to-dataset", help="convert recorded bags into a demonstration dataset (HDF5)")
    p.add_argument("bags", nargs="+", type=Path, help="bag folders (or .mcap/.db3 files)")
    p.add_argument("--out", required=True, type=Path, help="HDF5 file to write")
    p.add_argument("--action-source", choices=("auto", "chunk", "next_q"), default="auto",
                   help="chunk: recorded /policy/action_chunk commands; next_q: next measured position; "
                        "auto: chunk when recorded (default)")
    p.add_argument("--policy-rate", type=float, default=10.0, help="rows per second = the policy rate (default 10)")
    p.add_argument("--min-steps", type=int, default=2, help="drop episode segments shorter than this (default 2)")
    p.add_argument("--successful-only", action="store_true", help="keep only episodes reported successful")
    p.add_argument("--allow-unsorted", action="store_true", help="drop samples whose stamps go backwards")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        from koopman_control.bag.dataset import bags_to_dataset
    except ImportError as err:
        raise ValueError(f"reading bags needs the koopman_control package ({err})") from None
    if not args.policy_rate > 0:
        raise ValueError("--policy-rate must be positive")
    summary = bags_to_dataset(args.bags, args.out, policy_rate_hz=args.policy_rate, action_source=args.action_source,
                              min_steps=args.min_steps, successful_only=args.successful_only,
                              allow_unsorted=args.allow_unsorted)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"bag-to-dataset: {summary['rows']} steps in {summary['episodes']} episodes from {len(args.bags)} "
              f"bag(s) -> {summary['out']} (actions from {', '.join(sorted(set(summary['action_source'].values())))})")
    return 0
