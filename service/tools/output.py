"""How the tools print: a rich table on a terminal (or when asked), JSON for scripts.

rich draws the tables: it measures wide cells and wraps them, which hand-padded
columns do not. Every string printed passes `redact`, so no secret of the settings
reaches the screen even when an error message quotes one, and then
`service.tools.terminal`: cells and titles are rich `Text` (never read as markup), with
control and format characters shown as escapes.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final, TextIO

from rich.console import Console
from rich.progress import Progress
from rich.table import Table
from rich.text import Text

from service.logs import Redactor, configure_logging
from service.settings import Settings, SettingsError, load_settings, secrets
from service.tools.terminal import cut, json_text, printable


def quiet_logs(log_level: str, secrets: Iterable[str]) -> None:
    """A tool reports what went wrong itself: the relay's log lines (and aiokafka's) would
    repeat it on stderr. They show only with SCM_RELAY_LOG_LEVEL=DEBUG."""
    level = "DEBUG" if log_level.upper() == "DEBUG" else "CRITICAL"
    configure_logging("console", level, secrets)
    logging.getLogger("aiokafka").setLevel(logging.getLevelName(level))


def tool_start(command: str, as_json: bool) -> tuple[Settings, Printer] | None:
    """A tool's settings (as the relay reads them) and its printer, its logs quieted; None
    when the settings are invalid (said on stderr: the tool exits 2)."""
    try:
        settings = load_settings(os.environ)
    except SettingsError as exc:
        print(f"scm-relay {command}: {exc}", file=sys.stderr)
        return None
    quiet_logs(settings.operations.log_level, secrets(settings))
    return settings, Printer(as_json=as_json, secrets=secrets(settings))


PROSE_COLUMNS: Final = frozenset({"message", "problem", "found", "fix", "reference"})
IDENTIFIER_COLUMNS: Final = frozenset({"task_id", "event_id", "offset", "check"})


class Printer:
    """Prints rows as a table (`--json`: one JSON document) with secrets removed."""

    def __init__(
        self, *, as_json: bool, secrets: Iterable[str] = (), stream: TextIO | None = None
    ) -> None:
        self.as_json = as_json
        self._redactor = Redactor(str, secrets)  # the log lines' rule: the same forms
        self._stream = stream or sys.stdout
        self._console = Console(file=self._stream, soft_wrap=False, highlight=False)

    def redact(self, text: str) -> str:
        return self._redactor.redact(text)

    def _clean(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, Mapping):
            return {key: self._clean(item) for key, item in value.items()}
        if isinstance(value, list | tuple):
            return [self._clean(item) for item in value]
        return value

    def table(self, title: str, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
        """`rows` keyed by column name; JSON prints them all, whole."""
        if self.as_json:
            self.json(list(rows))
            return
        table = Table(title=self._text(title), title_justify="left", show_lines=False)
        for column in columns:
            # Prose wraps first; identifiers keep their line (they are copied and pasted).
            if column in PROSE_COLUMNS:
                table.add_column(column, overflow="fold", ratio=1, min_width=16)
            elif column in IDENTIFIER_COLUMNS:
                table.add_column(column, no_wrap=True)
            else:
                table.add_column(column, overflow="fold")
        for row in rows:
            table.add_row(*(self._cell(row.get(column)) for column in columns))
        self._console.print(table)

    def _text(self, text: str, *, keep_newlines: bool = False) -> Text:
        """Printed as it is: redacted, escaped, and never read as rich markup."""
        return Text(printable(self.redact(text), keep_newlines=keep_newlines))

    def _cell(self, value: Any) -> Text:
        if value is None:
            return Text("-")
        if isinstance(value, dict | list):
            # JSON escapes a line feed inside a value; one outside is ours.
            return self._text(cut(json_text(value)))
        return self._text(cut(str(value)), keep_newlines=True)

    def json(self, document: Any) -> None:
        self._stream.write(json_text(self._clean(document)))
        self._stream.write("\n")

    def progress(self, what: str, total: int) -> Callable[[int | None], None]:
        """A progress bar on a terminal's stderr (none for --json or a pipe): call the
        returned function with the steps done, and with None to end it."""
        if self.as_json or not sys.stderr.isatty():
            return lambda _steps: None
        bar = Progress(console=Console(file=sys.stderr), transient=True)
        task = bar.add_task(what, total=total)
        bar.start()

        def advance(steps: int | None) -> None:
            if steps is None:
                bar.stop()
            else:
                bar.advance(task, steps)

        return advance

    def error(self, text: str) -> None:
        """A line on stderr (also with --json): an error message may quote a secret (a
        Kafka error naming a credential) or data."""
        print(printable(self.redact(text)), file=sys.stderr)

    def line(self, text: str) -> None:
        """A line of prose (ignored with --json, whose document says it all)."""
        if not self.as_json:
            self._console.print(self._text(text))
