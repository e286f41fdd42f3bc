"""After an assignment, before intake reads: the ledger view reads every ledger
partition to where it ended at the assignment (open transactions included), so an
intent the previous owner committed just before it lost the partitions is known
before their events are read; then each assigned partition's progress record is
applied (docs/design.md section 11, "Progress that is never cut").
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection
from typing import Final

import structlog
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from service.core.batching import Done
from service.core.offsets import METADATA_PREFIX, decode_progress, progress_digest
from service.relay.book import OffsetBook
from service.relay.intake_peers import LedgerSync

log = structlog.get_logger(__name__)

# How often, at most, intake asks again where the ledger ends when it could not at an
# assignment.
LEDGER_END_RETRY_S: Final = 1.0


class LedgerCatchUp:
    """Waits, for the partitions just assigned, until the ledger view holds what their
    commits name, then applies their progress records to the offset book."""

    def __init__(
        self,
        ledger: LedgerSync | None,
        *,
        book: OffsetBook,
        closed_in: Callable[[Collection[tuple[str, int]]], list[Done]],
        clock: Callable[[], float],
        timeout_s: float,
    ) -> None:
        self._ledger = ledger
        self._book = book
        self._closed_in = closed_in
        self._clock = clock
        self._timeout_s = timeout_s
        # Partitions assigned whose progress record is applied once the ledger view has
        # read to where the ledger ended at the assignment.
        self._awaiting_progress: set[TopicPartition] = set()
        # Where the ledger ended could not be asked at the assignment: asked again, and
        # the partitions stay paused until it is known and read to (`pause_reason`).
        self._ledger_end_unknown = False
        self._ledger_end_asked_at = 0.0
        self._ledger_target: dict[int, int] | None = None

    def revoked(self) -> None:
        """The partitions awaiting their progress are gone."""
        self._awaiting_progress = set()
        self._ledger_end_unknown = False

    async def assigned(self, assigned: set[TopicPartition]) -> None:
        """`assigned` (restored to their commit points) wait for where the ledger ends now."""
        self._awaiting_progress = set(assigned)
        self._ledger_target = await self._ledger_end()
        self._ledger_end_unknown = self._ledger_target is None and self._ledger is not None

    async def _ledger_end(self, timeout_s: float | None = None) -> dict[int, int] | None:
        """Where every ledger partition ends now (None: unknown, asked again later)."""
        if self._ledger is None:
            return None
        try:
            async with asyncio.timeout(timeout_s or self._timeout_s):
                return await self._ledger.end_offsets()
        except (TimeoutError, KafkaError) as exc:
            log.warning("ledger_end_unknown_at_assignment", error=type(exc).__name__)
            return None

    @property
    def ledger_end_unknown(self) -> bool:
        """Where the ledger ended at the assignment could not be asked yet."""
        return self._ledger_end_unknown

    async def ask_ledger_end_again(self) -> None:
        """Ask where the ledger ends, once a second, until it answers: until the view has
        read to there, a progress record newer than the one read so far (or than the one
        a stale offset fetch names) may be on its way, and applying an older one would
        send its done events again."""
        if self._clock() - self._ledger_end_asked_at < LEDGER_END_RETRY_S:
            return
        self._ledger_end_asked_at = self._clock()
        target = await self._ledger_end(timeout_s=LEDGER_END_RETRY_S)
        if target is not None and self._ledger_end_unknown:
            self._ledger_target = target
            self._ledger_end_unknown = False
            log.info("ledger_end_known", ends=target)

    def pause_reason(self) -> str | None:
        """Why intake may not read yet as far as the ledger goes; applies the progress
        records once they may be."""
        if self._ledger_target is not None:
            if self._ledger is not None and not self._ledger.has_read_to(self._ledger_target):
                return "reading the ledger to where it ended at the assignment"
            self._ledger_target = None
        if self._awaiting_progress:
            if self._ledger_end_unknown:
                return "asking where the ledger ends"
            if self._progress_not_read_yet():
                return "reading the progress records the commit points name"
            self._apply_progress()
        if self._ledger is not None and self._ledger.partition_stopped():
            # Intents and tasks past the batch are unknown: events they hold could go twice.
            return "a ledger partition is stopped at a record batch it cannot decode"
        return None

    def _progress_not_read_yet(self) -> bool:
        """Whether a partition's commit names a progress record (by digest) that the
        ledger view has not read yet: it has none, or only one older than the commit
        point. Committed, the named record is in the ledger until a newer one replaces it
        (the ledger is compacted, never deleted): waiting for it is bounded by the view's
        reading, even when where the ledger ends could not be asked at the assignment."""
        if self._ledger is None:
            return False
        for tp in self._awaiting_progress:
            committed = self._book.committed(tp.topic, tp.partition)
            if committed is None or not committed[1].startswith(METADATA_PREFIX):
                continue
            raw = self._ledger.progress(tp.topic, tp.partition)
            if raw is None:
                return True
            if committed[1] == METADATA_PREFIX + progress_digest(raw):
                continue
            try:
                if decode_progress(raw).commit < committed[0]:
                    return True  # an older one: the named one is further in the ledger
            except ValueError:
                continue  # unreadable: said when applied
        return False

    def _apply_progress(self) -> None:
        """The ledger is read to where it ended at the assignment: what the assigned
        partitions' progress records say is done above their commit points (and what
        the intents closed lately carried in them) is skipped when read."""
        partitions = self._awaiting_progress
        self._awaiting_progress = set()
        for tp in sorted(partitions):
            raw = self._ledger.progress(tp.topic, tp.partition) if self._ledger else None
            committed = self._book.committed(tp.topic, tp.partition)
            if raw is None:
                self._book.apply(tp.topic, tp.partition, None)
                continue
            try:
                progress = decode_progress(raw)
            except ValueError as exc:
                log.error("progress_record_unreadable", partition=str(tp), error=str(exc))
                self._book.apply(tp.topic, tp.partition, None)
                continue
            metadata = committed[1] if committed else ""
            if metadata.startswith(METADATA_PREFIX) and metadata != (
                METADATA_PREFIX + progress_digest(raw)
            ):
                # Done never becomes undone: an older record's offsets are done too.
                log.warning(
                    "progress_record_not_the_committed_one",
                    partition=str(tp),
                    record_commit=progress.commit,
                    committed=committed[0] if committed else None,
                )
            self._book.apply(tp.topic, tp.partition, progress)
        keys = {(tp.topic, tp.partition) for tp in partitions}
        self._book.sources_done(self._closed_in(keys))
