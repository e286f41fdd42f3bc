"""What each stage needs from Kafka, from the API and from its neighbours, as Protocols.

aiokafka's clients and `ScantrustClient` satisfy these as they are; the stages'
unit tests pass in-memory fakes (tests/unit/relay/fakes.py) and run without a
broker or a server.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any, Protocol

from aiokafka import ConsumerRebalanceListener, TopicPartition

from service.core.batching import Batch, Done, Source
from service.core.offsets import Checkpoint
from service.core.resilience import BreakerState
from service.core.slots import Slot
from service.relay.reconcile import TaskLookup
from service.scantrust.client import UploadRequest
from service.scantrust.outcomes import ApiTask, Expired, Failure, TaskPage, UploadOutcome


class FetchedRecord(Protocol):
    """The fields of a consumed Kafka record that the stages read."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


class PartitionReader(Protocol):
    """A consumer that reads assigned partitions (intake's input, the ledger reader)."""

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> Mapping[TopicPartition, Sequence[FetchedRecord]]:
        """Records fetched since the last call, by partition."""

    def assignment(self) -> Collection[TopicPartition]:
        """The partitions assigned now."""

    def highwater(self, partition: TopicPartition) -> int | None:
        """The partition's high watermark from the last fetch, if known."""

    async def position(self, partition: TopicPartition) -> int:
        """The offset of the next record to read."""


class InputConsumer(PartitionReader, Protocol):
    """Intake's consumer of the input topic: it pauses while a bound is reached."""

    def pause(self, *partitions: TopicPartition) -> None:
        """Stop fetching these partitions (polling goes on)."""

    def resume(self, *partitions: TopicPartition) -> None:
        """Fetch these partitions again."""

    def seek(self, partition: TopicPartition, offset: int) -> None:
        """Read `partition` from `offset` next."""

    async def seek_to_beginning(self, *partitions: TopicPartition) -> bool:
        """Read these partitions from their first offset next."""


class LedgerConsumer(PartitionReader, Protocol):
    """The ledger view's reader: every ledger partition, from the beginning."""

    async def seek_to_beginning(self, *partitions: TopicPartition) -> bool:
        """Read these partitions again from their first record."""

    def seek(self, partition: TopicPartition, offset: int) -> None:
        """Read `partition` from `offset` next."""

    def pause(self, *partitions: TopicPartition) -> None:
        """Stop fetching these partitions (a record batch there cannot be decoded)."""

    def resume(self, *partitions: TopicPartition) -> None:
        """Fetch these partitions again."""


class GroupMember(Protocol):
    """The poller's place in its consumer group: which ledger partitions it follows."""

    def subscribe(self, topics: list[str], listener: ConsumerRebalanceListener) -> None:
        """Join the group for these topics."""

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> Mapping[TopicPartition, Sequence[FetchedRecord]]:
        """Keeps the membership alive (the poller fetches nothing: partitions paused)."""

    def assignment(self) -> Collection[TopicPartition]:
        """The partitions assigned now."""

    def pause(self, *partitions: TopicPartition) -> None:
        """Stop fetching these partitions."""


class GroupOffsets(Protocol):
    """The committed offsets (with metadata) of the relay's consumer group."""

    async def list_consumer_group_offsets(
        self, group_id: str, group_coordinator_id: int | None = None, partitions: Any = None
    ) -> Mapping[TopicPartition, Any]:
        """Offset and metadata per partition (None where nothing is committed)."""


class MetadataProbe(Protocol):
    """One metadata request: is Kafka reachable?"""

    async def list_topics(self) -> list[str]:
        """The topic names."""


