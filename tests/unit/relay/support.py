"""Building blocks of the stage tests: events, batches, ledger records."""

from __future__ import annotations

import itertools
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from service.core.batching import Batch, Batcher, GroupKey, PendingEvent, Source
from service.core.contract import ChangeEvent
from service.core.contract_limits import DEFAULT_LIMITS, ContractLimits
from service.core.parsing import ParsedEvent, parse_event
from service.core.reasons import Reason, Stage
from service.core.records import DeadLetterHeaders, TaskLedgerRecord
from service.relay.messages import DeadLetter
from service.scantrust.outcomes import ApiTask, TaskApiState

_offsets = itertools.count()


def pending(
    values: list[str], market: str = "DE", partition: int = 0, reference: str | None = None
) -> PendingEvent:
    """A validated event as intake holds it."""
    document: dict[str, Any] = {
        "constraints": {"extended_id": values},
        "scm_data": {"intended_market": market},
    }
    if reference is not None:
        document["reference"] = reference
    raw = json.dumps(document).encode()
    parsed = parse_event(raw, DEFAULT_LIMITS)
    assert isinstance(parsed, ParsedEvent)
    return PendingEvent(Source("in", partition, next(_offsets)), parsed.event, raw, None, 0.0)


def batch(values: list[str], market: str = "DE", reference: str | None = None) -> Batch:
    """A closed batch of one event."""
    batcher = Batcher(max_values=len(values), max_keys=1, linger_s=1.0, max_open_batches=10)
    ready, _ = batcher.add(pending(values, market, reference=reference), 0.0)
    (full,) = ready
    return full


def dead_letter(offset: int) -> DeadLetter:
    """Intake's dead letter of a record at `offset` of partition 0 that is not JSON."""
    headers = DeadLetterHeaders(
        stage=Stage.DECODE,
        reason=Reason.INVALID_JSON,
        message="not JSON",
        source_topic="in",
        source_partition=0,
        source_offset=offset,
    )
    return DeadLetter(Source("in", 0, offset), b"{", b"k", headers)


def ledger_record(
    task_id: str, values: list[str], market: str = "DE", **fields: Any
) -> TaskLedgerRecord:
    """A ledger record of a task that writes `market` to `values`."""
    document: dict[str, Any] = {
        "task_id": task_id,
        "batch_id": f"batch-of-{task_id}",
        "submitted_at": datetime.now(UTC),
        "campaign": None,
        "reference": "",
        "scm_data": {"intended_market": market},
        "constraints": {"extended_id": values},
        "expected_codes": len(values),
        "events": [{"topic": "in", "partition": 0, "offset": 0}],
    }
    document.update(fields)
    return TaskLedgerRecord.model_validate(document)


def api_task(
    task_id: str,
    state: TaskApiState,
    codes_affected: int | None = None,
    *,
    reference: str = "",
    details: dict[str, Any] | None = None,
    age_s: float = 0.0,
) -> ApiTask:
    """A task as the API reports it, created `age_s` ago."""
    return ApiTask.model_validate(
        {
            "id": task_id,
            "state": state.value,
            "reference": reference,
            "codes_affected": codes_affected,
            "created_at": (datetime.now(UTC) - timedelta(seconds=age_s)).isoformat(),
            "details": details,
        }
    )


def batch_key(event: ChangeEvent) -> GroupKey:
    """The key of the batch `event` joins (one constraint key per request)."""
    return Batcher(max_values=1000, max_keys=1, linger_s=1.0, max_open_batches=1).group_of(event)


def expected_codes(event: ChangeEvent, limits: ContractLimits = DEFAULT_LIMITS) -> int | None:
    """The expected codes of a request carrying `event` alone."""
    batcher = Batcher(max_values=1000, max_keys=1, linger_s=1.0, max_open_batches=1)
    ready, _ = batcher.add(PendingEvent(Source("in", 0, 0), event, b"", None, 0.0), 0.0)
    (only,) = ready + batcher.close_all()  # an event with several keys is ready at once
    return only.expected_codes(limits.one_code_per_value_keys)
