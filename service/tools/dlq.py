"""`scm-relay dlq list` and `scm-relay dlq replay`: the dead letters, and sending them back.

A replay republishes each selected dead letter's original (or a corrected record from
`--fixed`, a JSON-lines file keyed by dead-letter offset) to the input topic, with its
key and provenance headers, in one transaction with a *replay marker* per dead letter:
a record in the dead-letter topic itself, in the dead letter's partition, keyed
`replayed:<partition>:<offset>`, carrying the header `scm_relay.replay.of` and naming
the input position its copy was written to. The marker is what makes a replay
idempotent: a dead letter with a marker is not replayed again unless `--force`, and
`dlq list` shows when it was replayed. A marker counts only when the input record it
names is that copy (the replay headers name this dead letter): a record forged into
the dead-letter topic cannot hide a dead letter as replayed. Once that copy is past the
input topic's retention the marker is believed as it is (whoever can write the
dead-letter topic is trusted: docs/security.md). The markers are looked for after the
producer has started, so that a replay still open under the same transactional id
(`<group>-dlq-replay`) is fenced off or visible first.

Only dead letters of the relay's own input topic are replayed: one whose source header
names another topic is refused (nothing copied from a topic the dead-letter topic
names). A fixed record is keyed as `scm-relay publish` keys that event; an original
keeps its key.

Every record to replay is judged by the relay's contract first; one that would be
refused again (an original that was never valid, a fix that is still wrong) refuses
the whole replay: nothing is published. A dead letter written without its value (an
API rejection the relay no longer had in memory) or truncated (over 512 KiB) is
replayed from its source position, which must still be retained.
Exit codes: 0 replayed (or nothing selected); 1 refused, nothing published; 2 usage;
3 Kafka failed, nothing published.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import re
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from pydantic import ValidationError

from service.core.contract_limits import ContractLimits
from service.core.parsing import ParsedEvent, parse_event
from service.core.records import DeadLetterHeaders
from service.settings import Settings
from service.tools.output import Printer, tool_start
from service.tools.sources import event_group, group_key

EXIT_OK: Final = 0
EXIT_REFUSED: Final = 1
EXIT_USAGE: Final = 2
EXIT_KAFKA: Final = 3
HEADER_REPLAY_OF: Final = "scm_relay.replay.of"  # on a marker: "<partition>:<offset>"
HEADER_REPLAY_TOPIC: Final = "scm_relay.replay.dlq_topic"
HEADER_REPLAY_PARTITION: Final = "scm_relay.replay.dlq_partition"
HEADER_REPLAY_OFFSET: Final = "scm_relay.replay.dlq_offset"
HEADER_REPLAY_REASON: Final = "scm_relay.replay.reason"
HEADER_REPLAY_FIXED: Final = "scm_relay.replay.fixed"
DEFAULT_LIMIT: Final = 50
_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class UsageError(Exception):
    """The command cannot run as given (exit 2)."""


@dataclass
class DeadLetterRecord:
    """One record of the dead-letter topic as read back, with its replay marker when it
    has one (the relay's `messages.DeadLetter` is an input record on its way there)."""

    partition: int
    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes
    headers: DeadLetterHeaders
    replayed: dict[str, Any] | None = None
    # Markers that name no copy of this dead letter, and why each was ignored.
    ignored_markers: list[str] = field(default_factory=list)

    @property
    def position(self) -> str:
        return f"{self.partition}:{self.offset}"

    def row(self) -> dict[str, Any]:
        when = dt.datetime.fromtimestamp(self.timestamp_ms / 1000, dt.UTC)
        h = self.headers
        return {
            "offset": self.position,
            "time": when.isoformat(timespec="seconds").replace("+00:00", "Z"),
            "reason": h.reason.value,
            "field": h.field,
            "message": h.message,
            "source": f"{h.source_topic}/{h.source_partition}/{h.source_offset}",
            "replayed": (self.replayed or {}).get("replayed_at"),
            "replay_proof": (self.replayed or {}).get("proof"),
            "ignored_markers": self.ignored_markers,
        }


@dataclass
class Marker:
    """A replay marker as read: where it is and what it says."""

    partition: int
    offset: int
    of: str
    body: dict[str, Any]


@dataclass
class Selection:
    """Which dead letters a command takes."""

    reason: str | None = None
    since_ms: int | None = None
    offsets: tuple[int | None, int, int] | None = None  # partition (None: all), first, last

    def takes(self, letter: DeadLetterRecord) -> bool:
        if self.reason is not None and letter.headers.reason.value != self.reason:
            return False
        if self.since_ms is not None and letter.timestamp_ms < self.since_ms:
            return False
        if self.offsets is not None:
            partition, first, last = self.offsets
            if partition is not None and letter.partition != partition:
                return False
            if not first <= letter.offset <= last:
                return False
        return True


def parse_since(text: str, now: dt.datetime | None = None) -> int:
    """`30m`, `2h`, `7d` ago, or an ISO 8601 date or time (UTC unless it says): epoch ms."""
    now = now or dt.datetime.now(dt.UTC)
    if match := _DURATION.match(text.strip()):
        seconds = int(match.group(1)) * _UNITS[match.group(2)]
        return int((now - dt.timedelta(seconds=seconds)).timestamp() * 1000)
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise UsageError(
            f"--since {text!r}: give a duration (30m, 2h, 7d) or an ISO date or time"
        ) from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1000)


