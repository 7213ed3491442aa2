"""``koopman-distill``: the offline pipeline's command line.

Each subcommand lives in its own module under ``koopman_distill.commands`` and registers its parser;
errors a user can fix (missing files, bad names) exit with status 2 and one clear line.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys


class UserError(Exception):
    """An error in the user's input: printed as one line, exit status 2."""


#: Subcommand -> one-line help. Each lives in ``koopman_distill.commands.<name with _>`` and registers its parser
#: with this help; only the command being run is imported, so ``--help`` and the list need no torch.
COMMANDS: dict[str, str] = {
    "teacher": "train the diffusion teacher on a demonstration dataset",
    "visit": "roll a policy out and record the observation histories it meets",
    "teacher-data": "run the teacher's sampler over the dataset's observations",
    "student": "distil the teacher into a one-step student",
    "eval": "evaluate policies in closed loop and against the teacher",
    "export": "export a checkpoint to ONNX and check parity with PyTorch",
    "fidelity": "how closely students reproduce the teacher's noise-to-chunk map",
    "bench": "batch-1 latency (p50/p99) of the ONNX students and the teacher",
    "table": "join eval and bench results of every task into one table",
    "bag-to-dataset": "convert recorded bags into a demonstration dataset (HDF5)",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with ``command``'s arguments registered (its module imported); the others listed only."""
    parser = argparse.ArgumentParser(prog="koopman-distill", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        if name == command:
            importlib.import_module(f"koopman_distill.commands.{name.replace('-', '_')}").register(sub)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def _command(argv: list[str]) -> str | None:
    """The subcommand ``argv`` names (its first word that is not an option), if it is one."""
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if first in COMMANDS else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(_command(argv)).parse_args(argv)
    args.command_line = " ".join(["koopman-distill", *map(shlex.quote, argv)])
    try:
        return int(args.func(args) or 0)
    except (UserError, FileNotFoundError, ValueError) as err:
        print(f"koopman-distill {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"koopman-distill {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
