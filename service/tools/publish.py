"""`scm-relay publish`: change events from a CSV (a campaign's template.csv layout) or JSON
lines, validated by the relay's own contract, published in one Kafka transaction.

Three reads of the file, none holding it in memory: its SHA-256 (the events' ids are
`<format>-<first 16 hex of the digest>-<first line>`, so publishing the same file
again is recognisable), then every event judged (nothing is published when any row is
invalid, unless --skip-invalid), then the events sent. Standard input is spooled to a
temporary file first. The transaction (`acks=all`, idempotent; its id is
`<group>-publish-<digest>`, so a second publish of the same file fences the first) is
committed only when every event is written: an error or Ctrl-C publishes nothing.

Each event is keyed by its SCM data (campaign, reference, constraint key, fields), so
that the events of one file spread over the partitions; `--ordered` keys them all by
the file instead, one partition, in file order (for a file that changes one code
twice). Exit codes: 0 published (or, with --dry-run, all valid); 1 invalid rows,
nothing published; 2 a usage, file or settings error; 3 Kafka failed, nothing published.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO, Final

from service.core.contract_limits import ContractLimits
from service.settings import Settings
from service.tools.output import Printer, tool_start
from service.tools.sources import (
    CsvEvents,
    Draft,
    HeaderError,
    JsonLinesEvents,
    Problem,
    group_key,
    judge,
)

EXIT_PUBLISHED: Final = 0
EXIT_INVALID: Final = 1
EXIT_USAGE: Final = 2
EXIT_KAFKA: Final = 3
PROBLEMS_KEPT: Final = 1000  # the report lists these; the rest are counted
PROBLEMS_SHOWN: Final = 50
# Events are read (in a thread) and sent in steps of at most this many values: what a
# step holds (the drafts, their JSON, the producer's batches) is bounded whatever the
# file's length, about 10 MB.
SEND_STEP_VALUES: Final = 20_000
HEADER_SOURCE: Final = "scm_relay.publish.source"
HEADER_DIGEST: Final = "scm_relay.publish.sha256"
HEADER_LINES: Final = "scm_relay.publish.lines"


class UsageError(Exception):
    """The command cannot run as given (exit 2)."""


@dataclass
class Report:
    """What one publish found and did; the summary printed at the end."""

    source: str
    format: str
    sha256: str = ""
    topic: str = ""
    rows: int = 0
    events: int = 0
    values: int = 0
    invalid_rows: int = 0
    published_events: int = 0
    published_values: int = 0
    problems: list[Problem] = field(default_factory=list)
    reasons: Counter[str] = field(default_factory=Counter)
    transactional_id: str = ""
    seconds: float = 0.0

    def note(self, problem: Problem) -> None:
        self.invalid_rows += 1
        self.reasons[problem.reason] += 1
        if len(self.problems) < PROBLEMS_KEPT:
            self.problems.append(problem)

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "format": self.format,
            "sha256": self.sha256,
            "topic": self.topic,
            "rows": self.rows,
            "events": self.events,
            "values": self.values,
            "invalid": self.invalid_rows,
            "reasons": dict(self.reasons),
            "published_events": self.published_events,
            "published_values": self.published_values,
            "transactional_id": self.transactional_id,
            "seconds": round(self.seconds, 2),
            "problems": [problem.to_json() for problem in self.problems],
        }


@dataclass(frozen=True)
class Request:
    """The command line, checked."""

    path: Path
    source: str
    format: str
    topic: str
    limits: ContractLimits
    constraint: str | None
    campaign: int | None
    reference: str | None
    values_per_event: int
    skip_invalid: bool
    ordered: bool
    dry_run: bool


def run(args: argparse.Namespace) -> int:
    tool = tool_start("publish", args.json)
    if tool is None:
        return EXIT_USAGE
    settings, printer = tool
    with ExitStack() as stack:
        try:
            path = stack.enter_context(_readable(args.file))
            request = _request(args, path, settings, settings.limits)
        except UsageError as exc:
            printer.error(f"scm-relay publish: {exc}")
            return EXIT_USAGE
        started = time.monotonic()
        report = Report(source=request.source, format=request.format, topic=request.topic)
        try:
            code = _publish(request, settings, report, printer)
        except HeaderError as exc:
            printer.error(f"scm-relay publish: {request.source}: {exc}; nothing published")
            return EXIT_INVALID
        except UsageError as exc:
            printer.error(f"scm-relay publish: {exc}")
            return EXIT_USAGE
        report.seconds = time.monotonic() - started
        _print_report(report, request, printer, code)
        return code
    return EXIT_USAGE  # pragma: no cover - the with block always returns


def _request(
    args: argparse.Namespace, path: Path, settings: Settings, limits: ContractLimits
) -> Request:
    source = "standard input" if args.file == "-" else args.file
    fmt = args.format
    if fmt is None:
        suffix = Path(args.file).suffix.lower()
        if suffix == ".csv":
            fmt = "csv"
        elif suffix in (".jsonl", ".ndjson", ".json") or args.file == "-":
            fmt = "jsonl"
        else:
            raise UsageError(f"cannot tell the format of {args.file}: give --format csv|jsonl")
    if fmt == "jsonl" and args.constraint is not None:
        raise UsageError("--constraint names a CSV column; JSON lines carry their constraints")
    if not 1 <= args.values_per_event <= 1000:
        raise UsageError("--values-per-event must be 1 to 1000 (the API's limit per request)")
    if args.campaign is not None and args.campaign <= 0:
        raise UsageError("--campaign must be a positive campaign id")
    return Request(
        path=path,
        source=source,
        format=fmt,
        topic=args.topic or settings.kafka.input_topic,
        limits=limits,
        constraint=args.constraint,
        campaign=args.campaign,
        reference=args.reference,
        values_per_event=args.values_per_event,
        skip_invalid=args.skip_invalid,
        ordered=args.ordered,
        dry_run=args.dry_run,
    )


@contextmanager
def _readable(name: str) -> Iterator[Path]:
    """The file to read three times: the one named, or standard input spooled to disk."""
    if name != "-":
        path = Path(name)
        try:
            with path.open("rb"):
                pass
        except OSError as exc:
            raise UsageError(f"cannot read {name}: {exc.strerror}") from exc
        yield path
        return
    with tempfile.NamedTemporaryFile(prefix="scm-relay-publish-") as spool:
        shutil.copyfileobj(sys.stdin.buffer, spool, 1 << 20)
        spool.flush()
        yield Path(spool.name)


def file_digest(path: Path) -> str:
    with path.open("rb") as stream:
        return hashlib.file_digest(stream, "sha256").hexdigest()


class _Reading:
    """One read of the file as drafts with their ids and verdicts."""

    def __init__(self, request: Request, digest: str) -> None:
        self._request = request
        self._digest = digest
        self._stack = ExitStack()
        self.source: CsvEvents | JsonLinesEvents
        if request.format == "csv":
            stream: IO[str] = self._stack.enter_context(
                request.path.open(encoding="utf-8-sig", newline="")
            )
            self.source = CsvEvents(
                stream,
                request.limits,
                constraint=request.constraint,
                campaign=request.campaign,
                reference=request.reference,
                values_per_event=request.values_per_event,
            )
        else:
            raw: BinaryIO = self._stack.enter_context(request.path.open("rb"))
            self.source = JsonLinesEvents(
                raw, request.limits, campaign=request.campaign, reference=request.reference
            )

    def judged(self) -> Iterator[tuple[Draft, bytes, Problem | None]]:
        try:
            for draft in self.source.events():
                event_id = f"{self._request.format}-{self._digest[:16]}-{draft.first_line}"
                value, problem = judge(draft, event_id, self._request.limits)
                yield draft, value, problem
        except UnicodeDecodeError as exc:
            raise HeaderError(
                f"the file is not UTF-8 text ({exc.reason} at byte {exc.start})"
            ) from exc
        finally:
            self._stack.close()


def _publish(request: Request, settings: Settings, report: Report, printer: Printer) -> int:
    report.sha256 = digest = file_digest(request.path)
    reading = _Reading(request, digest)
    for draft, _value, problem in reading.judged():
        report.events += 1
        report.values += draft.values
        if problem is not None:
            report.note(problem)
    for problem in reading.source.problems:
        report.note(problem)
    report.rows = reading.source.rows
    report.problems.sort(key=lambda problem: problem.line)
    if report.invalid_rows and not request.skip_invalid:
        return EXIT_INVALID
    if request.dry_run:
        return EXIT_PUBLISHED
    return asyncio.run(_send(request, settings, report, printer))


async def _send(request: Request, settings: Settings, report: Report, printer: Printer) -> int:
    from aiokafka.errors import KafkaError

    from service.tools.kafka_io import MissingTopicError, require_topic, transactional_producer

    report.transactional_id = f"{settings.kafka.group_id}-publish-{report.sha256[:16]}"
    progress = printer.progress("publishing", total=report.events)
    try:
        async with transactional_producer(settings, report.transactional_id) as producer:
            await require_topic(producer, request.topic, "--topic, SCM_RELAY_INPUT_TOPIC")
            judged = _Reading(request, report.sha256).judged()
            async with producer.transaction():
                while chunk := await asyncio.to_thread(_take, judged, SEND_STEP_VALUES):
                    sent = [await _send_one(producer, request, report, *item) for item in chunk]
                    await asyncio.gather(*(future for future in sent if future is not None))
                    progress(len(chunk))
    except MissingTopicError as exc:
        raise UsageError(str(exc)) from exc
    except (KafkaError, TimeoutError) as exc:
        printer.error(
            f"scm-relay publish: Kafka failed ({type(exc).__name__}: {exc}); "
            "the transaction is aborted, nothing published"
        )
        report.published_events = report.published_values = 0
        return EXIT_KAFKA
    finally:
        progress(None)
    return EXIT_PUBLISHED


def _take(
    judged: Iterator[tuple[Draft, bytes, Problem | None]], values: int
) -> list[tuple[Draft, bytes, Problem | None]]:
    """The next events, up to `values` values (at least one event)."""
    step: list[tuple[Draft, bytes, Problem | None]] = []
    held = 0
    for item in judged:
        step.append(item)
        held += item[0].values
        if held >= values:
            break
    return step


async def _send_one(
    producer: Any,
    request: Request,
    report: Report,
    draft: Draft,
    value: bytes,
    problem: Problem | None,
) -> Any:
    if problem is not None:
        return None  # --skip-invalid: counted in the first read
    key = report.sha256[:32].encode() if request.ordered else group_key(draft.group)
    headers = [
        (HEADER_SOURCE, request.source.encode()),
        (HEADER_DIGEST, report.sha256.encode()),
        (HEADER_LINES, f"{draft.first_line}-{draft.last_line}".encode()),
    ]
    future = await producer.send(request.topic, value, key=key, headers=headers)
    report.published_events += 1
    report.published_values += draft.values
    return future


def _print_report(report: Report, request: Request, printer: Printer, code: int) -> None:
    if printer.as_json:
        printer.json({"exit_code": code, "dry_run": request.dry_run, **report.to_json()})
        return
    if report.problems:
        printer.table(
            f"{report.invalid_rows} invalid row(s) in {report.source}"
            + (f" (the first {PROBLEMS_SHOWN})" if report.invalid_rows > PROBLEMS_SHOWN else ""),
            ["line", "reason", "field", "message"],
            [problem.to_json() for problem in report.problems[:PROBLEMS_SHOWN]],
        )
    read = (
        f"{report.source} ({request.format}, sha256 {report.sha256[:16]}): {report.rows} rows, "
        f"{report.events} events, {report.values} values, {report.invalid_rows} invalid"
    )
    printer.line(read)
    if code == EXIT_INVALID:
        printer.line("nothing published: fix the rows above, or give --skip-invalid")
    elif request.dry_run:
        printer.line("--dry-run: every event is valid; nothing published")
    elif code == EXIT_PUBLISHED:
        printer.line(
            f"published {report.published_events} events ({report.published_values} values) "
            f"to {request.topic} in one transaction ({report.transactional_id}), "
            f"{report.seconds:.1f} s"
            + (f"; {report.invalid_rows} invalid rows skipped" if report.invalid_rows else "")
        )
