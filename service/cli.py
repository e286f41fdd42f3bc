"""The `scm-relay` command line.

argparse (standard library) parses it: the commands take few options, and
settings come from the environment through the settings class, not from flags.
Subcommands are added here as the parts they drive exist.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from service import __version__


def build_parser() -> argparse.ArgumentParser:
    """Return the parser for every `scm-relay` subcommand."""
    parser = argparse.ArgumentParser(
        prog="scm-relay",
        description=(
            "Relay SCM-change events from Kafka to the Scantrust async SCM upload API, "
            "follow each server task to its end and publish the outcome."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    parser.error(f"unknown command {args.command!r}")
    return 2  # pragma: no cover - parser.error exits
