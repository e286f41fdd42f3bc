"""One dispatch table: every subcommand the parser offers is in `COMMANDS` (in the order
`--help` lists them), and each tool's command runs its module's `run` with the parsed
arguments and returns its exit code."""

from __future__ import annotations

import argparse

import pytest

from service import cli
from service.tools import check, dlq, publish, tasks


def test_the_table_names_every_subcommand_of_the_parser_in_order() -> None:
    parser = cli.build_parser()
    (subparsers,) = (
        action
        for action in parser._actions  # argparse lists its subcommands nowhere public
        if isinstance(action, argparse._SubParsersAction)
    )
    assert list(subparsers.choices) == list(cli.COMMANDS)
    assert list(cli.COMMANDS) == [
        "run",
        "demo",
        "validate",
        "simulator",
        "check",
        "publish",
        "dlq",
        "tasks",
    ]


@pytest.mark.parametrize(
    ("module", "argv"),
    [
        (check, ["check", "--json"]),
        (publish, ["publish", "events.jsonl", "--dry-run"]),
        (dlq, ["dlq", "list", "--limit", "3"]),
        (tasks, ["tasks", "show", "t-1"]),
    ],
)
def test_a_tool_command_runs_its_module_with_the_parsed_arguments(
    monkeypatch: pytest.MonkeyPatch, module: object, argv: list[str]
) -> None:
    seen: list[argparse.Namespace] = []

    def run(args: argparse.Namespace) -> int:
        seen.append(args)
        return 17

    monkeypatch.setattr(module, "run", run)
    assert cli.main(argv) == 17
    (args,) = seen
    assert args.command == argv[0]