class TransactionalProducer(Protocol):
    """The committer's producer: one transaction per round of work."""

    async def begin_transaction(self) -> None:
        """Start a transaction."""

    async def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> Any:
        """Queue a record in the open transaction."""

    async def send_offsets_to_transaction(
        self, offsets: Mapping[TopicPartition, Any], group_id: str
    ) -> None:
        """Commit these consumer offsets with the transaction."""

    async def commit_transaction(self) -> None:
        """Commit the open transaction."""

    async def abort_transaction(self) -> None:
        """Abort the transaction: nothing written in it becomes visible."""


class UploadApi(Protocol):
    """The upload endpoint: one attempt per call (the uploaders own the retries)."""

    def reserve_upload_slot(self) -> Slot | None:
        """Take the next upload slot of this replica's share of the account's limit now,
        so that it comes while the upload's intent is committed (None: none owned yet)."""

    async def upload(
        self,
        request: UploadRequest,
        *,
        send_by: float | None = None,
        deadline: float | None = None,
        slot: Slot | None = None,
    ) -> UploadOutcome | Expired:
        """Submit one batch, unless its send window closes before it is sent: `send_by`
        (Unix time) or `deadline` (the event loop's monotonic clock) passes, or the wall
        clock disagrees with the monotonic one about the time left (`Expired`). `slot`:
        one `reserve_upload_slot` took, used unless it has passed."""


class StatusApi(Protocol):
    """Bulk task status (the client retries these reads itself)."""

    async def tasks(self, task_ids: Sequence[str]) -> TaskPage | Failure:
        """The tasks the API knows among `task_ids`."""

    async def task(self, task_id: str) -> ApiTask | Failure:
        """One task's own view (with its details)."""


class BreakerView(Protocol):
    """The client's circuit breaker, for readiness."""

    @property
    def breaker_state(self) -> BreakerState:
        """Closed, open or half-open."""


class Accounting(Protocol):
    """Intake's offset book as the committer sees it: what a transaction accounts for,
    and the input offsets that it may therefore commit."""

    def dead_lettered(self, topic: str, partition: int, offset: int) -> None:
        """The record at this position is in the dead-letter topic."""

    def batch_recorded(self, batch: Batch) -> None:
        """Every event part of `batch` is in a ledger record or dead-lettered."""

    def sources_done(self, sources: Iterable[Done | Source]) -> int:
        """Events recorded by position (a resolved intent): accounted for."""

    def claim_intent(self, batch_id: str) -> bool:
        """May this batch's intent be written (the batch was not revoked)?"""

    def owns(self, batch: Batch) -> bool:
        """Are the batch's partitions still this intake's, as when it was handed on?"""

    def owns_partition(self, topic: str, partition: int, token: int | None = None) -> bool:
        """Is the partition this intake's (under `token`, when given)?"""

    def checkpoints(self) -> dict[tuple[str, int], Checkpoint]:
        """Partitions whose progress moved: offset, metadata and progress record."""

    def fence_points(self) -> dict[tuple[str, int], tuple[int, str]]:
        """The last commit point of every partition tracked."""


class KafkaAdmin(GroupOffsets, MetadataProbe, Protocol):
    """The admin client: committed offsets for intake, metadata for the heartbeat."""


class AccountCheck(Protocol):
    """`GET /api/v2/me/`: does the API accept the relay's token and base URL?"""

    async def me(self, *, retry: bool = True) -> dict[str, Any] | Failure:
        """The token's user, or why not."""


class TokenReload(Protocol):
    """The token read again from its file when that changed."""

    async def reload_token(self) -> bool:
        """True when the token changed."""


class RateShare(Protocol):
    """The account's rate limits, as the group's assignments divide them."""

    def assigned(self, role: str, owned: Collection[int], partitions: int) -> None:
        """This replica now owns `owned` of the `partitions` partitions of `role`'s topic."""

    def revoking(self, role: str) -> None:
        """A rebalance began: `role`'s partitions may be another replica's already."""


class ScantrustApi(
    UploadApi, StatusApi, TaskLookup, AccountCheck, TokenReload, BreakerView, Protocol
):
    """The API client as the whole relay uses it."""
