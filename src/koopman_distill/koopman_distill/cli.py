"""``koopman-distill``: the offline pipeline's command line.

Each subcommand lives in its own module under ``koopman_distill.commands`` and registers its parser;
errors a user can fix (missing files, bad names) exit with status 2 and one clear line.
"""

from __future__ import annotations

import argparse
import importlib
import shlex
import sys

COMMANDS = (
    "teacher", "visit", "teacher_data", "student", "eval", "export", "bench", "table", "camera", "bag_to_dataset",
)


class UserError(Exception):
    """An error in the user's input: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="koopman-distill", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"koopman_distill.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
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
