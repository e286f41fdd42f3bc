"""One batch's upload as data: its request, its intents and its ledger records, built once.

The request the API gets, the event sources the intent and the ledger record
carry (validated once, then passed on as they are), and each fresh intent's send
window on both clocks (docs/design.md section 11). No I/O: the uploader decides
when each is written and sent.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any, Final, NamedTuple

from pydantic import TypeAdapter

from service.core.batching import Batch, Done, PendingEvent
from service.core.records import EventSource, IntentRecord, TaskLedgerRecord
from service.relay.config import RelayConfig, utcnow
from service.relay.reconcile import api_reference
from service.scantrust.client import UploadRequest

_EVENT_SOURCES: Final = TypeAdapter(list[EventSource])


class SendWindow(NamedTuple):
    """When an intent allows its upload to be sent, on both clocks, from one moment."""

    send_by: float  # Unix time: the intent's `send_by`
    deadline: float  # the event loop's monotonic clock


class UploadJob:
    """One batch's upload: its request, intent and ledger record, built once."""

    def __init__(
        self,
        batch: Batch,
        config: RelayConfig,
        resolving: IntentRecord | None = None,
        sources: list[Done] | None = None,
    ) -> None:
        self.batch = batch
        self._config = config
        self.request = UploadRequest(
            constraints=batch.constraints(),
            scm_data=batch.scm_data,
            campaign=batch.campaign,
            reference=api_reference(batch),
        )
        self.sources: list[Done] | None = None
        self.events: list[EventSource]
        # Requests that may have created a task (a resolved intent's attempts all may).
        self.sends = 0 if resolving is None else resolving.attempt + 1
        if resolving is None:
            self.first_sent = utcnow()
            events = batch.events()
            # Validated once here, then passed as they are into the intent and the ledger
            # record (pydantic takes model instances without checking them again).
            self.events = _EVENT_SOURCES.validate_python(_event_sources(batch, events))
            self.expected_codes = batch.expected_codes(
                config.limits.one_code_per_value_keys, events
            )
        else:
            self.first_sent = resolving.written_at
            self.events = list(resolving.events)
            self.expected_codes = resolving.expected_codes
            self.sources = sources

    def intent(self, attempt: int) -> tuple[IntentRecord, SendWindow]:
        """A fresh intent for the next send, and its send window: from now, for the
        configured time, on the wall clock (the intent's `send_by`, which other processes
        read) and on the event loop's monotonic clock (which no clock step moves)."""
        window_s = self._config.intent_send_window_s
        deadline = asyncio.get_running_loop().time() + window_s
        send_by = utcnow() + timedelta(seconds=window_s)
        record = IntentRecord.model_validate(
            {
                "batch_id": self.batch.batch_id,
                "api_reference": self.request.reference,
                "written_at": self.first_sent,
                "send_by": send_by,
                "resolve_after": send_by + timedelta(seconds=self._config.intent_resolve_delay_s),
                "attempt": attempt,
                "campaign": self.batch.campaign,
                "reference": self.batch.reference,
                "scm_data": self.batch.scm_data,
                "constraints": self.request.constraints,
                "expected_codes": self.expected_codes,
                "events": self.events,
            }
        )
        return record, SendWindow(record.send_by.timestamp(), deadline)

    def ledger_record(self, task_id: str, submitted_at: datetime) -> TaskLedgerRecord:
        """The task's ledger record. Validated as one document: pydantic checks the nested
        event sources in its core, several times cheaper than one model per event."""
        batch = self.batch
        return TaskLedgerRecord.model_validate(
            {
                "task_id": task_id,
                "batch_id": batch.batch_id,
                "submitted_at": submitted_at,
                "campaign": batch.campaign,
                "reference": batch.reference,
                "scm_data": batch.scm_data,
                "constraints": self.request.constraints,
                "expected_codes": self.expected_codes,
                "events": self.events,
            }
        )


def _event_sources(batch: Batch, events: list[PendingEvent]) -> list[dict[str, Any]]:
    """Each event the batch carries, by position; with the indexes of the values it
    carries when it carries only some (an event cut across batches, or partly done)."""
    covered: dict[int, set[int] | None] = {}
    for part in batch.parts:
        key = id(part.event)
        if part.covered is None:
            covered[key] = None
        elif key not in covered:
            covered[key] = set(part.covered)
        else:
            known = covered[key]
            if known is not None:
                known.update(part.covered)
    sources = []
    for pending in events:
        source = pending.source._asdict()
        values = covered.get(id(pending))
        if values is not None:
            source["values"] = sorted(values)
            source["total"] = pending.total
        sources.append(source)
    return sources
