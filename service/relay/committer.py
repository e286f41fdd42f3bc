"""The committer: the relay's one writer to Kafka.

Each round takes what the other stages queued (intents, ledger records of
uploaded batches, dead letters, API rejections, results with their tombstones,
progress records) and writes it in one Kafka transaction together with the
input offsets it accounts for. Nothing a stage hands it counts as done until
that transaction commits: `write_intent` and `flush` return only then, and a
`LedgerAppend` submitted resolves its `recorded` only then.
What each item becomes in the transaction is `ItemWriter`'s (item_writer.py).

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

from service.core.offsets import Checkpoint
from service.core.records import progress_key
from service.fencing import GroupFencedError
from service.metrics import RelayMetrics
from service.relay.config import RelayConfig, wall_time
from service.relay.item_writer import ItemWriter, WrittenLedger
from service.relay.messages import (
    BatchRevokedError,
    CommitItem,
    EndOfStream,
    Flush,
    IntentWrite,
    LedgerAppend,
    Mailbox,
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
        self._metrics = metrics
        self._items = ItemWriter(
            config, producer=producer, accounting=accounting, written=written, metrics=metrics
        )
        # Its end (`close`): the committer commits what came before it and returns.
        self._inbox: Mailbox[CommitItem] = Mailbox(COMMIT_BATCH_MAX * 4)
        self._free = asyncio.Event()  # cleared while a rebalance suspends commits (`suspend`)
        self._free.set()
        self._suspend_round = 0  # moved on by every `resume`

    async def submit(self, item: CommitItem) -> None:
        """Queue `item` for the next transaction (waits for room)."""
        await self._inbox.tell(item)

    async def write_intent(self, intent: IntentWrite) -> None:
        """Queue an intent and wait until it is committed."""
        await self._inbox.tell(intent)
        await intent.written

    async def flush(self) -> None:
        """Wait until everything queued so far is committed."""
        flush = Flush()
        await self._inbox.tell(flush)
        await flush.flushed

    async def flush_and_suspend(self) -> None:
        """Commit everything queued so far, then start no transaction until `resume`.

        Intake asks for this when the group revokes its partitions: until the group
        assigns partitions again, this member's generation may already be stale at the
        broker while the consumer still holds it, and a fenced commit would stop a replica
        that is no zombie. The suspension is taken by the committer itself, in the same step
        that ends the flushing transaction: a transaction begun between the flush and a
        suspension taken by the caller would run under the old generation while the group
        moves on (seen as ILLEGAL_GENERATION right after a rebalance)."""
        if not self._free.is_set():
            return  # already suspended: nothing more is committed before `resume`
        flush = Flush(then_suspend=True, suspend_round=self._suspend_round)
        await self._inbox.tell(flush)
        await flush.flushed

    def suspend(self) -> None:
        """Start no new transaction until `resume` (one under way still ends): for a
        revoke whose flush did not finish in time."""
        self._free.clear()

    def resume(self) -> None:
        """The group assigned partitions (the generation is current): commit again."""
        self._suspend_round += 1
        self._free.set()

    async def close(self) -> None:
        """Commit what is queued, then end `run`."""
        self._free.set()
        await self._inbox.end()

    async def run(self) -> None:
        """Commit rounds until closed."""
        while True:
            await self._free.wait()
            first = await self._inbox.next()
            items = [first, *self._inbox.waiting(COMMIT_BATCH_MAX - 1)]
            work = [item for item in items if not isinstance(item, EndOfStream)]
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
                await self._items.write(item, finished)
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
            isinstance(item, Flush)
            and item.then_suspend
            and item.suspend_round == self._suspend_round
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
