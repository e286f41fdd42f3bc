"""The committer: the relay's one writer to Kafka.

Each round takes what the other stages queued (ledger records of uploaded
batches, dead letters, API rejections, results with their tombstones, progress
records) and writes it in one Kafka transaction together with the input offsets
it accounts for. Nothing a stage hands it counts as done until that transaction
commits: `record` and `flush` return only then.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from typing import Final, Protocol

import structlog
from aiokafka import TopicPartition

from service.core.contract import Reason, Stage
from service.core.records import DeadLetterHeaders, TaskLedgerRecord
from service.metrics import RelayMetrics
from service.relay.config import RelayConfig
from service.relay.messages import (
    ApiRejection,
    CommitItem,
    DeadLetter,
    Flush,
    LedgerAppend,
    Progress,
    TaskFinished,
)
from service.relay.ports import Accounting, TransactionalProducer

log = structlog.get_logger(__name__)

COMMIT_BATCH_MAX: Final = 500


class WrittenLedger(Protocol):
    """Where the committer leaves the ledger records it wrote, so the ledger view takes
    them back instead of parsing them again."""

    def remember(self, record: TaskLedgerRecord) -> None:
        """`record` is in the transaction being committed."""


class Committer:
    """Commits the other stages' work, one Kafka transaction per round."""

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
        # None closes the queue: the committer commits what came before it and returns.
        self._queue: asyncio.Queue[CommitItem | None] = asyncio.Queue(maxsize=COMMIT_BATCH_MAX * 4)

    async def submit(self, item: CommitItem) -> None:
        """Queue `item` for the next transaction (waits for room)."""
        await self._queue.put(item)

    async def record(self, append: LedgerAppend) -> None:
        """Queue a ledger record and wait until it is committed."""
        await self._queue.put(append)
        await append.recorded

    async def flush(self) -> None:
        """Wait until everything queued so far is committed."""
        flush = Flush()
        await self._queue.put(flush)
        await flush.flushed

    async def close(self) -> None:
        """Commit what is queued, then end `run`."""
        await self._queue.put(None)

    async def run(self) -> None:
        """Commit rounds until closed."""
        while True:
            items = [await self._queue.get()]
            while len(items) < COMMIT_BATCH_MAX and not self._queue.empty():
                items.append(self._queue.get_nowait())
            work = [item for item in items if item is not None]
            if work:
                await self._commit(work)
            if len(work) < len(items):
                return

    async def _commit(self, items: Sequence[CommitItem]) -> None:
        """One Kafka transaction for `items` and the input offsets they release."""
        finished: list[Callable[[], None]] = []
        await self._producer.begin_transaction()
        try:
            for item in items:
                await self._write(item, finished)
            advanced = self._accounting.checkpoints()
            if advanced:
                offsets = {TopicPartition(t, p): point for (t, p), point in advanced.items()}
                await self._producer.send_offsets_to_transaction(offsets, self._config.group_id)
            await self._producer.commit_transaction()
        except BaseException:
            # Kafka refused the transaction: what it carried is unrecorded. Stop the process;
            # a restart re-reads from the last committed offsets (docs/guarantees.md).
            log.exception("transaction_failed", items=len(items))
            raise
        self._metrics.last_commit.set(time.time())
        for done in finished:
            done()
        for item in items:
            if isinstance(item, LedgerAppend) and not item.recorded.done():
                item.recorded.set_result(None)
            elif isinstance(item, Flush) and not item.flushed.done():
                item.flushed.set_result(None)
        if advanced:
            log.debug(
                "offsets_committed", offsets={f"{t}:{p}": o for (t, p), o in advanced.items()}
            )

    async def _write(self, item: CommitItem, finished: list[Callable[[], None]]) -> None:
        config, producer = self._config, self._producer
        if isinstance(item, LedgerAppend):
            record = item.record
            await producer.send(
                config.tasks_topic,
                key=record.task_id.encode(),
                value=record.model_dump_json().encode(),
            )
            self._written.remember(record)
            if item.accounts:
                self._accounting.batch_recorded(item.batch)
        elif isinstance(item, DeadLetter):
            value, headers = item.headers.bounded_value(
                item.raw, config.dead_letter_max_bytes, config.dead_letter_prefix_bytes
            )
            await producer.send(
                config.dlq_topic, key=item.key, value=value, headers=headers.to_kafka()
            )
            source = item.source
            self._accounting.dead_lettered(source.topic, source.partition, source.offset)
            self._metrics.dead_letters.labels(
                item.headers.stage.value, item.headers.reason.value
            ).inc()
        elif isinstance(item, ApiRejection):
            await self._write_rejection(item)
            self._accounting.batch_recorded(item.batch)
        elif isinstance(item, TaskFinished):
            outcome = item.outcome
            key = outcome.task_id.encode()
            await producer.send(
                config.results_topic, key=key, value=outcome.model_dump_json().encode()
            )
            await producer.send(config.tasks_topic, key=key, value=None)
            finished.append(item.done)
        elif isinstance(item, Progress):
            await producer.send(
                config.results_topic,
                key=item.progress.task_id.encode(),
                value=item.progress.model_dump_json().encode(),
            )

    async def _write_rejection(self, item: ApiRejection) -> None:
        """Every event of a rejected batch, dead-lettered once (an event split over two
        rejected batches is written once)."""
        for pending in item.batch.events():
            if pending.rejected:
                continue
            pending.rejected = True
            headers = DeadLetterHeaders(
                stage=Stage.API,
                reason=Reason.API_REJECTED,
                message=f"the API refused the request carrying this event "
                f"(HTTP {item.outcome.status})",
                source_topic=pending.source.topic,
                source_partition=pending.source.partition,
                source_offset=pending.source.offset,
                api_status=item.outcome.status,
                api_body=item.outcome.body,
            )
            value, bounded = headers.bounded_value(
                pending.raw,
                self._config.dead_letter_max_bytes,
                self._config.dead_letter_prefix_bytes,
            )
            await self._producer.send(
                self._config.dlq_topic, key=pending.key, value=value, headers=bounded.to_kafka()
            )
