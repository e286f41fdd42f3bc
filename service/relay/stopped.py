"""Partitions stopped at a record batch that cannot be decoded.

A record batch aiokafka cannot decode (a codec this process cannot read, a CRC
mismatch, a corrupt compressed payload) must stop neither the process nor the
other partitions, and nothing may be skipped or committed past it. aiokafka
raises the error for a whole fetch: the records before the bad batch in the same
fetch are lost with it. So its partition is first read *one record per call* up
to the batch (`stepping`: aiokafka decodes the next batch only when asked for its
first record, so every record before the bad one is delivered), then paused
(`stopped`), said in a clear log line, shown by `scm_relay_partition_stopped`
and in readiness, and read again (stepping) after a backoff: a broker-side
problem may heal, a redeployed image may bring the codec. Reading past the batch
ends the stop. Intake keeps one of these for the input topic, the ledger view one
for the ledger.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Final

import structlog
from aiokafka import TopicPartition
from prometheus_client import Gauge

log = structlog.get_logger(__name__)

# A stopped partition is read again after a minute, doubling up to a quarter of an hour:
# a fix (a new image, a repaired log) is taken up within that, and a partition that stays
# broken costs one fetch and one log line per retry.
RETRY_INITIAL_S: Final = 60.0
RETRY_MAX_S: Final = 900.0
# Records read one by one per partition and round while stepping up to a bad batch: the
# other partitions and stages get their turn in between.
STEP_RECORDS: Final = 200

HINT: Final = (
    "nothing at or after this offset is read or committed until it decodes; the other "
    "partitions go on; see the runbook ScmRelayPartitionStopped (docs/runbooks.md)"
)


@dataclass
class Stop:
    """Where one partition cannot be read, why, since when, and what is done about it."""

    offset: int | None
    cause: str
    stopped_at: float
    stepping: bool  # read one record per call (towards the batch, or a retry); else paused
    retry_at: float = float("inf")
    attempts: int = 0  # times it was paused at the batch
    read_to: int | None = None  # where the reader stood when it last failed


class StoppedPartitions:
    """The partitions of one reader that met a record batch they cannot decode."""

    def __init__(self, role: str, gauge: Gauge, clock: Callable[[], float]) -> None:
        self._role = role
        self._gauge = gauge
        self._clock = clock
        self._stops: dict[TopicPartition, Stop] = {}

    def __bool__(self) -> bool:
        """Whether any partition has met a batch it has not yet read past."""
        return bool(self._stops)

    def __contains__(self, partition: object) -> bool:
        """Whether `partition` met a batch it has not yet read past (paused or stepping)."""
        return partition in self._stops

    def paused(self) -> list[TopicPartition]:
        """Partitions not read until their retry."""
        return [tp for tp, stop in self._stops.items() if not stop.stepping]

    def stepping(self) -> list[TopicPartition]:
        """Partitions to read one record per call (towards their batch, or a retry)."""
        return [tp for tp, stop in self._stops.items() if stop.stepping]

    def failed(
        self, partition: TopicPartition, offset: int | None, cause: str, read_to: int | None
    ) -> None:
        """`partition` cannot be decoded at `offset` (None: unknown) while the reader has
        taken every record before `read_to`: step up to the batch when records lie before
        it, else pause until the next retry."""
        now = self._clock()
        stop = self._stops.get(partition)
        if stop is None:
            stop = self._stops[partition] = Stop(offset, cause, now, stepping=True)
            self._gauge.labels(partition.topic, str(partition.partition)).set(1)
            log.error(
                "partition_stopped_undecodable",
                reader=self._role,
                topic=partition.topic,
                partition=partition.partition,
                offset=offset,
                read_to=read_to,
                cause=cause,
                hint=HINT,
            )
        stop.offset, stop.cause = offset, cause
        progressed, stop.read_to = read_to != stop.read_to, read_to
        if offset is not None and read_to is not None and read_to < offset and progressed:
            # Records before the batch: deliver them first. (No progress since the last
            # failure: only markers or aborted records lie between, nothing to deliver.)
            stop.stepping = True
            return
        stop.stepping = False
        stop.attempts += 1
        wait = min(RETRY_MAX_S, RETRY_INITIAL_S * 2 ** (stop.attempts - 1))
        stop.retry_at = now + wait
        if stop.attempts > 1:
            log.warning(
                "partition_still_undecodable",
                reader=self._role,
                topic=partition.topic,
                partition=partition.partition,
                offset=offset,
                attempt=stop.attempts,
                retry_in_s=round(wait),
            )

    def due(self) -> list[TopicPartition]:
        """Paused partitions whose retry time has come: they step again (a failure pauses
        them again, for longer)."""
        if not self._stops:
            return []
        now = self._clock()
        due = [tp for tp, s in self._stops.items() if not s.stepping and s.retry_at <= now]
        for tp in due:
            self._stops[tp].stepping = True
            log.info("partition_retry_undecodable", reader=self._role, partition=str(tp))
        return due

    def read_past(self, partition: TopicPartition, position: int) -> None:
        """The reader got to `position` in `partition`: a stop behind it is over."""
        stop = self._stops.get(partition)
        if stop is None or (stop.offset is not None and position <= stop.offset):
            return
        del self._stops[partition]
        self._gauge.labels(partition.topic, str(partition.partition)).set(0)
        log.info(
            "partition_resumed_decodable",
            reader=self._role,
            topic=partition.topic,
            partition=partition.partition,
            offset=stop.offset,
            stopped_s=round(self._clock() - stop.stopped_at),
        )

    def keep_only(self, partitions: Collection[TopicPartition]) -> None:
        """Forget stops of partitions no longer read (revoked): their next owner meets
        the batch again."""
        for tp in [tp for tp in self._stops if tp not in partitions]:
            del self._stops[tp]
            self._gauge.labels(tp.topic, str(tp.partition)).set(0)

    def reasons(self) -> list[str]:
        """One readiness reason per stopped partition."""
        return [
            f"{self._role} partition {tp.topic}:{tp.partition} stopped"
            + (f" at offset {stop.offset}" if stop.offset is not None else "")
            + f": undecodable record batch ({stop.cause})"
            for tp, stop in sorted(self._stops.items())
        ]