def parse_offsets(text: str) -> tuple[int | None, int, int]:
    """`A-B`, `A`, `P:A-B` or `P:A`: dead-letter offsets (in partition P)."""
    match = re.fullmatch(r"(?:(\d+):)?(\d+)(?:-(\d+))?", text.strip())
    if match is None:
        raise UsageError(f"--offsets {text!r}: give A-B, A, P:A-B or P:A")
    partition = None if match.group(1) is None else int(match.group(1))
    first = int(match.group(2))
    last = int(match.group(3)) if match.group(3) is not None else first
    if last < first:
        raise UsageError(f"--offsets {text!r}: {last} is before {first}")
    return partition, first, last


async def read_dead_letters(
    settings: Settings,
    topic: str,
    since_ms: int | None = None,
    markers: dict[str, list[Marker]] | None = None,
) -> AsyncIterator[DeadLetterRecord]:
    """The dead letters of `topic` in offset order per partition, as they are read (none
    is held here: the caller keeps what it needs). Replay markers come later in the log
    than their dead letters; they are put in `markers` (position -> markers, oldest
    first), complete once the read has ended, for `apply_markers` to check against what
    the caller kept."""
    from service.tools.kafka_io import read_to_end

    async for record in read_to_end(settings, topic, since_ms=since_ms):
        headers = {name: value for name, value in record.headers or ()}
        if HEADER_REPLAY_OF in headers:
            if markers is not None:
                position = headers[HEADER_REPLAY_OF].decode(errors="replace")
                try:
                    body = json.loads(record.value or b"{}")
                except (UnicodeDecodeError, json.JSONDecodeError):
                    body = {}
                markers.setdefault(position, []).append(
                    Marker(record.partition, record.offset, position, body)
                    if isinstance(body, dict)
                    else Marker(record.partition, record.offset, position, {})
                )
            continue
        try:
            parsed = DeadLetterHeaders.from_kafka(record.headers or ())
        except (KeyError, ValueError, ValidationError):
            continue  # not a dead letter the relay wrote
        yield DeadLetterRecord(
            record.partition,
            record.offset,
            record.timestamp,
            record.key,
            record.value or b"",
            parsed,
        )


