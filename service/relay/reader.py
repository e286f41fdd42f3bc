"""Intake's reading of its input partitions: polls, which partitions are paused, the
partitions stopped at a record batch that cannot be decoded (stepped up to it one
record per call, service/relay/stopped.py), records a poll returned across a
rebalance sought back, and the commit points moved past transaction markers.

What a record leads to (judging, batching, dead letters) is intake's: records read
one by one while stepping are handed to intake's `handle`, as the poll loop does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Final

import structlog
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from service.kafka import UndecodableRecordsError
from service.metrics import RelayMetrics
from service.relay.book import OffsetBook
from service.relay.intake_peers import CommitQueue
from service.relay.messages import Flush
from service.relay.ports import FetchedRecord, InputConsumer
from service.relay.stopped import STEP_RECORDS, StoppedPartitions

log = structlog.get_logger(__name__)

MAX_RECORDS: Final = 2000
# How often, at most, a commit is asked for only to pass transaction markers.
MARKER_COMMIT_EVERY_S: Final = 1.0

Polled = Mapping[TopicPartition, Sequence[FetchedRecord]]


class InputReader:
    """Polls the input consumer for intake and decides which partitions it reads."""

    def __init__(
        self,
        consumer: InputConsumer,
        *,
        book: OffsetBook,
        committer: CommitQueue,
        metrics: RelayMetrics,
        clock: Callable[[], float],
        max_read_ahead: int,
        timeout_ms: Callable[[], int],
        needed_up_to: Callable[[str, int], int | None],
        handle: Callable[[FetchedRecord, asyncio.Event], Awaitable[None]],
    ) -> None:
        self._consumer = consumer
        self._book = book
        self._committer = committer
        self._metrics = metrics
        self._clock = clock
        self._max_read_ahead = max_read_ahead
        self._timeout_ms = timeout_ms
        self._needed_up_to = needed_up_to
        self._handle = handle
        # Rebalances seen: records a poll returns are taken only in the epoch it began in.
        self.epoch = 0
        self.last_poll = 0.0
        self._paused = False
        # A commit point moved with no record of the relay's to carry it (past transaction
        # markers, or past events skipped as done): not yet committed.
        self._commit_point_moved = False
        self._markers_committed_at = float("-inf")
        # The offset after the last record taken (or the commit point), per partition: where
        # a partition is read again after an undecodable batch (service/relay/stopped.py).
        self._next_offset: dict[TopicPartition, int] = {}
        self._stopped = StoppedPartitions("input", metrics.partition_stopped, clock)

    @property
    def paused(self) -> bool:
        """Whether the input partitions are paused."""
        return self._paused

    def stopped_reasons(self) -> list[str]:
        """Input partitions stopped at a record batch that cannot be decoded (readiness)."""
        return self._stopped.reasons()

    def rebalanced(self) -> None:
        """A revoke or an assignment began: a poll under way is not taken."""
        self.epoch += 1

    def polled(self) -> None:
        """The consumer was just polled (max.poll.interval.ms counts from here)."""
        self.last_poll = self._clock()

    def skipped_done(self) -> None:
        """A record was skipped as done: the commit point may pass it with nothing of
        the relay's to carry it."""
        self._commit_point_moved = True

    def keep_only(self, assigned: set[TopicPartition]) -> None:
        """A new assignment: stops and read positions of other partitions are forgotten."""
        self._stopped.keep_only(assigned)
        self._next_offset = {}

    def read_from(self, tp: TopicPartition, offset: int) -> None:
        """An assigned partition is read from `offset` (its commit point)."""
        self._next_offset[tp] = offset

    def unread(self, batches: Polled) -> None:
        """A poll returned across a rebalance: none of its records is taken. Partitions
        assigned now are sought back to its first record (the consumer moved past them;
        its records start where the new assignment positioned it), the others are not
        this intake's any more."""
        assigned = set(self._consumer.assignment())
        for tp, records in batches.items():
            if records and tp in assigned:
                self._consumer.seek(tp, records[0].offset)

    def taken_to(self, batches: Polled) -> None:
        """Every record of a poll was taken: each partition is read up to its last one."""
        for tp, records in batches.items():
            if records:
                read_to = records[-1].offset + 1
                self._next_offset[tp] = read_to
                self._stopped.read_past(tp, read_to)

    async def poll(self, stop: asyncio.Event) -> Polled:
        """The next records of every readable partition. Partitions that met a record batch
        they cannot decode are read one record per call first (see `_step`) and left out."""
        stepping = self._stopped.stepping() if self._stopped and not self._paused else []
        if not stepping:
            return await self._consumer.getmany(
                timeout_ms=self._timeout_ms(), max_records=MAX_RECORDS
            )
        readable = [tp for tp in self._consumer.assignment() if tp not in self._stopped]
        await self._step(stepping, stop, 0 if readable else self._timeout_ms())
        if not readable:
            return {}
        return await self._consumer.getmany(
            *readable, timeout_ms=self._timeout_ms(), max_records=MAX_RECORDS
        )

    async def _step(
        self, stepping: list[TopicPartition], stop: asyncio.Event, wait_ms: int
    ) -> None:
        """Read these partitions one record per call, up to the batch they cannot decode:
        aiokafka decodes a batch only when asked for its first record, so every record
        before it is taken (and may be committed), and the partition then pauses exactly
        at the batch (service/relay/stopped.py)."""
        epoch = self.epoch
        for tp in stepping:
            for _ in range(STEP_RECORDS):
                if stop.is_set() or epoch != self.epoch:
                    return
                try:
                    fetched = await self._consumer.getmany(tp, timeout_ms=wait_ms, max_records=1)
                except UndecodableRecordsError as error:
                    if error.partition is None:  # asked for this partition alone
                        error = UndecodableRecordsError(tp, error.offset, error.cause)
                    self.undecodable(error)
                    break
                finally:
                    self.last_poll = self._clock()
                wait_ms = 0
                if epoch != self.epoch:
                    self.unread(fetched)
                    return
                records = fetched.get(tp)
                if not records:
                    break
                (record,) = records
                self._metrics.events_consumed.inc()
                self._next_offset[tp] = record.offset + 1
                self._stopped.read_past(tp, record.offset + 1)
                await self._handle(record, stop)
                if tp not in self._stopped:
                    break  # read past the batch: it decodes now

    async def keepalive(self) -> None:
        """Poll with every partition paused (which returns nothing): a consumer that does
        not poll for max.poll.interval.ms leaves its group."""
        try:
            await self._consumer.getmany(timeout_ms=0)  # every partition paused: no records
        except UndecodableRecordsError as error:
            self.undecodable(error)
        self.last_poll = self._clock()

    def undecodable(self, error: UndecodableRecordsError) -> None:
        """A record batch could not be decoded: its partition (every partition, if aiokafka
        did not say which) steps up to it or pauses, and every partition is read again
        from the last record taken: aiokafka lost the records it drained in the failed
        call, and moved their positions past them."""
        assigned = set(self._consumer.assignment())
        if error.partition is None:
            failed = sorted(assigned)
        else:
            failed = [error.partition] if error.partition in assigned else []
        for tp in failed:
            offset = error.offset if error.partition is not None else None
            self._stopped.failed(tp, offset, error.cause, self._next_offset.get(tp))
        for tp in assigned:
            read_to = self._next_offset.get(tp)
            if read_to is not None:
                self._consumer.seek(tp, read_to)
        paused = [tp for tp in failed if tp in self._stopped.paused()]
        if paused:
            self._consumer.pause(*paused)

    async def pass_markers(self, epoch: int) -> None:
        """Caught up (the last poll was not full, and every record it returned is taken):
        let the commit points pass the transaction markers after the last records, and
        have commit points that moved with no record of ours (past markers, or past
        events skipped as done) committed at most every MARKER_COMMIT_EVERY_S (a busy
        relay's own transactions carry them sooner)."""
        for tp in self._consumer.assignment():
            if epoch != self.epoch:
                return
            if tp in self._stopped:
                continue
            try:
                position = await self._consumer.position(tp)
            except KafkaError:
                continue  # revoked meanwhile, or not yet positioned
            self._commit_point_moved |= self._book.read_to(tp.topic, tp.partition, position)
        now = self._clock()
        if self._commit_point_moved and now - self._markers_committed_at >= MARKER_COMMIT_EVERY_S:
            self._commit_point_moved = False
            self._markers_committed_at = now
            await self._committer.submit(Flush())

    def update_pause(self, reason: str | None) -> None:
        """Pause every partition for `reason`; without one, only those stopped at a batch
        or read far enough beyond their commit point."""
        if reason and not self._paused:
            log.info("intake_paused", reason=reason)
        elif not reason and self._paused:
            log.info("intake_resumed")
        self._paused = reason is not None
        assignment = self._consumer.assignment()
        if self._paused:
            self._consumer.pause(*assignment)
            return
        self._stopped.due()  # their retry time came: read again from where they stopped
        paused = set(self._stopped.paused()) if self._stopped else set()
        for tp in assignment:
            if self._book.read_ahead(tp.topic, tp.partition) >= self._max_read_ahead:
                needed = self._needed_up_to(tp.topic, tp.partition)
                if needed is not None and self._book.next_to_read(tp.topic, tp.partition) <= needed:
                    continue  # an open intent's events lie further: read on to them
                # Read far enough beyond its commit point: the partition waits for it.
                paused.add(tp)
        if not paused:
            self._consumer.resume(*assignment)
            return
        self._consumer.resume(*(tp for tp in assignment if tp not in paused))
        self._consumer.pause(*(tp for tp in assignment if tp in paused))

    def pause_all(self, reason: str) -> None:
        """Pause the input partitions until the next round decides again."""
        if not self._paused:
            log.info("intake_paused", reason=reason)
            self._paused = True
        self._consumer.pause(*self._consumer.assignment())

    async def refresh_lag(self) -> None:
        """The lag of every assigned partition."""
        for tp in self._consumer.assignment():
            highwater = self._consumer.highwater(tp)
            if highwater is None:
                continue
            try:
                position = await self._consumer.position(tp)
            except KafkaError:
                continue
            self._metrics.consumer_lag.labels(str(tp.partition)).set(max(0, highwater - position))
