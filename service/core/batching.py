"""Merging accepted events into upload requests (docs/design.md section 4).

Events with one constraint key and the same (campaign, scm_data, reference,
constraint key) merge: their values are unioned (a value already in the open
batch is dropped and counted) up to `max_values`; an event with more values
than fit is split across batches. With `max_keys` > 1, batches of the same
campaign, scm_data and reference share a request across constraint keys. A
batch is ready when full, when its oldest event has waited `linger_s`, when too
many batches are open (the oldest goes first), or on shutdown.

An event with several constraint keys is a request of its own, ready at once:
never merged with another (the API does not document whether keys combine with
AND or OR, so its values mean what they mean only together) and never split
(the contract refuses one that does not fit a request).

Pure: it takes events and the time, and returns batches.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from typing import Final, NamedTuple

from service.core.contract import ChangeEvent
from service.core.contract_limits import DEFAULT_BATCH_MAX_BYTES
from service.core.rules import IDENTIFIER_KEYS, value_bytes


class Source(NamedTuple):
    """Where an event was read: its Kafka position and the publisher's id.

    (A named tuple, like `Part`: one is built per event, in a third of a frozen
    dataclass's time.)"""

    topic: str
    partition: int
    offset: int
    event_id: str | None = None


class Done(NamedTuple):
    """An event recorded elsewhere (an intent resolved, or closed by another replica), by
    position: the indexes of its values that were carried, of how many (None, None:
    the whole event)."""

    topic: str
    partition: int
    offset: int
    values: tuple[int, ...] | None = None
    total: int | None = None


class EventIdentity:
    """One read of a published event, shared by every copy of its `PendingEvent` (the
    part still unsent, read in again; the events of a resolved intent's batch): what a
    stage remembers of the event, keyed by this, holds for each copy, and is forgotten
    (weakly referenced) with the last of them."""

    __slots__ = ("__weakref__",)


@dataclass(eq=False, slots=True)
class PendingEvent:
    """An accepted event on its way to the API.

    `event` may carry only some of the published event's values: those not yet done
    when it was read again (the rest were recorded, or are in an upload under way);
    `indexes` then maps its values, in order, to their indexes in the published
    event's values (None: it carries them all), and `total` is how many the published
    event has (for a single key, its values in order; several keys are never cut)."""

    source: Source
    event: ChangeEvent
    raw: bytes
    key: bytes | None
    received_at: float
    parts: int = 0
    total: int = 0
    indexes: tuple[int, ...] | None = None
    published: ChangeEvent | None = None  # the event as published, when `event` is not
    # Kept by `dataclasses.replace`, so every copy of this read shares it.
    identity: EventIdentity = field(default_factory=EventIdentity)


def unsent_part(
    event: ChangeEvent, excluded: frozenset[int]
) -> tuple[ChangeEvent, tuple[int, ...]] | None:
    """The event without the values at `excluded` (indexes among its values: recorded, or
    in an upload under way), and the indexes of those it keeps; None when it keeps none.
    Only an event with one constraint key is ever cut (several keys go whole)."""
    if len(event.constraints) != 1:
        return None
    ((key, values),) = event.constraints.items()
    kept = [(index, value) for index, value in enumerate(values) if index not in excluded]
    if not kept:
        return None
    reduced = event.model_copy(update={"constraints": {key: tuple(v for _, v in kept)}})
    return reduced, tuple(index for index, _ in kept)


class Part(NamedTuple):
    """The values one event put into one batch (empty when all were already there), and
    which of the published event's values the batch covers once recorded: `covered`
    None means all of them (the event went whole into this one batch), else their
    indexes (the values it added, and the values already in the batch it shares)."""

    event: PendingEvent
    constraint_key: str
    values: tuple[str, ...]
    covered: tuple[int, ...] | None = None


class FlushReason(StrEnum):
    """Why a batch was sent; a metric label."""

    FULL = "full"
    LINGER = "linger"
    KEYS = "keys"
    OPEN_BATCHES = "open_batches"
    SHUTDOWN = "shutdown"
    BYTES = "bytes"
    MULTI_KEY = "multi_key"  # an event with several constraint keys, sent on its own


GroupKey = tuple[int | None, tuple[tuple[str, str], ...], str, str | None]
# Constraint value bytes per request (see the contract's DEFAULT_BATCH_MAX_BYTES).
DEFAULT_MAX_BATCH_BYTES: Final = DEFAULT_BATCH_MAX_BYTES
_NEXT_BATCH: Final = itertools.count(1)


def new_batch_id() -> str:
    """A batch id unique across processes and restarts."""
    return f"b-{uuid.uuid4().hex[:16]}-{next(_NEXT_BATCH)}"


@dataclass(eq=False)
class Batch:
    """One future upload request and the event parts it carries."""

    group: GroupKey
    opened_at: float
    batch_id: str = field(default_factory=new_batch_id)
    values: dict[str, dict[str, None]] = field(default_factory=dict)
    parts: list[Part] = field(default_factory=list)
    flush_reason: FlushReason | None = None
    # Values over all constraint keys, kept by the batcher as it attaches parts (read on
    # every event, so not summed each time), and their UTF-8 bytes.
    size: int = 0
    value_bytes: int = 0

    @property
    def campaign(self) -> int | None:
        """The campaign of every event in the batch."""
        return self.group[0]

    @cached_property
    def scm_data(self) -> dict[str, str]:
        """The scm_data of every event in the batch (one shared mapping: do not modify)."""
        return dict(self.group[1])

    @property
    def reference(self) -> str:
        """The reference of every event ("" for none)."""
        return self.group[2]

    def constraints(self) -> dict[str, list[str]]:
        """The request's constraints: each key with its distinct values, in arrival order."""
        return {key: list(values) for key, values in self.values.items()}

    def events(self) -> list[PendingEvent]:
        """The distinct events with a part in this batch, in arrival order."""
        # Pending events compare by identity: the dictionary keeps each once, in order.
        return list(dict.fromkeys(part.event for part in self.parts))

    def expected_codes(
        self,
        one_code_per_value_keys: Iterable[str],
        events: list[PendingEvent] | None = None,
    ) -> int | None:
        """How many codes the request should touch, or None when that is unknown.

        Events without `expected_codes` whose every key is an identifier key count one
        code per distinct value; events with it count what they say, if wholly inside
        this batch. Any other event makes the expectation unknown. An event with several
        keys counts all its values: the reading where keys combine as a union of
        distinct codes (an account where they combine as AND sees short tasks).
        `events`: `self.events()`, if the caller has it already.
        """
        per_value_keys = IDENTIFIER_KEYS | set(one_code_per_value_keys)
        explicit = 0
        declaring = False
        for pending in self.events() if events is None else events:
            event = pending.event
            declared = event.expected_codes
            if declared is not None:
                # One part per key when wholly in this batch (an event with several keys
                # always is); more: split across requests, its share of each unknown.
                if pending.parts != len(event.constraints):
                    return None
                explicit += declared
                declaring = True
            elif not per_value_keys.issuperset(event.constraints):
                return None
        if not declaring:
            # The batcher puts each (key, value) into a batch once: its size is the count.
            return self.size
        counted: set[tuple[str, str]] = set()
        for part in self.parts:
            if part.event.event.expected_codes is None:
                counted.update((part.constraint_key, value) for value in part.values)
        return explicit + len(counted)


class Batcher:
    """Open batches by group key; hands out the ones that are ready."""

    def __init__(
        self,
        *,
        max_values: int,
        max_keys: int,
        linger_s: float,
        max_open_batches: int,
        max_bytes: int = DEFAULT_MAX_BATCH_BYTES,
    ) -> None:
        if not 1 <= max_values <= 1000 or not 1 <= max_keys <= 5 or max_open_batches < 1:
            raise ValueError("max_values 1..1000, max_keys 1..5 and max_open_batches >= 1")
        if max_bytes < 1:
            raise ValueError("max_bytes >= 1")
        self.max_values = max_values
        self.max_bytes = max_bytes
        self.max_keys = max_keys
        self.linger_s = linger_s
        self.max_open_batches = max_open_batches
        self._open: dict[GroupKey, Batch] = {}
        self.deduplicated = 0

    def group_of(self, event: ChangeEvent) -> GroupKey:
        """The key of the batch an event with one constraint key joins (an event with
        several joins none: the key of its own batch)."""
        if len(event.constraints) > 1:
            return self._group(event, None)
        return self._group(event, next(iter(event.constraints)))

    def _group(self, event: ChangeEvent, key: str | None) -> GroupKey:
        return (
            event.campaign,
            tuple(sorted(event.scm_data.items())),
            event.reference or "",
            key if self.max_keys == 1 else None,
        )

    def add(
        self, pending: PendingEvent, now: float
    ) -> tuple[list[Batch], list[tuple[Batch, Part]]]:
        """Put an event into batches. Returns the batches now ready to send and the
        (batch, part) pairs the event created, for the caller's bookkeeping.

        Called for every event: the constraint key and values are read once, and the
        bytes of a chunk are counted value by value only when it may not fit."""
        event = pending.event
        if len(event.constraints) > 1:
            return self._alone(pending, now)
        ready: list[Batch] = []
        placed: list[tuple[Batch, Part]] = []
        ((key, values),) = event.constraints.items()
        group = self._group(event, key)
        batch = self._open.get(group)
        if batch is None:
            batch = self._open_new(group, now)
        elif key not in batch.values and len(batch.values) >= self.max_keys:
            ready.append(self._close(batch, FlushReason.KEYS))
            batch = self._open_new(group, now)
        known = batch.values.get(key)
        remaining = [value for value in values if value not in known] if known else list(values)
        shared: list[str] = []  # values already in the first batch (merged, sent once)
        if len(remaining) != len(values):
            self.deduplicated += len(values) - len(remaining)
            shared = [value for value in values if value in known] if known else []
            if not remaining:
                placed.append((batch, self._attach(batch, pending, key, ())))
        while remaining:
            chunk = remaining[: self.max_values - batch.size]
            chunk_bytes = value_bytes(chunk)
            if batch.value_bytes + chunk_bytes > self.max_bytes:
                sizes = [len(value.encode()) for value in chunk]
                chunk = chunk[: self._fitting(sizes, self.max_bytes - batch.value_bytes)]
                if not chunk and batch.size:
                    # Not one more value fits: this request is full by its bytes.
                    ready.append(self._close(batch, FlushReason.BYTES))
                    batch = self._open_new(group, now)
                    continue
                chunk = chunk or remaining[:1]  # a value over the bound goes alone
                chunk_bytes = sum(sizes[: len(chunk)])
            remaining = remaining[len(chunk) :]
            placed.append((batch, self._attach(batch, pending, key, tuple(chunk))))
            batch.value_bytes += chunk_bytes
            if batch.size >= self.max_values:
                ready.append(self._close(batch, FlushReason.FULL))
                if remaining:
                    batch = self._open_new(group, now)
        if len(placed) > 1 or pending.indexes is not None:
            if not pending.total:  # an event read whole (a partly done one has it set)
                pending.total = len(values)
            placed = self._covering(pending, values, shared, placed)
        if len(self._open) > self.max_open_batches:
            while len(self._open) > self.max_open_batches:
                oldest = next(iter(self._open.values()))
                ready.append(self._close(oldest, FlushReason.OPEN_BATCHES))
        return ready, placed

    @staticmethod
    def _covering(
        pending: PendingEvent,
        values: tuple[str, ...],
        shared: list[str],
        placed: list[tuple[Batch, Part]],
    ) -> list[tuple[Batch, Part]]:
        """The parts of an event that is not wholly in one batch (cut across batches, or
        already partly done), each with the indexes of the published event's values it
        covers (so that what is recorded is never sent again, service/core/offsets.py).
        Each part is the last one its batch received, so it is replaced in place."""
        position = {value: index for index, value in enumerate(values)}
        mapped = pending.indexes
        covering: list[tuple[Batch, Part]] = []
        for number, (batch, part) in enumerate(placed):
            carried = list(part.values) + (shared if number == 0 else [])
            local = (position[value] for value in carried)
            indexes = tuple(sorted(mapped[i] for i in local) if mapped else sorted(local))
            replaced = part._replace(covered=indexes)
            batch.parts[-1 if batch.parts[-1] is part else batch.parts.index(part)] = replaced
            covering.append((batch, replaced))
        return covering

    def _alone(
        self, pending: PendingEvent, now: float
    ) -> tuple[list[Batch], list[tuple[Batch, Part]]]:
        """An event with several constraint keys: a batch of its own, ready at once, with
        one part per key. Never split: the contract refused it unless it fits a request."""
        event = pending.event
        batch = Batch(group=self._group(event, None), opened_at=now)
        placed = [
            (batch, self._attach(batch, pending, key, values))
            for key, values in event.constraints.items()
        ]
        batch.value_bytes = value_bytes(
            value for values in event.constraints.values() for value in values
        )
        batch.flush_reason = FlushReason.MULTI_KEY
        return [batch], placed

    def due(self, now: float, limit: int | None = None) -> list[Batch]:
        """Batches whose oldest event has waited `linger_s` (oldest first), at most `limit`.

        The caller limits them to what its uploaders can take at once: a due batch left
        open keeps filling until it is taken, so a busy API gets fuller requests."""
        ready: list[Batch] = []
        for batch in list(self._open.values()):
            if batch.opened_at + self.linger_s > now or (limit is not None and len(ready) >= limit):
                break  # batches are kept in opening order
            ready.append(self._close(batch, FlushReason.LINGER))
        return ready

    def close_all(self, reason: FlushReason = FlushReason.SHUTDOWN) -> list[Batch]:
        """Every open batch, closed."""
        return [self._close(batch, reason) for batch in list(self._open.values())]

    def discard(self) -> list[Batch]:
        """Forget every open batch without sending it (partitions revoked)."""
        dropped = list(self._open.values())
        self._open.clear()
        return dropped

    def next_deadline(self) -> float | None:
        """When the oldest open batch is due, or None."""
        for batch in self._open.values():
            return batch.opened_at + self.linger_s
        return None

    @property
    def open_batches(self) -> int:
        """Batches being filled."""
        return len(self._open)

    @property
    def open_values(self) -> int:
        """Values in open batches."""
        return sum(batch.size for batch in self._open.values())

    @staticmethod
    def _fitting(sizes: list[int], room: int) -> int:
        """How many of the values (of these sizes, in order) fit in `room` bytes."""
        used = 0
        for count, size in enumerate(sizes):
            used += size
            if used > room:
                return count
        return len(sizes)

    def _open_new(self, group: GroupKey, now: float) -> Batch:
        batch = Batch(group=group, opened_at=now)
        self._open[group] = batch
        return batch

    def _attach(
        self, batch: Batch, pending: PendingEvent, key: str, values: tuple[str, ...]
    ) -> Part:
        part = Part(pending, key, values)
        batch.parts.append(part)
        known = batch.values.get(key)
        if known is None:
            known = batch.values[key] = {}
        for value in values:
            known[value] = None
        batch.size += len(values)
        pending.parts += 1
        return part

    def _close(self, batch: Batch, reason: FlushReason) -> Batch:
        if self._open.get(batch.group) is batch:
            del self._open[batch.group]
        batch.flush_reason = reason
        return batch
