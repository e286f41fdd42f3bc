"""The other stages as intake (and the parts it is made of) sees them."""

from __future__ import annotations

from typing import Protocol

from service.core.batching import Batch
from service.relay.messages import DeadLetter, Flush, Resolution


class UploadQueue(Protocol):
    """The uploaders' queue, as intake sees it."""

    async def put(self, batch: Batch | Resolution) -> None:
        """Queue a batch (or an intent to resolve); waits for room."""

    @property
    def idle(self) -> bool:
        """Nothing queued: an uploader would take a batch at once."""

    def take_queued(self) -> list[Batch]:
        """Take back every batch not yet started (a rebalance)."""


class LedgerSync(Protocol):
    """The ledger view (ledger.LedgerView), as intake waits for it at an assignment."""

    async def end_offsets(self) -> dict[int, int]:
        """Where each ledger partition ends now, open transactions included."""

    def has_read_to(self, ends: dict[int, int]) -> bool:
        """Whether the view has read and told every partition up to `ends`."""

    def partition_stopped(self) -> bool:
        """Whether a ledger partition is stopped at a record batch it cannot decode."""

    def progress(self, topic: str, partition: int) -> bytes | None:
        """The latest progress record of an input partition the view has read."""


class CommitQueue(Protocol):
    """The committer, as intake sees it."""

    async def submit(self, item: DeadLetter | Flush) -> None:
        """Queue a dead letter (or a request to commit soon) for the next transaction."""

    async def flush_and_suspend(self) -> None:
        """Commit what is queued, then start no transaction until `resume`."""

    def suspend(self) -> None:
        """Start no new transaction until `resume` (a rebalance is under way)."""

    def resume(self) -> None:
        """Commit again after a suspension."""
