"""The ``delrec`` command: one sub-command per pipeline stage, plus data and store utilities.

Each stage module contributes its sub-commands through a ``register(subparsers)`` function; this
module only assembles them, adds ``--force`` to every command that writes an output folder, checks
that output before any work starts (an existing folder is replaced only if it is a delrec output,
never if it is one of the command's inputs), and turns a DelrecError or an OS error into a clear
one-line message and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

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
    for command in _leaf_parsers(parser):
        if any(action.dest == "out" for action in command._actions) and not any(
            action.dest == "force" for action in command._actions
        ):
            command.add_argument(
                "--force",
                action="store_true",
                help="replace --out even if it is not a delrec output (never one of the inputs)",
            )
    return parser


def _leaf_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every (sub-)command parser that has no sub-commands of its own."""
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):
                found.extend(_leaf_parsers(child))
    return found or [parser]


def _inputs(args: argparse.Namespace) -> list[str]:
    """The command's arguments that name existing local paths (or ``file://`` URLs) other than its output:
    never replaced."""
    from delrec.artifacts import local_path

    found = []
    for name, value in vars(args).items():
        values = value if isinstance(value, list) else [value]
        for item in values:
            if name in ("out", "dest") or not isinstance(item, str) or not item:
                continue
            path = local_path(item)
            if path is not None and path.exists():
                found.append(item)
    return found


def _check_output(args: argparse.Namespace) -> None:
    """Refuse a bad ``--out`` before any work is done, and record ``--force`` for the final write."""
    from delrec.artifacts import allow_replace, check_out

    force = bool(getattr(args, "force", False))
    out = getattr(args, "out", None)
    if isinstance(out, str):
        check_out(out, force=force, protect=_inputs(args))
    target = out if isinstance(out, str) else getattr(args, "dest", None)
    if force and isinstance(target, str):
        allow_replace(target)


def _user_path(path: str, out: str | None) -> str:
    """``path``, or ``out`` where ``path`` is our temporary name beside it (the user never typed that)."""
    if out and Path(path).parent == Path(out).parent and Path(path).name.startswith(f".{Path(out).name}."):
        return out
    return path


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Under torchrun every process runs this: only rank 0 tells the story, the others report trouble.
    quiet = int(os.environ.get("RANK", "0")) > 0
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    seed = getattr(args, "seed", None)
    try:
        if isinstance(seed, int) and seed < 0:
            raise DelrecError(f"must be 0 or more, got {seed}", field="seed")
        _check_output(args)
        args.handler(args)
    except DelrecError as exc:
        print(f"delrec {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # disk full, permission denied, a path that vanished: no traceback
        where = f"{_user_path(exc.filename, getattr(args, 'out', None))}: " if exc.filename else ""
        print(f"delrec {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"delrec {args.command}: interrupted; re-run to resume", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.verbose:
            raise
        print(
            f"delrec {args.command}: internal error: {type(exc).__name__}: {exc} "
            "(a bug: please report it; -v shows the traceback)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
