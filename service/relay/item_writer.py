"""What each item the committer takes becomes in its open transaction.

An intent, a ledger record with its intent's closure, a dead letter, an API
rejection's dead letters, a result with its tombstone, a progress record: each
written to its topic, with the bookkeeping that goes with it in the same step
(intake's offset book through `Accounting`, the ledger view's memory of what this
process wrote). The committer decides when a transaction begins and commits and
what offsets it carries; this writes what goes in between, so neither concern
has to be read through the other.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Protocol

import structlog

from service.core.batching import Batch, Done, EventIdentity, Source
from service.core.reasons import Reason, Stage
from service.core.records import (
    DeadLetterHeaders,
    IntentClosure,
    IntentOutcome,
    IntentRecord,
    TaskLedgerRecord,
    intent_key,
)
from service.metrics import RelayMetrics
from service.relay.config import RelayConfig
from service.relay.messages import (
    ApiRejection,
    CommitItem,
    DeadLetter,
    IntentWrite,
    LedgerAppend,
    Progress,
    TaskFinished,
)
from service.relay.ports import Accounting, TransactionalProducer

log = structlog.get_logger(__name__)


class WrittenLedger(Protocol):
    """Where the committer leaves the ledger records it wrote, so the ledger view takes
    them back instead of parsing them again."""

    def remember(self, record: TaskLedgerRecord) -> None:
        """`record` is in the transaction being committed."""

    def remember_intent(self, key: str, entry: IntentRecord | IntentClosure) -> None:
        """An intent or its closure is in the transaction being committed."""


class ItemWriter:
    """Writes one `CommitItem` at a time into the producer's open transaction."""

    def __init__(
        self,
        config: RelayConfig,
        *,
        producer: TransactionalProducer,
        accounting: Accounting,
        written: WrittenLedger,
        metrics: RelayMetrics,
    ) -> None:
        self._config = config
        self._producer = producer
        self._accounting = accounting
        self._written = written
        self._metrics = metrics
        # Events of rejected batches already dead-lettered: an event split over two
        # rejected batches, or read in again after one was (a copy), is written once.
        # The writer's own (no other stage reads it); keyed by the identity every copy
        # of the event shares, and weak, so an event leaves it with its last copy.
        self._rejected: weakref.WeakSet[EventIdentity] = weakref.WeakSet()

    async def write(self, item: CommitItem, finished: list[Callable[[], None]]) -> None:
        """Write `item`; an item whose batch or partition is no longer this replica's is
        refused (`refused` set) or dropped. What must run once the transaction commits is
        appended to `finished`."""
        config, producer = self._config, self._producer
        if isinstance(item, IntentWrite):
            if not self._accounting.claim_intent(item.record.batch_id):
                item.refused = True
                return
            intent = intent_key(item.record.batch_id)
            await producer.send(
                config.kafka.tasks_topic,
                key=intent.encode(),
                value=item.record.model_dump_json().encode(),
            )
            self._written.remember_intent(intent, item.record)
        elif isinstance(item, LedgerAppend):
            if not self._accounting.owns(item.batch):
                # Queued before a rebalance, committed after it: the partitions' new owner
                # resolves the batch's intent (and records its task) instead.
                item.refused = True
                return
            for record in (item.record, *item.more):
                await producer.send(
                    config.kafka.tasks_topic,
                    key=record.task_id.encode(),
                    value=record.model_dump_json().encode(),
                )
                self._written.remember(record)
            self._account(item.batch, item.sources)
            task_ids = [item.record.task_id, *(record.task_id for record in item.more)]
            await self._close_intent(item.batch.batch_id, IntentOutcome.RECORDED, task_ids)
        elif isinstance(item, DeadLetter):
            source = item.source
            if not self._accounting.owns_partition(source.topic, source.partition, item.owner):
                # Queued before a rebalance, committed after it: the partition's owner
                # reads the record again and dead-letters it.
                log.info(
                    "dead_letter_dropped_partition_moved",
                    partition=source.partition,
                    offset=source.offset,
                )
                return
            value, headers = item.headers.bounded_value(
                item.raw, config.dead_letter_max_bytes, config.dead_letter_prefix_bytes
            )
            await producer.send(
                config.kafka.dlq_topic, key=item.key, value=value, headers=headers.to_kafka()
            )
            source = item.source
            self._accounting.dead_lettered(source.topic, source.partition, source.offset)
            self._metrics.dead_letters.labels(
                item.headers.stage.value, item.headers.reason.value
            ).inc()
        elif isinstance(item, ApiRejection):
            if not self._accounting.owns(item.batch):
                # As a record: the partitions' new owner resolves the batch's intent.
                log.info("rejection_dropped_partitions_moved", batch_id=item.batch.batch_id)
                return
            await self._write_rejection(item)
            self._account(item.batch, item.sources)
            await self._close_intent(item.batch.batch_id, IntentOutcome.REJECTED, [])
        elif isinstance(item, TaskFinished):
            outcome = item.outcome
            key = outcome.task_id.encode()
            await producer.send(
                config.kafka.results_topic, key=key, value=outcome.model_dump_json().encode()
            )
            await producer.send(config.kafka.tasks_topic, key=key, value=None)
            finished.append(item.done)
        elif isinstance(item, Progress):
            await producer.send(
                config.kafka.results_topic,
                key=item.progress.task_id.encode(),
                value=item.progress.model_dump_json().encode(),
            )

    def _account(self, batch: Batch, sources: list[Done] | None) -> None:
        self._accounting.batch_recorded(batch)
        if sources is not None:
            # A resolved intent: its events are accounted by position (see Resolution).
            self._accounting.sources_done(sources)

    async def _close_intent(
        self, batch_id: str, outcome: IntentOutcome, task_ids: list[str]
    ) -> None:
        """The intent's closure and its tombstone, in this transaction: the intent ends
        exactly when what it promised is written."""
        key = intent_key(batch_id)
        closure = IntentClosure(batch_id=batch_id, outcome=outcome, task_ids=task_ids)
        topic = self._config.kafka.tasks_topic
        await self._producer.send(topic, key=key.encode(), value=closure.model_dump_json().encode())
        self._written.remember_intent(key, closure)
        await self._producer.send(topic, key=key.encode(), value=None)

    async def _write_rejection(self, item: ApiRejection) -> None:
        """Every event of a rejected batch, dead-lettered once (an event split over two
        rejected batches is written once). The events of a resolved intent this process
        never read (another replica's partitions) are dead-lettered by position: their
        position stands in for their bytes."""
        held = set()
        for pending in item.batch.events():
            source = pending.source
            held.add((source.topic, source.partition, source.offset))
            if pending.identity not in self._rejected:
                self._rejected.add(pending.identity)
                await self._dead_letter_rejected(item, source, pending.raw, pending.key)
        for done in item.sources or []:
            if (done.topic, done.partition, done.offset) not in held:
                await self._dead_letter_rejected(item, done, b"", None)

    async def _dead_letter_rejected(
        self, item: ApiRejection, source: Source | Done, raw: bytes, key: bytes | None
    ) -> None:
        unread = "" if raw else "; its original is at the source position"
        headers = DeadLetterHeaders(
            stage=Stage.API,
            reason=Reason.API_REJECTED,
            message=f"the API refused the request carrying this event "
            f"(HTTP {item.outcome.status}){unread}",
            source_topic=source.topic,
            source_partition=source.partition,
            source_offset=source.offset,
            api_status=item.outcome.status,
            api_body=item.outcome.body,
        )
        value, bounded = headers.bounded_value(
            raw, self._config.dead_letter_max_bytes, self._config.dead_letter_prefix_bytes
        )
        await self._producer.send(
            self._config.kafka.dlq_topic, key=key, value=value, headers=bounded.to_kafka()
        )
