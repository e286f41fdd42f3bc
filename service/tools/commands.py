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
    add_publish(commands)


def add_publish(commands: Any) -> None:
    publish = commands.add_parser(
        "publish",
        help="publish change events from a CSV (campaign template layout) or JSON lines",
        description=(
            "Validate every event of FILE with the relay's contract, then publish them all "
            "in one Kafka transaction (acks=all) to the input topic: nothing is published "
            "when a row is invalid (unless --skip-invalid) or Kafka fails. A CSV has a header "
            "row, one constraint column (the first unless --constraint) and SCM-key columns, "
            "one code per row, an empty cell leaving a field unchanged; rows with the same "
            "data become events of up to --values-per-event values. Event ids come from the "
            "file's SHA-256 and line. Exit 0 published, 1 invalid rows, 2 usage, 3 Kafka."
        ),
    )
    publish.add_argument("file", help="a .csv or .jsonl file, or - for standard input")
    publish.add_argument("--format", choices=["csv", "jsonl"], help="default: by extension")
    publish.add_argument("--topic", help="default: SCM_RELAY_INPUT_TOPIC")
    publish.add_argument("--campaign", type=int, help="the campaign id of every event")
    publish.add_argument("--reference", help="the reference of every event")
    publish.add_argument("--constraint", metavar="KEY", help="the CSV's constraint column")
    publish.add_argument(
        "--values-per-event", type=int, default=1000, help="values per event from a CSV (1000)"
    )
    publish.add_argument(
        "--skip-invalid", action="store_true", help="publish the valid events, skip the rest"
    )
    publish.add_argument(
        "--ordered",
        action="store_true",
        help="key every event by the file: one partition, the file's order kept",
    )
    publish.add_argument("--dry-run", action="store_true", help="validate only; publish nothing")
    publish.add_argument("--json", action="store_true", help=JSON_HELP)


def run(args: argparse.Namespace) -> int | None:
    """Run the tool `args` names; None when it names none."""
    if args.command == "check":
        from service.tools import check

        return check.run(args)
    if args.command == "publish":
        from service.tools import publish

        return publish.run(args)
    return None
