"""service/tools/dlq.py's pure parts: --since, --offsets, the selection, the field header."""

from __future__ import annotations

import datetime as dt

import pytest

from service.core.reasons import Reason, Stage
from service.core.records import DeadLetterHeaders
from service.tools.dlq import DeadLetterRecord, Selection, UsageError, parse_offsets, parse_since

NOW = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)


def letter(partition: int, offset: int, reason: Reason, at: dt.datetime) -> DeadLetterRecord:
    headers = DeadLetterHeaders(
        stage=reason.stage,
        reason=reason,
        message="m",
        source_topic="in",
        source_partition=0,
        source_offset=offset,
    )
    return DeadLetterRecord(partition, offset, int(at.timestamp() * 1000), None, b"x", headers)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30m", NOW - dt.timedelta(minutes=30)),
        ("2h", NOW - dt.timedelta(hours=2)),
        ("7d", NOW - dt.timedelta(days=7)),
        ("2026-11-28", dt.datetime(2026, 11, 28, tzinfo=dt.UTC)),
        ("2026-11-28T10:00:00+01:00", dt.datetime(2026, 11, 28, 9, tzinfo=dt.UTC)),
    ],
)
def test_since_takes_a_duration_or_an_iso_time(text: str, expected: dt.datetime) -> None:
    assert parse_since(text, NOW) == int(expected.timestamp() * 1000)


def test_since_refuses_anything_else() -> None:
    with pytest.raises(UsageError, match="duration"):
        parse_since("yesterday", NOW)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("3", (None, 3, 3)), ("3-9", (None, 3, 9)), ("1:3-9", (1, 3, 9)), ("2:5", (2, 5, 5))],
)
def test_offsets(text: str, expected: tuple[int | None, int, int]) -> None:
    assert parse_offsets(text) == expected


@pytest.mark.parametrize("text", ["9-3", "a-b", "1:2:3", "-4"])
def test_offsets_refused(text: str) -> None:
    with pytest.raises(UsageError):
        parse_offsets(text)


def test_a_selection_combines_reason_time_and_offsets() -> None:
    old = letter(0, 1, Reason.INVALID_JSON, NOW - dt.timedelta(days=2))
    new = letter(0, 2, Reason.INVALID_JSON, NOW)
    other = letter(1, 2, Reason.API_REJECTED, NOW)
    since = int((NOW - dt.timedelta(hours=1)).timestamp() * 1000)
    assert [
        x.takes(new) for x in (Selection(reason="invalid_json"), Selection(since_ms=since))
    ] == [
        True,
        True,
    ]
    assert not Selection(since_ms=since).takes(old)
    assert not Selection(reason="invalid_json").takes(other)
    assert Selection(offsets=(None, 2, 2)).takes(other)
    assert not Selection(offsets=(0, 2, 2)).takes(other)


def test_the_field_header_round_trips_and_old_dead_letters_have_none() -> None:
    headers = DeadLetterHeaders(
        stage=Stage.VALIDATE,
        reason=Reason.SCM_DATA_KEY_STATUS,
        message="m",
        source_topic="in",
        source_partition=0,
        source_offset=4,
        field="scm_data.status",
    )
    kafka = headers.to_kafka()
    assert ("scm_relay.error.field", b"scm_data.status") in kafka
    assert DeadLetterHeaders.from_kafka(kafka).field == "scm_data.status"
    without = [(name, value) for name, value in kafka if name != "scm_relay.error.field"]
    assert DeadLetterHeaders.from_kafka(without).field is None