async def apply_markers(
    settings: Settings, letters: list[DeadLetterRecord], markers: dict[str, list[Marker]]
) -> None:
    """Set each letter's `replayed` from the newest of its markers that its replayed copy
    proves: the input record the marker names carries this dead letter's replay
    headers. A marker whose copy is past the input topic's retention is believed, and
    says so (`proof`); one that names no copy of this dead letter is ignored and listed
    in `ignored_markers`. Reads one input record per marker, and only for `letters`."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    from service.kafka import stop_client
    from service.tools.kafka_io import options

    pending = [
        (letter, markers[letter.position]) for letter in letters if letter.position in markers
    ]
    if not pending:
        return
    consumer = AIOKafkaConsumer(
        **options(settings), enable_auto_commit=False, isolation_level="read_committed"
    )
    await consumer.start()
    try:
        for letter, found in pending:
            for marker in reversed(found):
                problem, proof = _marker_claim(settings, letter, marker)
                if problem is None:
                    tp = TopicPartition(settings.kafka.input_topic, marker.body["input_partition"])
                    problem, proof = await _copy_proves(
                        consumer, tp, marker.body["input_offset"], settings.kafka.dlq_topic, letter
                    )
                if problem is None:
                    letter.replayed = {**marker.body, "proof": proof}
                    break
                letter.ignored_markers.append(f"{marker.partition}:{marker.offset}: {problem}")
    finally:
        await stop_client(consumer)


def _marker_claim(
    settings: Settings, letter: DeadLetterRecord, marker: Marker
) -> tuple[str | None, str | None]:
    """Why the marker cannot be a replay's of `letter` on its face, or (None, None)."""
    if marker.partition != letter.partition or marker.offset <= letter.offset:
        return "not after its dead letter in the same partition", None
    body = marker.body
    if body.get("input_topic") != settings.kafka.input_topic:
        return f"names the input topic {body.get('input_topic')!r}", None
    if not all(
        isinstance(body.get(name), int) and not isinstance(body.get(name), bool)
        for name in ("input_partition", "input_offset")
    ):
        return "names no input position of its copy", None
    return None, None


async def _copy_proves(
    consumer: Any, tp: Any, offset: int, dlq_topic: str, letter: DeadLetterRecord
) -> tuple[str | None, str | None]:
    """Whether the input record at `tp`/`offset` is the replayed copy of `letter`."""
    partitions = consumer.partitions_for_topic(tp.topic) or set()
    if partitions and tp.partition not in partitions:
        return f"names the input partition {tp.partition}, which does not exist", None
    consumer.assign([tp])
    first = (await consumer.beginning_offsets([tp]))[tp]
    end = (await consumer.end_offsets([tp]))[tp]
    if offset >= end:
        return f"names the input offset {tp.partition}:{offset}, not written yet", None
    if offset < first:
        return None, "copy_expired"  # past the input's retention: believed (see the docstring)
    consumer.seek(tp, offset)
    record = None
    async with asyncio.timeout(30):
        while record is None and await consumer.position(tp) <= offset:
            for candidate in (await consumer.getmany(tp, timeout_ms=1000)).get(tp, []):
                if candidate.offset >= offset:
                    record = candidate
                    break
    if record is None or record.offset != offset:
        return f"names the input offset {tp.partition}:{offset}, which holds no record", None
    headers = {name: value for name, value in record.headers or ()}
    expected = {
        HEADER_REPLAY_TOPIC: dlq_topic.encode(),
        HEADER_REPLAY_PARTITION: str(letter.partition).encode(),
        HEADER_REPLAY_OFFSET: str(letter.offset).encode(),
    }
    if any(headers.get(name) != value for name, value in expected.items()):
        return f"the input record at {tp.partition}:{offset} is no replay of it", None
    return None, "verified"


def run(args: argparse.Namespace) -> int:
    started = tool_start("dlq", args.json)
    if started is None:
        return EXIT_USAGE
    settings, printer = started
    try:
        selection = Selection(
            reason=args.reason,
            since_ms=parse_since(args.since) if args.since else None,
            offsets=parse_offsets(args.offsets) if getattr(args, "offsets", None) else None,
        )
        if args.dlq_command == "list":
            return asyncio.run(_list(settings, selection, args.limit, printer))
        fixed = read_fixed(Path(args.fixed)) if args.fixed else {}
        replay = Replay(
            settings=settings,
            selection=selection,
            fixed=fixed,
            limits=settings.limits,
            dry_run=args.dry_run,
            force=args.force,
        )
        return asyncio.run(replay.run(printer))
    except UsageError as exc:
        printer.error(f"scm-relay dlq: {exc}")
        return EXIT_USAGE


