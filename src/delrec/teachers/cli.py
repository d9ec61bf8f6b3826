"""Sub-commands of this module (filled in as the stage lands)."""

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this module's sub-commands."""
