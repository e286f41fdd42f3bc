"""Which input partitions intake owns, and whether a batch is still this intake's.

Each owned partition has a token, new whenever the partition may have had another
owner since (see `assigned`); a batch remembers the tokens it was handed on under,
and is this intake's only while they are unchanged (docs/design.md section 11,
"Ownership, not membership"). Part of the offset book (`service/relay/book.py`),
which hands the ownership questions on to it.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection

from service.core.batching import Batch

Tokens = dict[tuple[str, int], int]


class PartitionOwnership:
    """The ownership tokens of the partitions owned, and of every batch in flight."""

    def __init__(self) -> None:
        self._tokens: Tokens = {}
        self._batch_tokens: dict[str, Tokens] = {}
        self._next_token = itertools.count(1)
        self._generation: int | None = None
        self._between = False  # partitions revoked, not yet assigned again

    def revoked(self) -> None:
        """The group took every partition back (an eager rebalance): until the next
        assignment nothing is owned."""
        self._between = True

    @property
    def between_assignments(self) -> bool:
        """Partitions revoked and not assigned again yet."""
        return self._between

    def assigned(self, partitions: Collection[tuple[str, int]], generation: int | None) -> None:
        """The group assigned `partitions` in `generation`. A partition owned in the
        generation just before keeps its token (nobody else can have owned it between
        two consecutive generations); any other gets a new one, so that a batch handed
        on before is no longer this intake's. Without a known generation (a consumer
        without a group), every partition keeps its token."""
        continuous = generation is not None and self._generation == generation - 1
        tokens: Tokens = {}
        for key in partitions:
            if key in self._tokens and (continuous or generation is None):
                tokens[key] = self._tokens[key]
            else:
                tokens[key] = next(self._next_token)
        self._tokens = tokens
        self._generation = generation
        self._between = False

    def token(self, topic: str, partition: int) -> int | None:
        """The partition's ownership token now (None: not owned)."""
        return None if self._between else self._tokens.get((topic, partition))

    def owns_partition(self, topic: str, partition: int, token: int | None = None) -> bool:
        """Whether the partition is this intake's (under `token`, when given)."""
        current = self.token(topic, partition)
        return current is not None and (token is None or current == token)

    def handed_on(self, batch: Batch) -> None:
        """`batch` left intake: it is this intake's while its partitions' tokens stay."""
        self._batch_tokens[batch.batch_id] = {
            key: self._tokens.get(key, 0) for key in _partitions(batch)
        }

    def let_go(self, batch_id: str) -> None:
        """`batch_id` is no longer in flight (recorded, or forgotten)."""
        self._batch_tokens.pop(batch_id, None)

    def owns(self, batch: Batch) -> bool:
        """Whether every partition of `batch`'s events is still this intake's, as it was
        when the batch was handed on."""
        if self._between:
            return False
        tokens = self._batch_tokens.get(batch.batch_id)
        if tokens is None:
            return False
        return all(self._tokens.get(key) == token for key, token in tokens.items())


def _partitions(batch: Batch) -> set[tuple[str, int]]:
    return {(part.event.source.topic, part.event.source.partition) for part in batch.parts}
