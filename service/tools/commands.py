"""The tools' subcommands: their parsers (argparse only, so `scm-relay --help` stays
quick), and the dispatch to the module that runs each, imported when it runs."""

from __future__ import annotations

import argparse
from typing import Any

JSON_HELP = "print one JSON document (for scripts) instead of a table"


def add_parsers(commands: Any) -> None:
    """Add `check`, `publish`, `dlq` and `tasks` to the CLI's subparsers."""
    check = commands.add_parser(
        "check",
        help="check the settings, Kafka, the topics, the group's rights and the API token",
        description=(
            "Probe every dependency with the relay's own settings (SCM_RELAY_* variables): "
            "settings valid, Kafka reachable, topics present with sound configs, the group's "
            "and the transactional rights, the API token (GET /api/v2/me/). One line per "
            "check with what to fix. Exit 0 only when every check passes (warnings pass), 1 "
            "otherwise; never prints a secret."
        ),
    )
    check.add_argument("--json", action="store_true", help=JSON_HELP)


def run(args: argparse.Namespace) -> int | None:
    """Run the tool `args` names; None when it names none."""
    if args.command == "check":
        from service.tools import check

        return check.run(args)
    return None
