"""Per-code order (guarantee 4): a later change to a code never overtakes an earlier one.

Scantrust runs tasks concurrently, so two requests that write different values
to the same field of the same code could be applied in either order. The
guard knows, for every (constraint key, value) in an open batch or an
unfinished task, which scm_data that batch or task writes (its *claims*). An
event that would write a different value to a claimed field is held back
until every batch or task it conflicts with has ended; events that touch a
code with an event already held back queue behind it, first in, first out.
Writing the same value again is no conflict.

Order is kept per (constraint key, value): the guard cannot know that an
extended_id and a serial number name the same code. An event with several
constraint keys claims and checks the values of every key: a later change to
any of them waits behind it, and it waits behind an earlier change to any.

Pure: owners are batch ids; the pipeline claims when it batches an event and
releases when the batch's task ends (or the batch is rejected or dropped).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Generic, NamedTuple, TypeVar

Item = TypeVar("Item")
CodeKey = tuple[str, str]
Position = tuple[str, int, int]


class Change(NamedTuple):
    """What an event (or its part of a batch) writes: scm_data to every value of each
    constraint key."""

    constraints: Mapping[str, Sequence[str]]
    scm_data: Mapping[str, str]

    def codes(self) -> Iterable[CodeKey]:
        """The (constraint key, value) pairs it touches."""
        return ((key, value) for key, values in self.constraints.items() for value in values)


class OrderGuard(Generic[Item]):
    """Claims of open batches and unfinished tasks, and the events held back by them."""

    def __init__(self) -> None:
        # constraint key -> value -> [(owner, scm_data)]. Keyed in two levels so the hot
        # path (one lookup per value of every event) builds no tuples; the scm_data
        # mapping is shared per owner.
        self._claims: dict[str, dict[str, list[tuple[str, Mapping[str, str]]]]] = {}
        # owner -> the (constraint key, values) it claimed, in chunks as claimed.
        self._owned: dict[str, list[tuple[str, list[str]]]] = {}
        self._held: deque[tuple[Item, Change, Position | None]] = deque()
        self._held_codes: Counter[CodeKey] = Counter()
        self._highest_held: dict[tuple[str, int], int] = {}  # per (topic, partition)

    # -- claims ------------------------------------------------------------------

    def claim(self, owner: str, change: Change) -> None:
        """Record that `owner` (a batch) writes `change`. Claiming again is harmless."""
        constraints, data = change
        owned = self._owned.get(owner)
        if owned is None:
            owned = self._owned[owner] = []
        for key, values in constraints.items():
            by_value = self._claims.get(key)
            if by_value is None:
                by_value = self._claims[key] = {}
            fresh: list[str] = []
            for value in values:
                holders = by_value.get(value)
                if holders is None:
                    by_value[value] = [(owner, data)]
                elif all(holder != owner for holder, _ in holders):
                    holders.append((owner, data))
                else:
                    continue
                fresh.append(value)
            if fresh:
                owned.append((key, fresh))

    def owns(self, owner: str) -> bool:
        """Whether `owner` holds any claim."""
        return owner in self._owned

    def release(self, owner: str) -> None:
        """`owner`'s task ended, or its batch was rejected or dropped."""
        for key, values in self._owned.pop(owner, ()):
            by_value = self._claims.get(key)
            if by_value is None:
                continue
            for value in values:
                holders = by_value.get(value)
                if holders is None:
                    continue
                if len(holders) == 1:
                    if holders[0][0] == owner:
                        del by_value[value]
                    continue
                holders[:] = [(holder, data) for holder, data in holders if holder != owner]
                if not holders:
                    del by_value[value]
            if not by_value:
                del self._claims[key]

    def conflicts(self, change: Change) -> bool:
        """Would `change` overtake an earlier change to one of its codes?"""
        if self._conflicts_with_claims(change):
            return True
        held = self._held_codes
        return bool(held) and any(code in held for code in change.codes())

    def _conflicts_with_claims(self, change: Change) -> bool:
        constraints, scm_data = change
        for key, values in constraints.items():
            by_value = self._claims.get(key)
            if not by_value:
                continue
            for value in values:
                holders = by_value.get(value)
                if holders is None:
                    continue
                for _, written in holders:
                    for field, new in scm_data.items():
                        earlier = written.get(field)
                        if earlier is not None and earlier != new:
                            return True
        return False

    # -- held events -----------------------------------------------------------------

    def hold(self, item: Item, change: Change, position: Position | None = None) -> None:
        """Keep `item` until nothing earlier blocks it. Held items of one partition stay
        in the order they were published (`position`: topic, partition, offset): an
        event read in again after other events of its partition were held (one held
        behind an intent until it closed) goes before them, not after."""
        self._held_codes.update(change.codes())
        if position is not None:
            stream = position[:2]
            # Events are mostly held in the order they were read: a scan only for one
            # that goes before an event of its partition held already (else a backlog of
            # n held events costs n^2/2 steps). The highest offset held per partition
            # may be stale (taken out since): then the scan finds nothing and appends.
            if self._held and self._highest_held.get(stream, -1) > position[2]:
                for index, (_, _, other) in enumerate(self._held):
                    if other is not None and other[:2] == stream and other[2] > position[2]:
                        self._held.insert(index, (item, change, position))
                        return
            else:
                self._highest_held[stream] = position[2]
        self._held.append((item, change, position))

    def next_admissible(self) -> Item | None:
        """The first held item that nothing blocks any more, taken out of the queue.

        An item is blocked by a conflicting claim, or by an earlier held item that
        touches one of its codes (first in, first out per code).
        """
        blocked: set[CodeKey] = set()
        for index, (item, change, _) in enumerate(self._held):
            codes = set(change.codes())
            if codes & blocked or self._conflicts_with_claims(change):
                blocked |= codes
                continue
            del self._held[index]
            self._held_codes.subtract(codes)
            self._held_codes = +self._held_codes
            return item
        return None

    def drop_held(self) -> list[Item]:
        """Forget every held item (their partitions were revoked); returns them."""
        items = [item for item, _, _ in self._held]
        self._held.clear()
        self._held_codes.clear()
        self._highest_held.clear()
        return items

    @property
    def held(self) -> int:
        """Events held back."""
        return len(self._held)

    @property
    def held_values(self) -> int:
        """Constraint values of the events held back."""
        return self._held_codes.total()

    @property
    def claimed_codes(self) -> int:
        """(constraint key, value) pairs with a claim."""
        return sum(len(by_value) for by_value in self._claims.values())
