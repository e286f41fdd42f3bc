"""The `scm-relay` command line.

argparse (standard library) parses it: the commands take few options, and
settings come from the environment through `service.settings`, not from flags.
Subcommands are added here as the parts they drive exist.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import BinaryIO

from service import __version__
from service.settings import SettingsError, load_settings

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2


def build_parser() -> argparse.ArgumentParser:
    """Return the parser for every `scm-relay` subcommand."""
    parser = argparse.ArgumentParser(
        prog="scm-relay",
        description=(
            "Relay SCM-change events from Kafka to the Scantrust async SCM upload API, "
            "follow each server task to its end and publish the outcome. "
            "Settings are SCM_RELAY_* environment variables (docs/settings.md)."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    validate = commands.add_parser(
        "validate",
        help="validate JSON-lines change events offline",
        description=(
            "Validate change events, one JSON object per line, with the relay's own rules "
            "and limits. Prints one JSON verdict per line to stdout and a summary to stderr; "
            "exits 1 if any line is invalid. Blank lines are skipped."
        ),
    )
    validate.add_argument(
        "file", nargs="?", default="-", help="a JSON-lines file, or - for standard input"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "validate":
        return _validate(args.file)
    parser.print_help()
    return EXIT_USAGE


def _validate(file: str) -> int:
    from service.validate import validate_stream

    try:
        settings = load_settings(os.environ)
    except SettingsError as exc:
        print(f"scm-relay: {exc}", file=sys.stderr)
        return EXIT_USAGE
    with ExitStack() as stack:
        source: BinaryIO
        if file == "-":
            source = sys.stdin.buffer
        else:
            try:
                source = stack.enter_context(Path(file).open("rb"))
            except OSError as exc:
                print(f"scm-relay validate: cannot read {file}: {exc.strerror}", file=sys.stderr)
                return EXIT_USAGE
        summary = validate_stream(source, sys.stdout, settings.contract_limits())
    print(f"scm-relay validate: {summary.describe()}", file=sys.stderr)
    return EXIT_OK if summary.invalid == 0 else EXIT_INVALID
