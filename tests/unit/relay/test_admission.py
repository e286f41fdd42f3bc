"""Admission: the order guard in front of the batcher (pure, no awaiting)."""

from __future__ import annotations

import json
from typing import Any

from service.core.batching import Batcher, PendingEvent, Source
from service.core.parsing import ParsedEvent, parse_event
from service.relay.admission import Admission
from tests.unit.relay.support import (
    _offsets,  # one order of publication for every event
    pending,
)


def admission(max_values: int = 10) -> Admission:
    return Admission(Batcher(max_values=max_values, max_keys=1, linger_s=1.0, max_open_batches=10))


def test_a_conflicting_change_is_held_until_the_claim_ends_then_batched() -> None:
    subject = admission()
    first = subject.offer(pending(["a"], "DE"), 0.0)
    assert not first.held
    (open_batch,) = subject.close_all()
    later = pending(["a"], "FR")
    assert subject.offer(later, 0.0).held
    assert subject.next_released() is None
    subject.release(open_batch.batch_id)
    assert subject.next_released() is later
    assert not subject.offer(later, 0.0, released=True).held


def test_writing_the_same_value_again_is_no_conflict() -> None:
    subject = admission()
    subject.offer(pending(["a"], "DE"), 0.0)
    assert not subject.offer(pending(["a"], "DE"), 0.0).held


def test_a_task_in_the_ledger_claims_its_codes_unless_the_batch_is_ours() -> None:
    subject = admission()
    subject.claim_task("elsewhere", {"extended_id": ["a"]}, {"intended_market": "DE"})
    assert subject.offer(pending(["a"], "FR"), 0.0).held
    ours = admission()
    ours.offer(pending(["b"], "DE"), 0.0)
    (batch,) = ours.close_all()
    ours.claim_task(batch.batch_id, {"extended_id": ["b"]}, {"intended_market": "DE"})
    ours.release(batch.batch_id)
    assert not ours.offer(pending(["b"], "FR"), 0.0).held, "a claim was left behind"


def test_full_batches_are_ready_at_once_and_duplicates_counted() -> None:
    subject = admission(max_values=2)
    assert subject.offer(pending(["a"]), 0.0).ready == []
    again = subject.offer(pending(["a", "b"]), 0.0)
    assert [batch.size for batch in again.ready] == [2]
    assert again.deduplicated == 1


def test_dropping_unsent_work_forgets_open_held_and_queued_batches() -> None:
    subject = admission(max_values=2)
    (queued,) = subject.offer(pending(["q", "r"]), 0.0).ready
    subject.offer(pending(["q"], "FR"), 0.0)  # held behind the queued batch
    subject.offer(pending(["x"], "FR"), 0.0)  # open
    batch_ids, dropped = subject.drop_unsent([queued])
    assert queued.batch_id in batch_ids
    assert dropped == 3
    assert subject.buffered_values == 0
    assert not subject.offer(pending(["q"], "FR"), 0.0).held, "the dropped batch still claims"


def several(constraints: dict[str, Any], market: str = "DE") -> PendingEvent:
    """An event with (usually) several constraint keys."""
    raw = json.dumps({"constraints": constraints, "scm_data": {"intended_market": market}})
    parsed = parse_event(raw.encode())
    assert isinstance(parsed, ParsedEvent)
    return PendingEvent(Source("in", 0, next(_offsets)), parsed.event, raw.encode(), None, 0.0)


def test_an_event_with_several_keys_claims_every_key_for_its_own_batch() -> None:
    subject = admission()
    offered = subject.offer(several({"extended_id": ["a", "b"], "rfid": "r"}, "DE"), 0.0)
    (alone,) = offered.ready
    assert not offered.held
    # A later change to any of its codes waits until its task ends.
    rfid_later = several({"rfid": "r"}, "FR")
    assert subject.offer(rfid_later, 0.0).held
    assert subject.offer(pending(["b"], "FR"), 0.0).held
    assert not subject.offer(pending(["c"], "FR"), 0.0).held
    subject.release(alone.batch_id)
    assert subject.next_released() is rfid_later


def test_an_event_with_several_keys_waits_behind_an_earlier_change_to_any_key() -> None:
    subject = admission()
    subject.claim_task("elsewhere", {"rfid": ["r"]}, {"intended_market": "DE"})
    later = several({"extended_id": ["a"], "rfid": "r"}, "FR")
    assert subject.offer(later, 0.0).held
    # Held, it also holds back a later change to its other key (first in, first out).
    assert subject.offer(pending(["a"], "IT"), 0.0).held
    subject.release("elsewhere")
    assert subject.next_released() is later
    assert subject.offer(later, 0.0, released=True).ready[0].constraints() == {
        "extended_id": ["a"],
        "rfid": ["r"],
    }
    assert subject.next_released() is None, "the change to 'a' overtook the event before it"