async def _list(settings: Settings, selection: Selection, limit: int, printer: Printer) -> int:
    from aiokafka.errors import KafkaError

    from service.tools.kafka_io import MissingTopicError

    shown: deque[DeadLetterRecord] = deque(maxlen=limit)  # the newest `limit`
    markers: dict[str, list[Marker]] = {}
    matched = 0
    try:
        letters = read_dead_letters(settings, settings.kafka.dlq_topic, selection.since_ms, markers)
        async for letter in letters:
            if selection.takes(letter):
                matched += 1
                shown.append(letter)
        await apply_markers(settings, list(shown), markers)
    except MissingTopicError as exc:
        raise UsageError(f"{exc} (SCM_RELAY_DLQ_TOPIC)") from exc
    except (KafkaError, TimeoutError) as exc:
        printer.error(f"scm-relay dlq: Kafka failed ({type(exc).__name__}: {exc})")
        return EXIT_KAFKA
    rows = [letter.row() for letter in shown]
    if printer.as_json:
        printer.json({"topic": settings.kafka.dlq_topic, "matched": matched, "dead_letters": rows})
        return EXIT_OK
    printer.table(
        f"dead letters in {settings.kafka.dlq_topic}",
        ["offset", "time", "reason", "field", "message", "source", "replayed"],
        [{**row, "time": _minute(row["time"]), "replayed": _replayed_cell(row)} for row in rows],
    )
    more = f" (the newest {len(rows)} shown; --limit)" if matched > len(rows) else ""
    printer.line(f"{matched} dead letter(s) matched{more}")
    _say_ignored_markers(shown, printer)
    return EXIT_OK


def _replayed_cell(row: dict[str, Any]) -> str | None:
    when = _minute(row["replayed"])
    if when is not None and row["replay_proof"] == "copy_expired":
        return f"{when} (copy expired)"
    return when


def _say_ignored_markers(letters: Any, printer: Printer) -> None:
    ignored = [letter.position for letter in letters if letter.ignored_markers]
    if ignored:
        printer.line(
            f"replay markers that prove no replay were ignored for: {', '.join(ignored)} "
            "(--json lists why; a record written into the dead-letter topic by something "
            "other than a replay?)"
        )


def _minute(stamp: str | None) -> str | None:
    """`2026-11-29 06:41` (UTC) for a table; --json has the full time."""
    return None if stamp is None else stamp[:16].replace("T", " ")


def read_fixed(path: Path) -> dict[tuple[int, int], bytes]:
    """`--fixed`: JSON lines of `{"offset": N, "partition": P (default 0), "event": {...}}`,
    the corrected record for the dead letter at P:N."""
    fixed: dict[tuple[int, int], bytes] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read --fixed {path}: {exc}") from exc
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            position = (int(entry.get("partition", 0)), int(entry["offset"]))
            event = entry["event"]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UsageError(
                f'--fixed {path}:{number}: not {{"offset": N, "event": {{...}}}}: {exc}'
            ) from exc
        if position in fixed:
            raise UsageError(f"--fixed {path}:{number}: dead letter {position} is fixed twice")
        fixed[position] = json.dumps(event, ensure_ascii=False).encode()
    return fixed


@dataclass
class Planned:
    """One dead letter to replay: the bytes to republish, or why it cannot be."""

    letter: DeadLetterRecord
    value: bytes | None = None
    fixed: bool = False
    problem: str | None = None
    key: bytes | None = None
    other_source: bool = False  # names a source topic other than the input topic


