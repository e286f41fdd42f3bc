"""Intake's claim bookkeeping (service/relay/claims.py) on its own: a claim passes from
an intent to its tasks in whatever order the ledger view tells of them, and an event
held behind an intent is done when the intent is recorded."""

from __future__ import annotations

import asyncio

from service.core.batching import Batch, Batcher, PendingEvent, Source
from service.relay.admission import Admission
from service.relay.book import OffsetBook
from service.relay.claims import Claims
from service.relay.messages import (
    Flush,
    IntakeMessage,
    IntentClosed,
    IntentOpened,
    Resolution,
    TaskEnded,
)
from tests.unit.relay.fakes import FakeConsumer
from tests.unit.relay.support import pending
from tests.unit.relay.test_intake import Committer
from tests.unit.relay.test_intents import intent


class Rig:
    def __init__(self) -> None:
        self.admission = Admission(
            Batcher(max_values=10, max_keys=1, linger_s=1.0, max_open_batches=10)
        )
        self.book = OffsetBook()
        self.book.assigned({("in", 0)}, 1)
        self.book.restore("in", 0, 0, None)
        self.book.apply("in", 0, None)
        self.committer = Committer()
        self.admitted: list[tuple[PendingEvent, bool]] = []
        self.sent: list[Batch | Resolution] = []
        self.claims = Claims(
            admission=self.admission,
            book=self.book,
            committer=self.committer,
            consumer=FakeConsumer("in"),
            settling=lambda: False,
            admit=self._admit,
            send=self._send,
        )

    async def _admit(self, event: PendingEvent, _stop: asyncio.Event, released: bool) -> None:
        self.admitted.append((event, released))

    async def _send(self, job: Batch | Resolution, _stop: asyncio.Event) -> None:
        self.sent.append(job)

    async def read(self, *messages: IntakeMessage) -> None:
        await self.claims.read(list(messages), asyncio.Event())


async def _held_behind_closed_intent(subject: Rig) -> PendingEvent:
    """Another process's intent on "a" is open; a change to "a" waits behind it."""
    await subject.read(IntentOpened(intent(["a"], [(1, 0)], batch_id="b-other", resolve_in_s=60)))
    change = pending(["a"], market="FR")
    assert subject.admission.offer(change, 0.0).held
    return change


async def test_a_claim_passes_from_a_closed_intent_to_its_task_until_the_task_ends() -> None:
    subject = Rig()
    change = await _held_behind_closed_intent(subject)
    await subject.read(IntentClosed("b-other", ("t1",)))
    assert subject.admitted == [], "released while the intent's task runs"
    await subject.read(TaskEnded("t1"))
    assert subject.admitted == [(change, True)]


async def test_a_task_ended_before_its_intents_closure_is_read_does_not_claim_again() -> None:
    subject = Rig()
    change = await _held_behind_closed_intent(subject)
    await subject.read(TaskEnded("t1"))
    assert subject.admitted == [], "released while the intent is open"
    await subject.read(IntentClosed("b-other", ("t1",)))
    assert subject.admitted == [(change, True)]


async def test_an_event_held_behind_a_recorded_intent_is_done_and_committed_soon() -> None:
    subject = Rig()
    await subject.read(IntentOpened(intent(["a"], [(0, 4)], batch_id="b-other", resolve_in_s=60)))
    read = pending(["a"])
    read.source = Source("in", 0, 4)
    assert subject.claims.defer(read), "an event the intent covers was not held"
    await subject.read(IntentClosed("b-other", ("t1",)))
    assert subject.book.is_done(Source("in", 0, 4))
    assert any(isinstance(item, Flush) for item in subject.committer.items)
    assert subject.admitted == [], "a recorded event was read in again"
