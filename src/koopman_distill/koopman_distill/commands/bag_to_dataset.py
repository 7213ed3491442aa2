"""``koopman-distill bag-to-dataset``: recorded rosbag2 runs -> a demonstration dataset for training.

Turns bags recorded with ``koopman-control record`` (on the real arm or in simulation) into the HDF5 format of
``koopman_sim.dataset``, so ``koopman-distill teacher --data`` trains on them. What a row holds is a task's
contract (``--task-file``, a YAML file naming the observation's and the action's topics and fields; default the
reach task): observations are rebuilt as the live ingest builds them, actions are the commanded joint targets at
the task's rate (or the next measured position for bags without commands), and the contract goes into the
dataset and from there into every model trained on it. See :mod:`koopman_control.bag.dataset` for the exact
derivation. Reading bags needs ``koopman_control`` (and its ``rosbags`` dependency), not a ROS installation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from koopman_distill.cli import COMMANDS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bag-to-dataset", help=COMMANDS["bag-to-dataset"],
                       description=__doc__.split("\n\n")[1].replace("\n", " "),
                       epilog="example:\n  koopman-distill bag-to-dataset runs/demos --task-file my_task.yaml "
                              "--out data/my_demos.h5", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bags", nargs="+", type=Path, help="bag folders (or .mcap/.db3 files)")
    p.add_argument("--out", required=True, type=Path, help="HDF5 file to write")
    p.add_argument("--task-file", default="", help="the task's contract (YAML) or a built-in task's name "
                                                    "(default: gen3_reach_obstacle)")
    p.add_argument("--action-source", choices=("auto", "chunk", "next_q"), default="auto",
                   help="chunk: recorded /policy/action_chunk commands; next_q: next measured position; "
                        "auto: chunk when recorded (default)")
    p.add_argument("--min-steps", type=int, default=2, help="drop episode segments shorter than this (default 2)")
    p.add_argument("--successful-only", action="store_true", help="keep only episodes reported successful")
    p.add_argument("--allow-unsorted", action="store_true", help="drop samples whose stamps go backwards")
    p.add_argument("--json", default=None, metavar="OUT", help="write the summary here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        from koopman_control.bag.dataset import bags_to_dataset
        from koopman_control.contracts import resolve_contract
    except ImportError as err:
        raise ValueError(f"reading bags needs the koopman_control package ({err})") from None
    contract = resolve_contract(args.task_file)
    summary = bags_to_dataset(args.bags, args.out, contract=contract, action_source=args.action_source,
                              min_steps=args.min_steps, successful_only=args.successful_only,
                              allow_unsorted=args.allow_unsorted)
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    print(f"bag-to-dataset: {summary['rows']} steps in {summary['episodes']} episodes of task {contract.task} from "
          f"{len(args.bags)} bag(s) -> {summary['out']} (actions from "
          f"{', '.join(sorted(set(summary['action_source'].values())))})")
    return 0
