"""Admission: the order guard in front of the batcher, as one object intake owns.

An event either joins a batch (claiming its codes for that batch) or is held back
behind an earlier, unfinished change to one of its codes. Claims end when a
batch's task ends, when the API rejects it, or when it is dropped unsent; held
events that nothing blocks any more are then admitted, first in, first out.
Pure: no Kafka, no HTTP, no awaiting.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple

from service.core.batching import Batch, Batcher, FlushReason, PendingEvent
from service.core.ordering import Change, OrderGuard


class Admitted(NamedTuple):
    """What became of one event: held back, or batched (and which batches are full)."""

    held: bool
    ready: list[Batch]
    deduplicated: int


class Admission:
    """The batcher and the order guard of one intake."""

    def __init__(self, batcher: Batcher) -> None:
        self._batcher = batcher
        self._guard: OrderGuard[PendingEvent] = OrderGuard()

    def offer(self, pending: PendingEvent, now: float, *, released: bool = False) -> Admitted:
        """Batch `pending`, or hold it back behind an earlier change to its codes.

        `released`: the guard just let it out of the held queue (it passed the check)."""
        event = pending.event
        # Every key of the event: a later change to any of its codes waits behind it.
        change = Change(event.constraints, event.scm_data)
        if not released and self._guard.conflicts(change):
            source = pending.source
            self._guard.hold(pending, change, (source.topic, source.partition, source.offset))
            return Admitted(held=True, ready=[], deduplicated=0)
        duplicates_before = self._batcher.deduplicated
        ready, placed = self._batcher.add(pending, now)
        for batch, part in placed:
            if part.values:
                self._guard.claim(
                    batch.batch_id, Change({part.constraint_key: part.values}, batch.scm_data)
                )
        return Admitted(False, ready, self._batcher.deduplicated - duplicates_before)

    def claim_task(
        self, batch_id: str, constraints: Mapping[str, list[str]], scm_data: Mapping[str, str]
    ) -> None:
        """An unfinished task in the ledger (another replica's, or from before a restart)
        claims its codes; batches of this intake already hold their claims."""
        if self._guard.owns(batch_id):
            return
        self._guard.claim(batch_id, Change(constraints, scm_data))

    def claim_deferred(self, batch_id: str, pending: PendingEvent) -> None:
        """An event deferred behind another process's open intent claims all its codes for
        that intent (not only the values the intent carries): a later change to any of
        them waits until the intent closes and the event is sent."""
        event = pending.event
        self._guard.claim(batch_id, Change(event.constraints, event.scm_data))

    def release(self, batch_id: str) -> None:
        """The batch's task ended, or the batch was rejected or dropped."""
        self._guard.release(batch_id)

    def next_released(self) -> PendingEvent | None:
        """The next held event nothing blocks any more (offer it with `released`)."""
        return self._guard.next_admissible()

    def due(self, now: float, limit: int | None = None) -> list[Batch]:
        """Batches whose linger passed."""
        return self._batcher.due(now, limit=limit)

    def close_all(self) -> list[Batch]:
        """Every open batch, closed for a shutdown flush."""
        return self._batcher.close_all(FlushReason.SHUTDOWN)

    def drop_unsent(self, queued: Iterable[Batch]) -> tuple[list[str], int]:
        """Forget open batches, held events and the `queued` batches (never sent): their
        events are read again. Returns the forgotten batch ids and the events dropped."""
        dropped: set[int] = set()
        batch_ids: list[str] = []
        for batch in [*self._batcher.discard(), *queued]:
            self._guard.release(batch.batch_id)
            batch_ids.append(batch.batch_id)
            dropped |= {id(part.event) for part in batch.parts}
        dropped |= {id(pending) for pending in self._guard.drop_held()}
        return batch_ids, len(dropped)

    def next_deadline(self) -> float | None:
        """When the oldest open batch is due."""
        return self._batcher.next_deadline()

    @property
    def open_batches(self) -> int:
        """Batches still filling."""
        return self._batcher.open_batches

    @property
    def buffered_values(self) -> int:
        """Values in open batches and in held events."""
        return self._batcher.open_values + self._guard.held_values
