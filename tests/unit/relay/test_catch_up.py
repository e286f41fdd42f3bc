"""The wait after an assignment (service/relay/catch_up.py): intake reads nothing until
the ledger view has read to where the ledger ended then and holds the progress record
the commit names; then the record is applied to the offset book."""

from __future__ import annotations

from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError

from service.core.batching import Done, Source
from service.core.offsets import METADATA_PREFIX, Progress, encode_progress, progress_digest
from service.relay.book import OffsetBook
from service.relay.catch_up import LEDGER_END_RETRY_S, LedgerCatchUp

TP = TopicPartition("in", 0)


class Ledger:
    """The ledger view as the catch-up asks it; every answer set by the test."""

    def __init__(self) -> None:
        self.ends: dict[int, int] | Exception = {0: 10}
        self.read_to: dict[int, int] = {}
        self.records: dict[tuple[str, int], bytes] = {}
        self.is_stopped = False
        self.asked = 0

    async def end_offsets(self) -> dict[int, int]:
        self.asked += 1
        if isinstance(self.ends, Exception):
            raise self.ends
        return self.ends

    def has_read_to(self, ends: dict[int, int]) -> bool:
        return all(self.read_to.get(p, 0) >= end for p, end in ends.items())

    def partition_stopped(self) -> bool:
        return self.is_stopped

    def progress(self, topic: str, partition: int) -> bytes | None:
        return self.records.get((topic, partition))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def catch_up(
    ledger: Ledger, book: OffsetBook, clock: Clock, closed: list[Done] | None = None
) -> LedgerCatchUp:
    return LedgerCatchUp(
        ledger, book=book, closed_in=lambda _keys: closed or [], clock=clock, timeout_s=1.0
    )


def restored(metadata: str | None = None, offset: int = 0) -> OffsetBook:
    book = OffsetBook()
    book.assigned({("in", 0)}, 1)
    book.restore("in", 0, offset, metadata)
    return book


async def test_progress_applies_once_the_ledger_is_read_to_where_it_ended() -> None:
    ledger, clock = Ledger(), Clock()
    ledger.records[("in", 0)] = encode_progress("in", 0, Progress(0, (1,), {}))
    book = restored()
    subject = catch_up(ledger, book, clock)
    await subject.assigned({TP})
    assert subject.pause_reason() == "reading the ledger to where it ended at the assignment"
    assert not book.is_done(Source("in", 0, 1))
    ledger.read_to = {0: 10}
    assert subject.pause_reason() is None
    assert book.is_done(Source("in", 0, 1)), "the progress record was not applied"


async def test_where_the_ledger_ends_is_asked_again_once_a_second_until_it_answers() -> None:
    ledger, clock = Ledger(), Clock()
    ledger.ends = KafkaConnectionError()
    subject = catch_up(ledger, restored(), clock)
    await subject.assigned({TP})
    assert subject.ledger_end_unknown
    assert subject.pause_reason() == "asking where the ledger ends"
    ledger.ends = {0: 10}
    await subject.ask_ledger_end_again()  # the first time: asked at once
    assert ledger.asked == 2
    assert not subject.ledger_end_unknown
    assert subject.pause_reason() == "reading the ledger to where it ended at the assignment"
    ledger.ends = KafkaConnectionError()
    clock.now += LEDGER_END_RETRY_S / 2
    await subject.ask_ledger_end_again()
    assert ledger.asked == 2, "asked again within a second"


async def test_a_commit_naming_a_progress_record_not_read_yet_waits_for_it() -> None:
    ledger, clock = Ledger(), Clock()
    older = encode_progress("in", 0, Progress(0, (), {}))
    named = encode_progress("in", 0, Progress(3, (4,), {}))
    ledger.read_to = {0: 10}
    book = restored(METADATA_PREFIX + progress_digest(named), offset=3)
    subject = catch_up(ledger, book, clock)
    await subject.assigned({TP})
    reason = "reading the progress records the commit points name"
    assert subject.pause_reason() == reason, "no record read yet"
    ledger.records[("in", 0)] = older
    assert subject.pause_reason() == reason, "only an older record (below the commit) read"
    ledger.records[("in", 0)] = named
    assert subject.pause_reason() is None
    assert book.is_done(Source("in", 0, 4))


async def test_what_intents_closed_lately_carried_is_done_once_progress_applies() -> None:
    ledger, clock = Ledger(), Clock()
    ledger.read_to = {0: 10}
    book = restored()
    subject = catch_up(ledger, book, clock, closed=[Done("in", 0, 2)])
    await subject.assigned({TP})
    assert subject.pause_reason() is None
    assert book.is_done(Source("in", 0, 2))


async def test_a_stopped_ledger_partition_keeps_intake_paused() -> None:
    ledger, clock = Ledger(), Clock()
    ledger.read_to = {0: 10}
    ledger.is_stopped = True
    subject = catch_up(ledger, restored(), clock)
    await subject.assigned({TP})
    assert subject.pause_reason() == (
        "a ledger partition is stopped at a record batch it cannot decode"
    )
    ledger.is_stopped = False
    assert subject.pause_reason() is None


async def test_a_revoke_drops_the_partitions_awaiting_their_progress() -> None:
    ledger, clock = Ledger(), Clock()
    ledger.ends = KafkaConnectionError()
    ledger.read_to = {0: 10}
    ledger.records[("in", 0)] = encode_progress("in", 0, Progress(0, (1,), {}))
    book = restored()
    subject = catch_up(ledger, book, clock)
    await subject.assigned({TP})
    subject.revoked()
    assert not subject.ledger_end_unknown
    assert subject.pause_reason() is None
    assert not book.is_done(Source("in", 0, 1)), "a revoked partition's progress applied"
