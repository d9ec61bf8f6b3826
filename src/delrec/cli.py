"""The ``delrec`` command: one sub-command per pipeline stage, plus data and store utilities.

Each stage module contributes its sub-commands through a ``register(subparsers)`` function; this
module only assembles them, sets up logging and turns a DelrecError into a clear one-line message
and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from delrec import __version__
from delrec.errors import DelrecError

# Modules with a register(subparsers) function, in the order their commands appear in --help.
COMMAND_MODULES = (
    "delrec.data.cli",
    "delrec.teachers.cli",
    "delrec.llm.cli",
    "delrec.store_cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="delrec",
        description=(
            "DELRec: distil a sequential recommender's pattern into an LLM's soft prompt. "
            "Stages, in pipeline order: preprocess -> train-teacher -> distill -> finetune -> evaluate. "
            "Each reads the previous stages' output folders and writes its own atomically."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"delrec {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        args.handler(args)
    except DelrecError as exc:
        print(f"delrec {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"delrec {args.command}: interrupted; re-run to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
