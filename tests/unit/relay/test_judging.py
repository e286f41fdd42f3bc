"""An input record judged by the contract (service/relay/judging.py): an event to batch
with where it was read, or a dead letter carrying the record's bytes unchanged."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from service.core.batching import PendingEvent, Source
from service.core.contract_limits import DEFAULT_LIMITS
from service.metrics import RelayMetrics
from service.relay.judging import judge
from service.relay.messages import DeadLetter
from tests.unit.relay.fakes import Record, change


def test_a_valid_record_becomes_an_event_with_its_position_and_read_time() -> None:
    metrics = RelayMetrics(CollectorRegistry())
    raw = change(["a", "b"], event_id="e-1")
    judged = judge(Record("in", 2, 7, b"k", raw), DEFAULT_LIMITS, metrics, lambda: 12.5)
    assert isinstance(judged, PendingEvent)
    assert judged.source == Source("in", 2, 7, "e-1")
    assert (judged.raw, judged.key, judged.received_at) == (raw, b"k", 12.5)
    assert judged.event.constraints == {"extended_id": ("a", "b")}


def test_a_refused_record_becomes_its_dead_letter_and_is_counted_by_reason() -> None:
    metrics = RelayMetrics(CollectorRegistry())
    judged = judge(Record("in", 1, 3, b"k", b"{not json"), DEFAULT_LIMITS, metrics, lambda: 0.0)
    assert isinstance(judged, DeadLetter)
    assert (judged.source, judged.raw, judged.key) == (Source("in", 1, 3), b"{not json", b"k")
    headers = judged.headers
    assert (headers.reason.value, headers.source_partition, headers.source_offset) == (
        "invalid_json",
        1,
        3,
    )
    counted = metrics.registry.get_sample_value(
        "scm_relay_events_invalid_total", {"reason": "invalid_json"}
    )
    assert counted == 1


def test_a_record_without_a_value_is_refused_not_lost() -> None:
    metrics = RelayMetrics(CollectorRegistry())
    judged = judge(Record("in", 0, 0, None, None), DEFAULT_LIMITS, metrics, lambda: 0.0)
    assert isinstance(judged, DeadLetter)
    assert judged.raw == b""
