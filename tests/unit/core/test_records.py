"""The records scm-relay writes: ledger, outcome and dead-letter headers."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from service.core.reasons import Reason, Stage
from service.core.records import (
    HEADER_API_BODY,
    HEADER_REASON,
    MAX_API_BODY_BYTES,
    MAX_MESSAGE_BYTES,
    DeadLetterHeaders,
    EventSource,
    TaskLedgerRecord,
    TaskOutcome,
    TaskState,
    truncate_utf8,
)

NOW = datetime(2026, 11, 28, 1, 2, 3, tzinfo=UTC)


def ledger() -> TaskLedgerRecord:
    return TaskLedgerRecord(
        task_id="efe7dcd5",
        batch_id="b-1",
        submitted_at=NOW,
        campaign=11,
        reference="line 7",
        scm_data={"intended_market": "DE"},
        constraints={"extended_id": ["0A70X1", "0A70X2"]},
        expected_codes=2,
        events=[EventSource(topic="scm.changes", partition=0, offset=41, event_id="mes-1")],
    )


def test_ledger_record_round_trips_through_json() -> None:
    record = ledger()
    assert TaskLedgerRecord.model_validate_json(record.model_dump_json()) == record
    assert record.schema_version == 1


def test_ledger_record_refuses_naive_times_and_empty_events() -> None:
    data = ledger().model_dump()
    with pytest.raises(ValidationError, match="timezone"):
        TaskLedgerRecord.model_validate({**data, "submitted_at": "2026-11-28T01:02:03"})
    with pytest.raises(ValidationError, match="at least 1 item"):
        TaskLedgerRecord.model_validate({**data, "events": []})
    with pytest.raises(ValidationError, match="Extra inputs"):
        TaskLedgerRecord.model_validate({**data, "surprise": 1})


def test_outcome_round_trips_through_json() -> None:
    outcome = TaskOutcome(
        task_id="efe7dcd5",
        state=TaskState.COMPLETE,
        codes_affected=1,
        expected_codes=2,
        shortfall=1,
        short=True,
        campaign=11,
        reference="line 7",
        scm_data={"intended_market": "DE"},
        constraints={"extended_id": ["0A70X1", "0A70X2"]},
        events=[EventSource(topic="scm.changes", partition=0, offset=41)],
        submitted_at=NOW,
        created_at=NOW,
        started_at=NOW,
        completed_at=NOW,
        published_at=NOW,
    )
    assert TaskOutcome.model_validate_json(outcome.model_dump_json()) == outcome


def test_dead_letter_headers_round_trip() -> None:
    headers = DeadLetterHeaders(
        stage=Stage.API,
        reason=Reason.API_REJECTED,
        message="the API refused the batch",
        source_topic="scm.changes",
        source_partition=3,
        source_offset=1234,
        api_status=400,
        api_body='{"campaign": ["Incorrect type."]}',
    )
    kafka_headers = headers.to_kafka()
    assert (HEADER_REASON, b"api_rejected") in kafka_headers
    assert dict(kafka_headers)["scm_relay.source.offset"] == b"1234"
    assert DeadLetterHeaders.from_kafka([*kafka_headers, ("foreign", b"x")]) == headers


def test_dead_letter_headers_without_api_fields_omit_them() -> None:
    headers = DeadLetterHeaders(
        stage=Stage.DECODE,
        reason=Reason.NOT_UTF8,
        message="not UTF-8",
        source_topic="t",
        source_partition=0,
        source_offset=0,
    )
    names = [name for name, _ in headers.to_kafka()]
    assert names == [
        "scm_relay.error.stage",
        "scm_relay.error.reason",
        "scm_relay.error.message",
        "scm_relay.source.topic",
        "scm_relay.source.partition",
        "scm_relay.source.offset",
    ]


def test_dead_letter_message_and_api_body_are_bounded() -> None:
    headers = DeadLetterHeaders(
        stage=Stage.API,
        reason=Reason.API_REJECTED,
        message="m" * 5000,
        source_topic="t",
        source_partition=0,
        source_offset=0,
        api_status=400,
        api_body="é" * 10_000,
    )
    encoded = dict(headers.to_kafka())
    assert len(encoded["scm_relay.error.message"]) <= MAX_MESSAGE_BYTES
    body = encoded[HEADER_API_BODY]
    assert len(body) <= MAX_API_BODY_BYTES
    assert body.decode("utf-8").endswith("[truncated]")


@pytest.mark.parametrize("size", [0, 1, 10, 11, 12, 100])
def test_truncate_utf8_never_splits_a_character(size: int) -> None:
    text = "aé東" * 10
    cut = truncate_utf8(text, max(size, 20))
    assert len(cut.encode("utf-8")) <= max(size, 20)
    assert cut == text or cut.endswith("[truncated]")
