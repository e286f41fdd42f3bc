"""The `scm-relay` command line.

argparse (standard library) parses it: the commands take few options, and
settings come from the environment through `service.settings`, not from flags.
One table, `COMMANDS`, names every subcommand with what adds its parser and what
runs it; the runners import what they drive only when they run.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final

from service import __version__, early_signals
from service.settings import SettingsError, load_settings
from service.tools import commands as tools

EXIT_OK = 0
EXIT_INVALID = 1
EXIT_USAGE = 2
# The development kit (the repository's `devkit` package: simulator, demo, generators),
# which the production wheel and image leave out: imported only when its command runs.
DEVELOPMENT_KIT = "devkit"


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
    for command in COMMANDS.values():
        command.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command = COMMANDS.get(args.command)
    if command is None:
        parser.print_help()
        return EXIT_USAGE
    return command.run(args)


def _add_run(commands: Any) -> None:
    commands.add_parser(
        "run",
        help="run the relay (settings from SCM_RELAY_* variables)",
        description=(
            "Consume change events, submit them to the Scantrust API, follow each task and "
            "publish its outcome, until SIGTERM or SIGINT. See docs/settings.md."
        ),
    )


def _add_demo(commands: Any) -> None:
    demo = commands.add_parser(
        "demo",
        help="run the relay end to end locally (Kafka, simulator, sample events) and summarise",
        description=(
            "Start a local Kafka broker and the API simulator on loopback, run the relay "
            "against them, publish sample events from several production lines, wait for every "
            "result, print a summary and stop everything it started. It never reads the "
            "SCM_RELAY_* relay settings: it cannot reach a real cluster or the real API. "
            "A development tool: from a source checkout only (`make demo`)."
        ),
    )
    demo.add_argument("--quick", action="store_true", help="fewer events (about a minute)")


def _add_validate(commands: Any) -> None:
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


def _add_simulator(commands: Any) -> None:
    simulator = commands.add_parser(
        "simulator",
        help="run a local simulator of the Scantrust SCM API (not Scantrust)",
        description=(
            "Run a LOCAL SIMULATION of the documented Scantrust SCM upload API for tests, "
            "demos and teams without a staging account. It is not Scantrust and changes no "
            "real codes. Prints its base URL on stdout once it listens; stops on SIGINT/SIGTERM. "
            "A development tool: from a source checkout only. See docs/scantrust-api.md."
        ),
    )
    simulator.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    simulator.add_argument("--port", type=int, default=8000, help="port (8000; 0 picks one)")
    simulator.add_argument(
        "--token", help="the UAT token it accepts (default: SCM_RELAY_API_TOKEN)"
    )
    simulator.add_argument("--seed", type=Path, help="JSON file of campaigns and codes")
    simulator.add_argument(
        "--codes-per-campaign",
        type=int,
        help="codes per campaign of the built-in seed (when --seed is not given)",
    )
    simulator.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="KNOB=VALUE",
        help="a fault knob at start, e.g. --fault error_rate=0.1 (repeatable; GET /_sim/faults)",
    )
    simulator.add_argument("--rng-seed", type=int, default=0, help="seed of the fault dice (0)")


def _run(_args: argparse.Namespace) -> int:
    # SIGTERM and SIGINT are remembered from the entry point's first line (or from here,
    # when `main` is called directly) and honoured once the relay's own handlers are in
    # place (service/early_signals.py).
    signalled = early_signals.capture()
    try:
        from service.app import main as run_main

        try:
            settings = load_settings(os.environ)
        except SettingsError as exc:
            print(f"scm-relay: {exc}", file=sys.stderr)
            return EXIT_USAGE
        return run_main(settings, signalled)
    finally:
        early_signals.release()


def _validate(args: argparse.Namespace) -> int:
    from service.tools.validate import validate_stream

    file: str = args.file

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
        summary = validate_stream(source, sys.stdout, settings.limits)
    print(f"scm-relay validate: {summary.describe()}", file=sys.stderr)
    return EXIT_OK if summary.invalid == 0 else EXIT_INVALID


def _demo(args: argparse.Namespace) -> int:
    def demo() -> int:
        from devkit.demo import main as demo_main

        return demo_main(os.environ, quick=args.quick)

    return _from_development_kit(args.command, demo)


def _simulator(args: argparse.Namespace) -> int:
    def simulator() -> int:
        from devkit.simulator.command import main as simulator_main

        return simulator_main(args, os.environ)

    return _from_development_kit(args.command, simulator)


def _from_development_kit(command: str, run: Callable[[], int]) -> int:
    """`run()`, or one clear line and EXIT_USAGE when the development kit is not installed
    (the production wheel and image leave it out); any other missing module is an error
    of its own."""
    try:
        return run()
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] != DEVELOPMENT_KIT:
            raise
        print(
            f"scm-relay {command}: not part of this installation. It needs the "
            f"development kit (the `{DEVELOPMENT_KIT}` package of the repository), which the "
            "production wheel and image leave out: they hold the relay and the operator tools "
            "only. Install the kit from a source checkout with `make setup`, then run "
            f"`.venv/bin/scm-relay {command}` (or `make demo` for the demo).",
            file=sys.stderr,
        )
        return EXIT_USAGE


# Each tool's module is imported when its command runs, so that `scm-relay --help` stays
# quick and imports neither Kafka's client nor the development kit.
def _check(args: argparse.Namespace) -> int:
    from service.tools import check

    return check.run(args)


def _publish(args: argparse.Namespace) -> int:
    from service.tools import publish

    return publish.run(args)


def _dlq(args: argparse.Namespace) -> int:
    from service.tools import dlq

    return dlq.run(args)


def _tasks(args: argparse.Namespace) -> int:
    from service.tools import tasks

    return tasks.run(args)


@dataclass(frozen=True)
class Command:
    """A subcommand: what adds its parser, and what runs it and returns the exit code."""

    add_parser: Callable[[Any], None]
    run: Callable[[argparse.Namespace], int]


# Every subcommand, in the order `scm-relay --help` lists them: the one dispatch table.
COMMANDS: Final[dict[str, Command]] = {
    "run": Command(_add_run, _run),
    "demo": Command(_add_demo, _demo),
    "validate": Command(_add_validate, _validate),
    "simulator": Command(_add_simulator, _simulator),
    "check": Command(tools.add_check, _check),
    "publish": Command(tools.add_publish, _publish),
    "dlq": Command(tools.add_dlq, _dlq),
    "tasks": Command(tools.add_tasks, _tasks),
}
