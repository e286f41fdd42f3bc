"""What `scm-relay publish` reads: change events from a CSV in the layout of a campaign's
template.csv, or from JSON lines. Pure: no Kafka, no I/O beyond the stream it is given.

A CSV has a header row; one column is the constraint (`extended_id`, `serial_number`,
or an SCM key used as a constraint such as `rfid`; the first column unless named),
the others are SCM keys; each row is one code, and an empty cell leaves that field
unchanged. Rows with the same SCM data become one event of up to `values_per_event`
values. Grouping holds at most `max_buffered_values` values: past that the oldest
group is sent as it is, so a file of any length is read in bounded memory, and the
events (and their ids) depend only on the file.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any, BinaryIO, Final

from service.core.contract import ChangeEvent
from service.core.contract_limits import ContractLimits
from service.core.parsing import ParsedEvent, parse_event
from service.core.reasons import Rejection
from service.tools.validate import read_line

DEFAULT_VALUES_PER_EVENT: Final = 1000  # the API's limit per request
DEFAULT_MAX_BUFFERED_VALUES: Final = 100_000
CONSTRAINT_COLUMNS: Final = ("extended_id", "serial_number")
# csv's own bound on one cell; a cell over the contract's value limit is refused anyway.
csv.field_size_limit(1 << 20)


class HeaderError(ValueError):
    """The header row cannot be used: nothing in the file is read further."""


@dataclass(frozen=True, slots=True)
class Problem:
    """Why line `line` (1 = the header) gives no event."""

    line: int
    reason: str
    message: str
    field: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "line": self.line,
            "reason": self.reason,
            "field": self.field,
            "message": self.message,
        }


@dataclass(slots=True)
class Draft:
    """An event as read, before its id (which needs the whole file's digest)."""

    first_line: int
    last_line: int
    document: dict[str, Any]
    values: int
    group: str  # identical SCM data, campaign and reference: the publish key

    def with_id(self, event_id: str) -> bytes:
        if "event_id" not in self.document:
            self.document["event_id"] = event_id
        return json.dumps(self.document, ensure_ascii=False, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Layout:
    """The header of a CSV: which column is the constraint, which are SCM keys."""

    columns: tuple[str, ...]
    constraint: int

    @property
    def constraint_key(self) -> str:
        return self.columns[self.constraint]


def read_layout(header: list[str], constraint: str | None, limits: ContractLimits) -> Layout:
    """Check the header row (BOM already removed) and return its layout."""
    columns = tuple(header)
    if not columns or not any(columns):
        raise HeaderError("the header row is empty: the first line must name the columns")
    for number, name in enumerate(columns, start=1):
        if not name:
            raise HeaderError(f"column {number} has no name")
        if name != name.strip():
            raise HeaderError(f"column {number} {name!r} has white space around its name")
    seen: dict[str, int] = {}
    for number, name in enumerate(columns, start=1):
        if name in seen:
            raise HeaderError(f"column {number} {name!r} repeats column {seen[name]}")
        seen[name] = number
    if constraint is None:
        index = 0
    elif constraint in seen:
        index = seen[constraint] - 1
    else:
        raise HeaderError(
            f"--constraint {constraint!r} is not a column (the columns: {', '.join(columns)})"
        )
    if len(columns) < 2:
        raise HeaderError(f"only the constraint column {columns[index]!r}: no SCM key to change")
    layout = Layout(columns, index)
    # The keys themselves are judged by the contract, once, here: an unknown or malformed
    # column is a header error, not one error per row.
    probe = {
        "constraints": {layout.constraint_key: ["probe"]},
        "scm_data": {name: "x" for i, name in enumerate(columns) if i != index},
    }
    verdict = parse_event(json.dumps(probe).encode(), limits)
    if isinstance(verdict, Rejection):
        raise HeaderError(f"{verdict.message} ({verdict.reason.value})")
    return layout


class _Group:
    __slots__ = ("first_line", "last_line", "values")

    def __init__(self) -> None:
        self.values: dict[str, int] = {}  # value -> its line
        self.first_line = 0
        self.last_line = 0


@dataclass
class CsvEvents:
    """Reads a CSV stream into drafts (`events()`), collecting row problems."""

    stream: IO[str]
    limits: ContractLimits
    constraint: str | None = None
    campaign: int | None = None
    reference: str | None = None
    values_per_event: int = DEFAULT_VALUES_PER_EVENT
    max_buffered_values: int = DEFAULT_MAX_BUFFERED_VALUES
    rows: int = 0
    problems: list[Problem] = field(default_factory=list)
    layout: Layout | None = None

    def events(self) -> Iterator[Draft]:
        reader = csv.reader(self.stream, strict=True)
        try:
            header = next(reader, None)
        except csv.Error as exc:
            raise HeaderError(f"line 1: {exc}") from exc
        if header is None:
            raise HeaderError("the file is empty: it needs a header row")
        self.layout = layout = read_layout(header, self.constraint, self.limits)
        groups: OrderedDict[tuple[tuple[str, str], ...], _Group] = OrderedDict()
        buffered = 0
        while True:
            try:
                row = next(reader, None)
            except csv.Error as exc:
                self.problems.append(Problem(reader.line_num, "csv_malformed", str(exc)))
                break  # strict csv cannot resync after a broken quote: stop at the break
            if row is None:
                break
            line = reader.line_num
            if not any(row):
                continue  # a blank line
            self.rows += 1
            parsed = self._row(line, row, layout)
            if parsed is None:
                continue
            value, data = parsed
            group = groups.get(data)
            if group is None:
                group = groups[data] = _Group()
                group.first_line = line
            elif value in group.values:
                self.problems.append(
                    Problem(
                        line,
                        "csv_duplicate_code",
                        f"{layout.constraint_key} {value!r} repeats line {group.values[value]} "
                        "with the same data",
                        layout.constraint_key,
                    )
                )
                continue
            group.values[value] = line
            group.last_line = line
            buffered += 1
            if len(group.values) >= self.values_per_event:
                del groups[data]
                buffered -= len(group.values)
                yield self._draft(data, group)
            while buffered > self.max_buffered_values:
                oldest_data, oldest = groups.popitem(last=False)
                buffered -= len(oldest.values)
                yield self._draft(oldest_data, oldest)
        for data, group in groups.items():
            yield self._draft(data, group)

    def _row(
        self, line: int, row: list[str], layout: Layout
    ) -> tuple[str, tuple[tuple[str, str], ...]] | None:
        if len(row) != len(layout.columns):
            self.problems.append(
                Problem(
                    line,
                    "csv_cell_count",
                    f"{len(row)} cells; the header has {len(layout.columns)}",
                )
            )
            return None
        value = row[layout.constraint]
        if not value:
            self.problems.append(
                Problem(
                    line,
                    "csv_no_constraint",
                    f"no {layout.constraint_key} value",
                    layout.constraint_key,
                )
            )
            return None
        data = tuple(
            (name, cell)
            for index, (name, cell) in enumerate(zip(layout.columns, row, strict=True))
            if index != layout.constraint and cell != ""
        )
        if not data:
            self.problems.append(
                Problem(line, "csv_nothing_to_change", "every SCM cell is empty: nothing to change")
            )
            return None
        return value, data

    def _draft(self, data: tuple[tuple[str, str], ...], group: _Group) -> Draft:
        key = self.layout.constraint_key if self.layout else ""
        document: dict[str, Any] = {
            "constraints": {key: list(group.values)},
            "scm_data": dict(data),
        }
        if self.campaign is not None:
            document["campaign"] = self.campaign
        if self.reference is not None:
            document["reference"] = self.reference
        group_key = json.dumps([self.campaign, self.reference, key, data])
        return Draft(group.first_line, group.last_line, document, len(group.values), group_key)


@dataclass
class JsonLinesEvents:
    """Reads JSON lines (one change event per line) into drafts; `--campaign` and
    `--reference` fill events that lack them."""

    stream: BinaryIO
    limits: ContractLimits
    campaign: int | None = None
    reference: str | None = None
    rows: int = 0
    problems: list[Problem] = field(default_factory=list)

    def events(self) -> Iterator[Draft]:

        line = 0
        while (read := read_line(self.stream, self.limits.max_record_bytes)) is not None:
            line += 1
            raw, too_long = read
            if too_long:
                self.problems.append(
                    Problem(
                        line,
                        "record_too_large",
                        f"the line is longer than {self.limits.max_record_bytes} bytes",
                    )
                )
                continue
            if not raw.strip():
                continue
            self.rows += 1
            verdict = parse_event(raw, self.limits)
            if isinstance(verdict, Rejection):
                self.problems.append(problem_of(line, verdict))
                continue
            document = json.loads(raw)
            if self.campaign is not None:
                document.setdefault("campaign", self.campaign)
            if self.reference is not None:
                document.setdefault("reference", self.reference)
            event = verdict.event
            yield Draft(line, line, document, event.value_count, event_group(event))


def event_group(event: ChangeEvent) -> str:
    """What keys an event of JSON lines: campaign, reference, constraint keys, fields."""
    return json.dumps(
        [event.campaign, event.reference, sorted(event.constraints), sorted(event.scm_data.items())]
    )


def group_key(group: str) -> bytes:
    """The Kafka key of the events of one group (`publish`, and `dlq replay --fixed`)."""
    return hashlib.sha256(group.encode()).hexdigest()[:32].encode()


def problem_of(line: int, rejection: Rejection) -> Problem:
    return Problem(line, rejection.reason.value, rejection.message, rejection.field)


def judge(draft: Draft, event_id: str, limits: ContractLimits) -> tuple[bytes, Problem | None]:
    """The bytes to publish and, when the contract refuses them, why (on the first line)."""
    value = draft.with_id(event_id)
    verdict = parse_event(value, limits)
    if isinstance(verdict, ParsedEvent):
        return value, None
    return value, problem_of(draft.first_line, verdict)