@dataclass
class Replay:
    settings: Settings
    selection: Selection
    fixed: dict[tuple[int, int], bytes]
    limits: ContractLimits
    dry_run: bool = False
    force: bool = False
    skipped_replayed: list[str] = field(default_factory=list)
    ignored_markers: list[DeadLetterRecord] = field(default_factory=list)

    @property
    def transactional_id(self) -> str:
        return f"{self.settings.kafka.group_id}-dlq-replay"

    async def run(self, printer: Printer) -> int:
        from aiokafka.errors import KafkaError

        from service.tools.kafka_io import MissingTopicError, require_topic, transactional_producer

        try:
            if self.dry_run:
                plan = await self._plan()
                return self._report(plan, printer, published=False)
            async with transactional_producer(self.settings, self.transactional_id) as producer:
                await require_topic(
                    producer, self.settings.kafka.input_topic, "SCM_RELAY_INPUT_TOPIC"
                )
                plan = await self._plan()  # after start: an earlier replay is fenced or done
                if any(item.problem for item in plan) or not plan:
                    return self._report(plan, printer, published=False)
                async with producer.transaction():
                    copies = [await self._send_copy(producer, item) for item in plan]
                    written = await asyncio.gather(*copies)
                    # Each marker names where its copy went: that copy proves the replay.
                    marked = [
                        await self._send_marker(producer, item, copy)
                        for item, copy in zip(plan, written, strict=True)
                    ]
                    await asyncio.gather(*marked)
                return self._report(plan, printer, published=True)
        except MissingTopicError as exc:
            raise UsageError(str(exc)) from exc
        except (KafkaError, TimeoutError) as exc:
            printer.error(
                f"scm-relay dlq replay: Kafka failed ({type(exc).__name__}: {exc}); "
                "nothing published"
            )
            return EXIT_KAFKA

    async def _plan(self) -> list[Planned]:
        from service.tools.kafka_io import MissingTopicError

        markers: dict[str, list[Marker]] = {}
        try:
            letters = read_dead_letters(
                self.settings, self.settings.kafka.dlq_topic, markers=markers
            )
            selected = [letter async for letter in letters if self.selection.takes(letter)]
        except MissingTopicError as exc:
            raise UsageError(f"{exc} (SCM_RELAY_DLQ_TOPIC)") from exc
        await apply_markers(self.settings, selected, markers)
        self.ignored_markers = [letter for letter in selected if letter.ignored_markers]
        plan: list[Planned] = []
        for letter in selected:
            if letter.replayed is not None and not self.force:
                self.skipped_replayed.append(letter.position)
            else:
                plan.append(await self._judge(letter))
        unknown = set(self.fixed) - {(letter.partition, letter.offset) for letter in selected}
        if unknown:
            listed = ", ".join(f"{p}:{o}" for p, o in sorted(unknown))
            raise UsageError(f"--fixed names dead letters not selected (or not found): {listed}")
        return plan

    async def _judge(self, letter: DeadLetterRecord) -> Planned:
        source = letter.headers.source_topic
        if source != self.settings.kafka.input_topic:
            # The relay dead-letters only records of its input topic: a dead letter naming
            # another was not written by it, and its "original" is no record to copy.
            return Planned(
                letter,
                other_source=True,
                problem=(
                    f"its source header names the topic {source!r}, not the input topic "
                    f"{self.settings.kafka.input_topic!r} (SCM_RELAY_INPUT_TOPIC): only dead "
                    "letters of the input topic are replayed"
                ),
            )
        fix = self.fixed.get((letter.partition, letter.offset))
        if fix is not None:
            value, fixed = fix, True
        elif letter.value and not letter.headers.value_truncated:
            value, fixed = letter.value, False
        else:
            original = await self._original(letter)
            if original is None:
                return Planned(
                    letter,
                    problem="its original is gone from its source position: give a --fixed record",
                )
            value, fixed = original, False
        verdict = parse_event(value, self.limits)
        if isinstance(verdict, ParsedEvent):
            # A fix may name other codes than the original: keyed as `publish` keys it,
            # its changes share a partition with that event's other changes.
            key = group_key(event_group(verdict.event)) if fixed else letter.key
            return Planned(letter, value, fixed, key=key)
        what = "the fix" if fixed else "the original"
        return Planned(
            letter,
            value,
            fixed,
            problem=f"{what} would be refused again: {verdict.reason.value}: {verdict.message}",
        )

    async def _original(self, letter: DeadLetterRecord) -> bytes | None:
        """The whole source record of a dead letter written without (all of) its value."""
        from aiokafka import AIOKafkaConsumer, TopicPartition

        from service.kafka import stop_client
        from service.tools.kafka_io import options

        h = letter.headers
        tp = TopicPartition(h.source_topic, h.source_partition)
        consumer = AIOKafkaConsumer(
            **options(self.settings), enable_auto_commit=False, isolation_level="read_committed"
        )
        await consumer.start()
        try:
            consumer.assign([tp])
            first = (await consumer.beginning_offsets([tp]))[tp]
            if h.source_offset < first:
                return None
            consumer.seek(tp, h.source_offset)
            async with asyncio.timeout(30):
                while True:
                    batch = await consumer.getmany(tp, timeout_ms=1000)
                    for record in batch.get(tp, []):
                        if record.offset == h.source_offset:
                            return bytes(record.value or b"")
                        if record.offset > h.source_offset:
                            return None
        except TimeoutError:
            return None
        finally:
            await stop_client(consumer)

    async def _send_copy(self, producer: Any, item: Planned) -> Any:
        letter, settings = item.letter, self.settings
        assert item.value is not None  # noqa: S101 - only planned items without a problem are sent
        headers = [
            (HEADER_REPLAY_TOPIC, settings.kafka.dlq_topic.encode()),
            (HEADER_REPLAY_PARTITION, str(letter.partition).encode()),
            (HEADER_REPLAY_OFFSET, str(letter.offset).encode()),
            (HEADER_REPLAY_REASON, letter.headers.reason.value.encode()),
        ]
        if item.fixed:
            headers.append((HEADER_REPLAY_FIXED, b"true"))
        return await producer.send(
            settings.kafka.input_topic, item.value, key=item.key, headers=headers
        )

    async def _send_marker(self, producer: Any, item: Planned, copy: Any) -> Any:
        letter, settings = item.letter, self.settings
        marker = {
            "replayed_at": dt.datetime.now(dt.UTC)
            .isoformat(timespec="seconds")
            .replace("+00:00", "Z"),
            "input_topic": settings.kafka.input_topic,
            "input_partition": copy.partition,
            "input_offset": copy.offset,
            "fixed": item.fixed,
        }
        return await producer.send(
            settings.kafka.dlq_topic,
            json.dumps(marker).encode(),
            key=f"replayed:{letter.position}".encode(),
            partition=letter.partition,
            headers=[(HEADER_REPLAY_OF, letter.position.encode())],
        )

    def _report(self, plan: list[Planned], printer: Printer, *, published: bool) -> int:
        refused = [item for item in plan if item.problem]
        other_source = sum(item.other_source for item in plan)
        rows = [
            {
                **item.letter.row(),
                "replay": "fixed" if item.fixed else "original",
                "problem": item.problem,
            }
            for item in plan
        ]
        code = EXIT_REFUSED if refused else EXIT_OK
        if printer.as_json:
            printer.json(
                {
                    "exit_code": code,
                    "dry_run": self.dry_run,
                    "published": published,
                    "replayed": len(plan) if published else 0,
                    "already_replayed": self.skipped_replayed,
                    "not_from_input_topic": other_source,
                    "ignored_markers": {
                        letter.position: letter.ignored_markers for letter in self.ignored_markers
                    },
                    "dead_letters": rows,
                }
            )
            return code
        if rows:
            printer.table(
                "dead letters to replay" if not published else "dead letters replayed",
                ["offset", "reason", "replay", "problem", "source"],
                rows,
            )
        if self.skipped_replayed:
            printer.line(
                f"already replayed, left alone (--force replays again): "
                f"{', '.join(self.skipped_replayed)}"
            )
        _say_ignored_markers(self.ignored_markers, printer)
        if other_source:
            printer.line(
                f"{other_source} name a source topic other than {self.settings.kafka.input_topic}: "
                "nothing published (leave them out with --offsets, or find who wrote them)"
            )
        if refused:
            printer.line(f"{len(refused)} would be refused again: nothing published")
        elif published:
            printer.line(
                f"replayed {len(plan)} dead letter(s) to {self.settings.kafka.input_topic} in one "
                f"transaction ({self.transactional_id})"
            )
        elif self.dry_run:
            printer.line(f"--dry-run: {len(plan)} dead letter(s) would be replayed")
        else:
            printer.line("no dead letter selected: nothing published")
        return code
