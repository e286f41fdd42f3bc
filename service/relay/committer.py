"""The committer: the relay's one writer to Kafka.

Each round takes what the other stages queued (intents, ledger records of
uploaded batches, dead letters, API rejections, results with their tombstones,
progress records) and writes it in one Kafka transaction together with the
input offsets it accounts for. Nothing a stage hands it counts as done until
that transaction commits: `write_intent`, `record` and `flush` return only then.

Every transaction is fenced: its offset commit carries the input consumer's
group generation and member id (service/fencing.py), and when no offset moved
the commit points of the member's last assignment are committed again, so that
a replica whose partitions moved while it was paused can write nothing at all.
Such a transaction is aborted and the relay stops with `ReplicaFencedError`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from contextlib import suppress
from typing import Final, Protocol

import structlog
from aiokafka import TopicPartition
from aiokafka.errors import ProducerFenced

from service.core.batching import Batch, Done, Source
from service.core.contract import Reason, Stage
from service.core.offsets import Checkpoint
from service.core.records import (
    DeadLetterHeaders,
    IntentClosure,
    IntentOutcome,
    IntentRecord,
    TaskLedgerRecord,
    intent_key,
    progress_key,
)
from service.fencing import GroupFencedError
from service.metrics import RelayMetrics
from service.relay.config import RelayConfig, wall_time
from service.relay.messages import (
    ApiRejection,
    BatchRevokedError,
    CommitItem,
    DeadLetter,
    Flush,
    IntentWrite,
    LedgerAppend,
    Progress,
    ResultFence,
    TaskFinished,
)
from service.relay.ports import Accounting, TransactionalProducer

log = structlog.get_logger(__name__)

COMMIT_BATCH_MAX: Final = 500


class ReplicaFencedError(Exception):
    """The consumer group moved this replica's partitions to another member: what it
    holds is no longer its to commit. The transaction was aborted; the relay stops
    (and is restarted clean by its supervisor)."""


class Membership(Protocol):
    """The input consumer's group membership, as commits need it."""

    def group(self) -> str:
        """The group id, carrying the generation and member id to commit under."""


