"""The one piece of one stage's state another stage changes: intake's offset book,
which the committer changes through `Accounting` (messages.py, docs/design.md
section 9). These pin the rule that makes the sharing safe: only inside the
committer's open transaction, before the offsets it releases are taken for that
same transaction, and never across an await."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any, cast

from aiokafka import TopicPartition
from prometheus_client import CollectorRegistry

from service.metrics import RelayMetrics
from service.relay.book import OffsetBook
from service.relay.committer import Committer
from service.relay.ledger import WrittenRecords
from service.relay.messages import LedgerAppend
from service.relay.ports import Accounting
from tests.unit.relay.fakes import FakeProducer, config
from tests.unit.relay.support import batch, dead_letter, ledger_record

# The book's methods the committer may call: the `Accounting` protocol's.
ACCOUNTING = sorted(
    name
    for name, member in vars(Accounting).items()
    if inspect.isfunction(member) and not name.startswith("_")
)


class WatchedBook:
    """Intake's offset book as the committer is given it, each call noted with whether
    the producer had a transaction open then."""

    def __init__(self, book: OffsetBook, producer: FakeProducer) -> None:
        self._book = book
        self._producer = producer
        self.calls: list[tuple[str, bool]] = []

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._book, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append((name, self._producer.in_transaction))
            return method(*args, **kwargs)

        return call


def test_the_books_accounting_never_awaits() -> None:
    assert {"dead_lettered", "batch_recorded", "sources_done", "checkpoints"} <= set(ACCOUNTING)
    awaiting = [n for n in ACCOUNTING if inspect.iscoroutinefunction(getattr(OffsetBook, n))]
    assert awaiting == [], "another stage could see the book half-changed across an await"


async def test_the_committer_changes_intakes_book_only_inside_its_transaction() -> None:
    uploaded = batch(["a", "b"])
    (event,) = uploaded.events()
    offset = event.source.offset
    book = OffsetBook()
    book.assigned({("in", 0)}, 1)
    book.restore("in", 0, offset, None)
    book.apply("in", 0, None)
    assert not book.received("in", 0, offset)
    assert not book.received("in", 0, offset + 1)
    book.handed_on(uploaded)
    producer = FakeProducer()
    watched = WatchedBook(book, producer)
    stage = Committer(
        config(),
        producer=producer,
        accounting=cast(Accounting, watched),
        written=WrittenRecords(),
        metrics=RelayMetrics(CollectorRegistry()),
    )
    runner = asyncio.create_task(stage.run())
    await stage.submit(dead_letter(offset + 1))
    append = LedgerAppend(ledger_record("t1", ["a", "b"], batch_id=uploaded.batch_id), uploaded)
    await stage.submit(append)
    await append.recorded
    await stage.close()
    await runner
    names = [name for name, _ in watched.calls]
    assert {"dead_lettered", "batch_recorded", "checkpoints"} <= set(names)
    assert all(name in ACCOUNTING for name in names), "the book changed outside Accounting"
    outside = [name for name, in_transaction in watched.calls if not in_transaction]
    assert outside == [], "intake's book changed outside the committer's transaction"
    assert names.index("batch_recorded") < names.index("checkpoints")
    assert names.index("dead_lettered") < names.index("checkpoints")
    # ... so the offsets they release travel in the transaction that carries them.
    (carrying,) = [t for t in producer.committed if t.records]
    assert carrying.offsets[TopicPartition("in", 0)][0] == offset + 2
    assert {name for name, *_ in carrying.records} == {"tasks", "dlq"}
