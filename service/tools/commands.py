"""The tools' subcommands' parsers (argparse only, so `scm-relay --help` stays quick);
service/cli.py's table dispatches them."""

from __future__ import annotations

import argparse
from typing import Any

JSON_HELP = "print one JSON document (for scripts) instead of a table"


def positive(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def add_check(commands: Any) -> None:
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


def add_dlq(commands: Any) -> None:
    dlq = commands.add_parser(
        "dlq",
        help="list dead letters; replay them (originals or fixed records) to the input topic",
        description="Inspect the dead-letter topic (SCM_RELAY_DLQ_TOPIC) and replay from it.",
    )
    actions = dlq.add_subparsers(dest="dlq_command", metavar="ACTION", required=True)
    listing = actions.add_parser(
        "list",
        help="the dead letters: offset, time, reason, field, message, source, replayed",
        description="List dead letters (the newest --limit), with when each was replayed.",
    )
    replay = actions.add_parser(
        "replay",
        help="republish dead letters (or fixed records) to the input topic, once",
        description=(
            "Republish the selected dead letters' originals, or the corrected records of "
            "--fixed, to the input topic with provenance headers, in one transaction that also "
            "marks each as replayed (so it is not replayed twice unless --force). Each record "
            "is judged by the contract first: one that would be refused again refuses the "
            "whole replay. Exit 0 replayed, 1 refused (nothing published), 2 usage, 3 Kafka."
        ),
    )
    for parser in (listing, replay):
        parser.add_argument("--reason", help="only this reason code (e.g. scm_data_key_status)")
        parser.add_argument("--since", help="only since: 30m, 2h, 7d, or an ISO date or time")
        parser.add_argument("--json", action="store_true", help=JSON_HELP)
    listing.add_argument("--limit", type=positive, default=50, help="show the newest N (50)")
    replay.add_argument(
        "--offsets", metavar="A-B", help="dead-letter offsets A to B (P:A-B for partition P)"
    )
    replay.add_argument(
        "--fixed",
        metavar="FILE",
        help='JSON lines {"offset": N, "event": {...}}: the corrected record of dead letter N',
    )
    replay.add_argument("--dry-run", action="store_true", help="judge and list; publish nothing")
    replay.add_argument("--force", action="store_true", help="replay what was replayed before")


def add_tasks(commands: Any) -> None:
    tasks = commands.add_parser(
        "tasks",
        help="tasks as the ledger, the API and the results topic see them",
        description=(
            "Read the ledger (SCM_RELAY_TASKS_TOPIC) and the results topic to their end, and "
            "ask the API (show, group). Exit 0 found, 1 not found, 2 usage, 3 Kafka failed."
        ),
    )
    actions = tasks.add_subparsers(dest="tasks_command", metavar="ACTION", required=True)
    listing = actions.add_parser("list", help="tasks: open (followed), complete, failed")
    listing.add_argument("--state", choices=["open", "complete", "failed", "short"])
    listing.add_argument("--reference", help="only tasks with this reference")
    listing.add_argument("--limit", type=positive, default=50, help="show the newest N (50)")
    show = actions.add_parser(
        "show", help="one task: ledger record, API detail and result side by side, its events"
    )
    show.add_argument("task_id")
    group = actions.add_parser("group", help="a reference: the API's task group and its tasks")
    group.add_argument("reference")
    for parser in (listing, show, group):
        parser.add_argument("--json", action="store_true", help=JSON_HELP)
