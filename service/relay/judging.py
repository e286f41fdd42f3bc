"""An input record judged by the event contract: the event to batch, or the dead
letter of a record the contract refused (its bytes, unchanged, with the reason)."""

from __future__ import annotations

from collections.abc import Callable

import structlog

from service.core.batching import PendingEvent, Source
from service.core.contract_limits import ContractLimits
from service.core.parsing import ParsedEvent, parse_event
from service.core.reasons import Rejection
from service.core.records import DeadLetterHeaders
from service.metrics import RelayMetrics
from service.relay.messages import DeadLetter
from service.relay.ports import FetchedRecord

log = structlog.get_logger(__name__)


def judge(
    record: FetchedRecord,
    limits: ContractLimits,
    metrics: RelayMetrics,
    clock: Callable[[], float],
) -> PendingEvent | DeadLetter:
    """The event `record` carries, or its dead letter; invalid records and date warnings
    are counted and logged."""
    raw: bytes = record.value if record.value is not None else b""
    parsed = parse_event(raw, limits)
    if not isinstance(parsed, ParsedEvent):
        metrics.events_invalid.labels(parsed.reason.value).inc()
        log.warning(
            "event_invalid",
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            reason=parsed.reason.value,
            field=parsed.field,
            message=parsed.message,
        )
        return dead_letter(record, raw, parsed)
    event = parsed.event
    if parsed.warnings:
        metrics.date_warnings.inc(len(parsed.warnings))
        log.warning(
            "event_warning",
            event_id=event.event_id,
            partition=record.partition,
            offset=record.offset,
            warnings=list(parsed.warnings),
        )
    return PendingEvent(
        Source(record.topic, record.partition, record.offset, event.event_id),
        event,
        raw,
        record.key,
        clock(),
    )


def dead_letter(record: FetchedRecord, raw: bytes, refused: Rejection) -> DeadLetter:
    """The dead letter of an input record the contract refused: its bytes, unchanged."""
    headers = DeadLetterHeaders(
        stage=refused.stage,
        reason=refused.reason,
        message=refused.message,
        source_topic=record.topic,
        source_partition=record.partition,
        source_offset=record.offset,
        field=refused.field,
    )
    return DeadLetter(
        Source(record.topic, record.partition, record.offset), raw, record.key, headers
    )