class WrittenLedger(Protocol):
    """Where the committer leaves the ledger records it wrote, so the ledger view takes
    them back instead of parsing them again."""

    def remember(self, record: TaskLedgerRecord) -> None:
        """`record` is in the transaction being committed."""

    def remember_intent(self, key: str, entry: IntentRecord | IntentClosure) -> None:
        """An intent or its closure is in the transaction being committed."""


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
        membership: Membership | None = None,
    ) -> None:
        self._config = config
        self._producer = producer
        self._accounting = accounting
        self._membership = membership
        self._written = written
        self._metrics = metrics
        # None closes the queue: the committer commits what came before it and returns.
        self._queue: asyncio.Queue[CommitItem | None] = asyncio.Queue(maxsize=COMMIT_BATCH_MAX * 4)
        self._free = asyncio.Event()  # cleared while a rebalance holds commits (`hold`)
        self._free.set()
        self._hold_round = 0  # moved on by every `resume`

    async def submit(self, item: CommitItem) -> None:
        """Queue `item` for the next transaction (waits for room)."""
        await self._queue.put(item)

    async def write_intent(self, intent: IntentWrite) -> None:
        """Queue an intent and wait until it is committed."""
        await self._queue.put(intent)
        await intent.written

    async def flush(self) -> None:
        """Wait until everything queued so far is committed."""
        flush = Flush()
        await self._queue.put(flush)
        await flush.flushed

    async def flush_and_hold(self) -> None:
        """Commit everything queued so far, then start no transaction until `resume`.

        Intake asks for this when the group revokes its partitions: until the group
        assigns partitions again, this member's generation may already be stale at the
        broker while the consumer still holds it, and a fenced commit would stop a replica
        that is no zombie. The hold is taken by the committer itself, in the same step
        that ends the flushing transaction: a transaction begun between the flush and a
        hold taken by the caller would run under the old generation while the group
        moves on (seen as ILLEGAL_GENERATION right after a rebalance)."""
        if not self._free.is_set():
            return  # already held: nothing more will be committed before `resume`
        flush = Flush(then_hold=True, hold_round=self._hold_round)
        await self._queue.put(flush)
        await flush.flushed

    def hold(self) -> None:
        """Start no new transaction until `resume` (one under way still ends): for a
        revoke whose flush did not finish in time."""
        self._free.clear()

    def resume(self) -> None:
        """The group assigned partitions (the generation is current): commit again."""
        self._hold_round += 1
        self._free.set()

    async def close(self) -> None:
        """Commit what is queued, then end `run`."""
        self._free.set()
        await self._queue.put(None)

    async def run(self) -> None:
        """Commit rounds until closed."""
        while True:
            await self._free.wait()
            items = [await self._queue.get()]
            while len(items) < COMMIT_BATCH_MAX and not self._queue.empty():
                items.append(self._queue.get_nowait())
            work = [item for item in items if item is not None]
            for transaction, fence in _transactions(work):
                await self._commit(transaction, fence)
            if len(work) < len(items):
                return

    async def _commit(self, items: Sequence[CommitItem], fence: ResultFence | None) -> None:
        """One Kafka transaction for `items` and the input offsets they release; results
        under `fence` are committed under the poller group's generation instead."""
        finished: list[Callable[[], None]] = []
        advanced: dict[tuple[str, int], Checkpoint] = {}
        await self._producer.begin_transaction()
        try:
            for item in items:
                await self._write(item, finished)
            if fence is not None:
                # Offset 0 of the task's ledger partition for the poller group, whose member
                # never reads: the commit carries the generation the result was polled under.
                marker = {TopicPartition(self._config.kafka.tasks_topic, fence.ledger_partition): 0}
                await self._producer.send_offsets_to_transaction(marker, fence.group)
            else:
                advanced = self._accounting.checkpoints()
                for (topic, partition), point in advanced.items():
                    if point.progress is not None:
                        # The partition's progress, in the transaction that commits its
                        # offset (whose metadata names this record).
                        await self._producer.send(
                            self._config.kafka.tasks_topic,
                            key=progress_key(topic, partition).encode(),
                            value=point.progress,
                        )
                points = {
                    key: (point.offset, point.metadata) for key, point in advanced.items()
                } or self._fence_points()
                if points:
                    offsets = {TopicPartition(t, p): point for (t, p), point in points.items()}
                    group = (
                        self._membership.group()
                        if self._membership
                        else self._config.kafka.group_id
                    )
                    await self._producer.send_offsets_to_transaction(offsets, group)
            await self._producer.commit_transaction()
        except (GroupFencedError, ProducerFenced) as exc:
            if isinstance(exc, GroupFencedError):
                # Cut off past transaction.timeout.ms, the broker has fenced the producer
                # as well and aborted the transaction itself: aborting again says so.
                with suppress(ProducerFenced):
                    await self._producer.abort_transaction()
            # (ProducerFenced: the broker already aborted it: this transaction outlived
            # transaction.timeout.ms, the replica was stopped, or a newer incarnation with
            # the same transactional id started.)
            log.error(
                "relay_fenced",
                error=str(exc),
                items=len(items),
                hint="another replica owns these partitions now; nothing of this "
                "transaction was written, and the relay stops",
            )
            raise ReplicaFencedError(f"{type(exc).__name__}: {exc}") from exc
        except BaseException:
            # Kafka refused the transaction: what it carried is unrecorded. Stop the process;
            # a restart re-reads from the last committed offsets (docs/guarantees.md).
            log.exception("transaction_failed", items=len(items))
            raise
        self._metrics.last_commit.set(wall_time())
        if any(
            isinstance(item, Flush) and item.then_hold and item.hold_round == self._hold_round
            for item in items
        ):
            self._free.clear()
        for done in finished:
            done()
        for item in items:
            if isinstance(item, IntentWrite) and not item.written.done():
                if item.refused:
                    item.written.set_exception(BatchRevokedError(item.record.batch_id))
                else:
                    item.written.set_result(None)
            elif isinstance(item, LedgerAppend) and not item.recorded.done():
                if item.refused:
                    item.recorded.set_exception(BatchRevokedError(item.batch.batch_id))
                else:
                    item.recorded.set_result(None)
            elif isinstance(item, Flush) and not item.flushed.done():
                item.flushed.set_result(None)
        if advanced:
            log.debug(
                "offsets_committed",
                # The offset and the metadata naming the progress record, not the record.
                offsets={f"{t}:{p}": (o.offset, o.metadata) for (t, p), o in advanced.items()},
            )

    def _fence_points(self) -> dict[tuple[str, int], tuple[int, str]]:
        """The last commit points of the partitions of this member's last assignment,
        committed again (no change) so that the transaction is fenced even when no offset
        moved. Not filtered by the consumer's assignment now: while the member rejoins
        that is empty, and its generation is the one the points belong to."""
        if self._membership is None:
            return {}
        return self._accounting.fence_points()

    async def _write(self, item: CommitItem, finished: list[Callable[[], None]]) -> None:
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
            if not pending.rejected:
                pending.rejected = True
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


def _transactions(
    work: list[CommitItem],
) -> list[tuple[list[CommitItem], ResultFence | None]]:
    """A round's items as transactions: everything that moves input offsets in one, fenced
    by the input group; results fenced by the poller group in one per generation and
    ledger partition (a transaction commits offsets of one group only, in aiokafka).
    Flushes go with the last, so that what came before them is committed first."""
    if not work:
        return []
    main: list[CommitItem] = []
    fenced: dict[ResultFence, list[CommitItem]] = {}
    flushes: list[CommitItem] = []
    for item in work:
        if isinstance(item, Flush):
            flushes.append(item)
        elif isinstance(item, TaskFinished | Progress) and item.fence is not None:
            fenced.setdefault(item.fence, []).append(item)
        else:
            main.append(item)
    transactions: list[tuple[list[CommitItem], ResultFence | None]] = []
    if main or not fenced:
        transactions.append((main, None))
    transactions += [(items, fence) for fence, items in fenced.items()]
    transactions[-1][0].extend(flushes)
    return transactions
