"""Batching rules (docs/design.md section 4), without any server."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from service.core.batching import Batcher, FlushReason, PendingEvent, Source
from service.core.contract import ChangeEvent

_offsets = itertools.count()


def pending(values: list[str] | str, key: str = "extended_id", **fields: Any) -> PendingEvent:
    scm_data = fields.pop("scm_data", {"intended_market": "DE"})
    event = ChangeEvent.model_validate(
        {"constraints": {key: values}, "scm_data": scm_data, **fields}
    )
    offset = next(_offsets)
    return PendingEvent(
        source=Source("in", 0, offset, f"e{offset}"),
        event=event,
        raw=b"{}",
        key=None,
        received_at=0,
    )


def batcher(**overrides: Any) -> Batcher:
    options: dict[str, Any] = {
        "max_values": 1000,
        "max_keys": 1,
        "linger_s": 1.0,
        "max_open_batches": 100,
    }
    options.update(overrides)
    return Batcher(**options)


def test_same_scm_data_merges_and_duplicates_are_dropped_and_counted() -> None:
    b = batcher()
    assert b.add(pending(["a", "b"]), 0.0)[0] == []
    assert b.add(pending(["b", "c"], scm_data={"intended_market": "DE"}), 0.1)[0] == []
    (batch,) = b.close_all()
    assert batch.constraints() == {"extended_id": ["a", "b", "c"]}
    assert b.deduplicated == 1
    assert len(batch.events()) == 2
    assert batch.flush_reason is FlushReason.SHUTDOWN


@pytest.mark.parametrize(
    "other",
    [
        {"scm_data": {"intended_market": "FR"}},
        {"campaign": 12},
        {"reference": "other"},
        {"key": "serial_number"},
    ],
)
def test_different_batch_keys_never_merge(other: dict[str, Any]) -> None:
    b = batcher()
    b.add(pending(["a"], campaign=11), 0.0)
    key = other.pop("key", "extended_id")
    b.add(pending(["a"], key=key, **{"campaign": 11, **other}), 0.0)
    assert b.open_batches == 2


def test_full_batch_is_ready_at_max_values_and_big_events_split() -> None:
    b = batcher(max_values=3)
    ready, placed = b.add(pending(["a", "b", "c", "d", "e", "f", "g"]), 0.0)
    assert [batch.constraints()["extended_id"] for batch in ready] == [
        ["a", "b", "c"],
        ["d", "e", "f"],
    ]
    assert all(batch.flush_reason is FlushReason.FULL for batch in ready)
    assert len(placed) == 3
    assert placed[0][1].event.parts == 3
    (rest,) = b.close_all()
    assert rest.constraints() == {"extended_id": ["g"]}


def test_linger_flushes_the_oldest_batches_first() -> None:
    b = batcher(linger_s=1.0)
    b.add(pending(["a"]), 0.0)
    b.add(pending(["b"], scm_data={"lot": "1"}), 0.5)
    assert b.next_deadline() == 1.0
    assert b.due(0.9) == []
    (first,) = b.due(1.0)
    assert first.constraints() == {"extended_id": ["a"]}
    assert first.flush_reason is FlushReason.LINGER
    assert [batch.scm_data for batch in b.due(1.6)] == [{"lot": "1"}]
    assert b.next_deadline() is None


def test_a_limited_due_leaves_the_rest_open_to_keep_filling() -> None:
    b = batcher(linger_s=1.0)
    for lot in ("1", "2", "3"):
        b.add(pending(f"A{lot}", scm_data={"lot": lot}), 0.0)
    (first,) = b.due(2.0, limit=1)
    assert first.scm_data == {"lot": "1"}
    assert b.open_batches == 2
    # The due batches left open still take values until they are taken.
    b.add(pending("B2", scm_data={"lot": "2"}), 2.5)
    second, third = b.due(3.0, limit=5)
    assert second.constraints() == {"extended_id": ["A2", "B2"]}
    assert third.scm_data == {"lot": "3"}
    assert b.due(3.0, limit=0) == []


def test_batch_size_counts_every_value_attached() -> None:
    b = batcher(max_values=10)
    b.add(pending(["A", "B", "C"], scm_data={"lot": "1"}), 0.0)
    b.add(pending(["C", "D"], scm_data={"lot": "1"}), 0.0)
    (batch,) = b.close_all()
    assert batch.size == 4 == sum(len(v) for v in batch.constraints().values())


def test_too_many_open_batches_sends_the_oldest() -> None:
    b = batcher(max_open_batches=2)
    for market in ("A", "B"):
        b.add(pending(["x"], scm_data={"m": market}), 0.0)
    ready, _ = b.add(pending(["x"], scm_data={"m": "C"}), 0.0)
    assert [batch.scm_data for batch in ready] == [{"m": "A"}]
    assert ready[0].flush_reason is FlushReason.OPEN_BATCHES


def test_max_keys_shares_a_request_across_constraint_keys() -> None:
    b = batcher(max_keys=2)
    b.add(pending(["a"]), 0.0)
    b.add(pending(["s1"], key="serial_number"), 0.0)
    ready, _ = b.add(pending(["r1"], key="rfid"), 0.0)
    assert [batch.constraints() for batch in ready] == [
        {"extended_id": ["a"], "serial_number": ["s1"]}
    ]
    assert ready[0].flush_reason is FlushReason.KEYS
    (rest,) = b.close_all()
    assert rest.constraints() == {"rfid": ["r1"]}


def test_max_values_counts_all_keys_of_a_request() -> None:
    b = batcher(max_keys=2, max_values=3)
    b.add(pending(["a", "b"]), 0.0)
    ready, _ = b.add(pending(["s1", "s2"], key="serial_number"), 0.0)
    assert [batch.size for batch in ready] == [3]


def test_expected_codes_of_a_batch() -> None:
    b = batcher()
    b.add(pending(["a", "b"]), 0.0)
    b.add(pending(["b", "c"]), 0.0)  # b is a duplicate: three codes in all
    (batch,) = b.close_all()
    assert batch.expected_codes(()) == 3
    b.add(pending(["p1"], key="pallet"), 0.0)
    (pallets,) = b.close_all()
    assert pallets.expected_codes(()) is None
    assert pallets.expected_codes(("pallet",)) == 1
    b.add(pending(["p2"], key="pallet", expected_codes=240), 0.0)
    b.add(pending(["p3"], key="pallet", expected_codes=240), 0.0)
    (declared,) = b.close_all()
    assert declared.expected_codes(()) == 480


def test_a_split_event_with_declared_expectation_makes_it_unknown() -> None:
    b = batcher(max_values=2)
    ready, _ = b.add(pending(["p1", "p2", "p3"], key="pallet", expected_codes=3), 0.0)
    assert ready[0].expected_codes(()) is None


def test_discard_forgets_open_batches() -> None:
    b = batcher()
    b.add(pending(["a"]), 0.0)
    assert len(b.discard()) == 1
    assert b.open_batches == 0
    assert b.close_all() == []


def test_a_request_is_bounded_in_bytes_as_well_as_values() -> None:
    b = batcher(max_bytes=3000)
    long_codes = [f"{n:04d}" + "x" * 996 for n in range(7)]  # 1000 bytes each
    ready, _ = b.add(pending(long_codes), 0.0)
    assert [(batch.size, batch.value_bytes) for batch in ready] == [(3, 3000), (3, 3000)]
    assert all(batch.flush_reason is FlushReason.BYTES for batch in ready)
    (rest,) = b.close_all()
    assert rest.constraints()["extended_id"] == long_codes[6:]
    # A value alone over the bound still goes, alone; non-ASCII counts its UTF-8 bytes.
    big = batcher(max_bytes=10)
    ready, _ = big.add(pending(["é" * 6, "a"]), 0.0)
    assert [batch.constraints()["extended_id"] for batch in ready] == [["é" * 6]]
    assert ready[0].value_bytes == 12


def several(constraints: dict[str, Any], **fields: Any) -> PendingEvent:
    """An event with several constraint keys."""
    scm_data = fields.pop("scm_data", {"intended_market": "DE"})
    event = ChangeEvent.model_validate({"constraints": constraints, "scm_data": scm_data, **fields})
    offset = next(_offsets)
    return PendingEvent(Source("in", 0, offset, f"e{offset}"), event, b"{}", None, 0)


@pytest.mark.parametrize("max_keys", [1, 5])
def test_an_event_with_several_keys_is_a_request_of_its_own_at_once(max_keys: int) -> None:
    b = batcher(max_keys=max_keys)
    b.add(pending(["a"]), 0.0)
    b.add(pending(["r9"], key="rfid"), 0.0)
    multi = several({"extended_id": ["a", "b"], "rfid": "r1"})
    ready, placed = b.add(multi, 0.0)
    (alone,) = ready
    # Exactly the event's constraints: "a" is in an open batch with the same scm_data, yet
    # neither merged into it nor dropped as a duplicate.
    assert alone.constraints() == {"extended_id": ["a", "b"], "rfid": ["r1"]}
    assert alone.flush_reason is FlushReason.MULTI_KEY
    assert alone.events() == [multi]
    assert (alone.size, alone.value_bytes) == (3, 4)
    assert [(batch, part.constraint_key, part.values) for batch, part in placed] == [
        (alone, "extended_id", ("a", "b")),
        (alone, "rfid", ("r1",)),
    ]
    assert multi.parts == 2
    assert b.deduplicated == 0
    # The single-key events around it merge among themselves only, as before.
    b.add(pending(["c"]), 0.0)
    rest = b.close_all()
    merged = (
        [{"extended_id": ["a", "c"]}, {"rfid": ["r9"]}]
        if max_keys == 1
        else [{"extended_id": ["a", "c"], "rfid": ["r9"]}]
    )
    assert [batch.constraints() for batch in rest] == merged
    assert all(multi not in batch.events() for batch in rest)


def test_an_event_with_several_keys_is_never_split() -> None:
    # The contract keeps out an event that would not fit the relay's requests; the
    # batcher never cuts one, whatever its own bounds.
    b = batcher(max_values=2, max_bytes=1024)
    ready, _ = b.add(several({"extended_id": ["a", "b"], "rfid": ["r1", "r2"]}), 0.0)
    assert [batch.size for batch in ready] == [4]
    assert b.open_batches == 0


def test_two_events_with_the_same_keys_are_two_requests() -> None:
    b = batcher(max_keys=5)
    first, _ = b.add(several({"extended_id": "a", "rfid": "r"}), 0.0)
    second, _ = b.add(several({"extended_id": "b", "rfid": "s"}), 0.0)
    assert [batch.constraints() for batch in first + second] == [
        {"extended_id": ["a"], "rfid": ["r"]},
        {"extended_id": ["b"], "rfid": ["s"]},
    ]
    assert first[0].batch_id != second[0].batch_id


def test_expected_codes_of_an_event_with_several_keys() -> None:
    b = batcher()
    (identifiers,), _ = b.add(several({"extended_id": ["a", "b"], "serial_number": "a"}), 0.0)
    assert identifiers.expected_codes(()) == 3
    (mixed,), _ = b.add(several({"extended_id": ["a", "b"], "pallet": "p"}), 0.0)
    assert mixed.expected_codes(()) is None
    assert mixed.expected_codes(("pallet",)) == 3
    (declared,), _ = b.add(several({"extended_id": "a", "pallet": "p"}, expected_codes=240), 0.0)
    assert declared.expected_codes(()) == 240
