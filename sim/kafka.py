"""An in-memory Kafka: the rules the relay's guarantees rest on, and nothing else.

Modelled (each rule is pinned by a test against the real broker in
tests/repository/test_kafka_model.py, so that the model cannot drift from Kafka):

- partitions and offsets; the producer's partitioner (murmur2 of the key, as
  aiokafka's default); keyless records spread by the seed;
- transactions: records written in one are visible to `read_committed` readers only
  once committed, never when aborted; a commit or abort writes a control marker,
  which takes an offset; readers stop at the last stable offset (the first record of
  an open transaction; also a read_committed consumer's end offset) and step over
  markers and aborted records; the high watermark counts everything written;
- offsets committed in a transaction (`send_offsets_to_transaction`), applied at
  commit (never committed reads as offset -1); fencing as KIP-447 does: a commit
  carrying a generation and member id is refused unless the member belongs to the
  group's current generation; a commit without generation (a client before KIP-447)
  is accepted unchecked; commit metadata over the broker's 4 096 characters (Java's:
  UTF-16 units) is refused, and kills aiokafka's producer (its sender task dies: the
  call raises KafkaError, every later one fails, the transaction stays open until the
  broker times it out);
- producers fenced by their transactional id (a new producer with the same id aborts
  the old one's open transaction) and transactions aborted by the broker once past
  the transaction timeout, at its next sweep for them (every 10 s:
  transaction.abort.timed.out.transaction.cleanup.interval.ms), the producer then
  fenced; a fenced producer is dead (aiokafka: fatal), every later call fails;
- consumer groups (the classic protocol, eager): a join starts a rebalance, members
  learn of it at their next heartbeat, each calls its revoke callback then rejoins,
  the rebalance completes when all have rejoined or the rebalance timeout passes
  (laggards are removed), the generation is bumped and partitions assigned round
  robin over the members sorted by id, then the assign callback runs; a member goes
  on heartbeating through its revoke callback; a member whose heartbeats stop for the
  session timeout is evicted, and learns it at its next heartbeat (aiokafka then
  resets its generation to -1 before its revoke callback); a group left empty moves
  to a new generation; a consumer that does not poll for `max_poll_interval` leaves
  the group and calls its revoke callback at once, and rejoins at its next poll;
  `start` returns once a subscribed consumer has its first assignment; `getmany`
  waits while a rebalance is in progress;
- compacted topics: a compaction keeps the last record of each key (tombstones
  included: as within delete.retention.ms, their later removal is not modelled) and
  drops aborted records; it compacts the whole log below the last stable offset (the
  broker leaves the segment being written alone, so it gets there later).

Not modelled (said in docs/design.md section 13): replication, leader moves and
broker crashes; fetch sessions and prefetching (a fetch reads the log synchronously);
log retention by time or size; quotas; the cooperative and the new consumer group
protocols; idempotent sequence numbers within a producer session.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Final, TypeVar

from aiokafka import ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import (
    IllegalGenerationError,
    IllegalOperation,
    IllegalStateError,
    KafkaError,
    OffsetMetadataTooLargeError,
    ProducerFenced,
    UnknownMemberIdError,
)
from aiokafka.partitioner import murmur2
from aiokafka.structs import OffsetAndMetadata

from service.fencing import GroupFencedError

MAX_METADATA_CHARS: Final = 4096  # offset.metadata.max.bytes, counted in Java chars
# transaction.abort.timed.out.transaction.cleanup.interval.ms: how often the broker looks
# for transactions past their timeout (an expired one waits for the next look).
TXN_TIMEOUT_SWEEP_S: Final = 10.0
BROKER_TICK_S: Final = 0.25

T = TypeVar("T")


class TxnState(Enum):
    OPEN = "open"
    COMMITTED = "committed"
    ABORTED = "aborted"


@dataclass(eq=False)
class Txn:
    """One transaction of one producer session."""

    transactional_id: str
    epoch: int
    started_at: float
    state: TxnState = TxnState.OPEN
    first_offsets: dict[TopicPartition, int] = field(default_factory=dict)
    offsets: dict[tuple[str, TopicPartition], tuple[int, str]] = field(default_factory=dict)
    error: BaseException | None = None


@dataclass(eq=False)
class Entry:
    """One offset of a partition's log."""

    offset: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    txn: Txn | None = None
    control: bool = False
    written_at: float = 0.0

    @property
    def visible(self) -> bool:
        """Readable by a read_committed consumer."""
        if self.control:
            return False
        return self.txn is None or self.txn.state is TxnState.COMMITTED


@dataclass(slots=True)
class Record:
    """A consumed record, with the fields the relay reads."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()
    timestamp: int = 0


class Partition:
    """One partition's log (entries by offset; compaction leaves gaps)."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []
        self.next_offset = 0
        self.log_start = 0
        self.open: dict[Txn, int] = {}  # open transactions and their first offset here

    def append(self, entry: Entry) -> None:
        self.entries.append(entry)
        self.next_offset = entry.offset + 1

    @property
    def high_watermark(self) -> int:
        return self.next_offset

    @property
    def last_stable_offset(self) -> int:
        return min(self.open.values(), default=self.next_offset)

    def index_of(self, offset: int) -> int:
        """The index of the first entry at or after `offset`."""
        low, high = 0, len(self.entries)
        while low < high:
            middle = (low + high) // 2
            if self.entries[middle].offset < offset:
                low = middle + 1
            else:
                high = middle
        return low


@dataclass
class Topic:
    name: str
    partitions: list[Partition]
    compacted: bool = False


@dataclass(eq=False)
class Member:
    member_id: str
    consumer: SimConsumer
    last_heartbeat: float
    join: asyncio.Future[tuple[int, str, list[TopicPartition]]] | None = None


@dataclass
class Group:
    group_id: str
    generation: int = 0
    members: dict[str, Member] = field(default_factory=dict)
    rebalancing: bool = False
    deadline: float = 0.0
    assignment: dict[str, list[TopicPartition]] = field(default_factory=dict)
    committed: dict[TopicPartition, tuple[int, str]] = field(default_factory=dict)


class Broker:
    """The cluster: topics, transactions, consumer groups, committed offsets."""

    def __init__(self, loop: asyncio.AbstractEventLoop, rng: random.Random) -> None:
        self.loop = loop
        self.rng = rng
        self.topics: dict[str, Topic] = {}
        self.groups: dict[str, Group] = {}
        self.producer_epochs: dict[str, int] = {}
        self.open_txns: dict[str, Txn] = {}  # transactional id -> its open transaction
        self.transaction_timeout_s = 10.0
        self._member_ids = itertools.count(1)
        self._waiters: list[asyncio.Future[None]] = []
        self.log: list[str] = []  # what the broker decided, for the readable history
        # Every committed record of every topic, in commit order (before any compaction):
        # what readers of the topic could ever have seen.
        self.committed_records: dict[str, list[Record]] = {}
        self._ticker: asyncio.Task[None] | None = None
        self.max_metadata = 0  # the longest commit metadata seen (for diagnosis)

    # -- topics -------------------------------------------------------------------------

    def create_topic(self, name: str, partitions: int, *, compacted: bool = False) -> None:
        self.topics[name] = Topic(name, [Partition() for _ in range(partitions)], compacted)
        self.committed_records[name] = []

    def partition(self, tp: TopicPartition) -> Partition:
        index: int = tp.partition
        return self.topics[tp.topic].partitions[index]

    def partitions_for(self, topic: str) -> list[TopicPartition]:
        return [TopicPartition(topic, p) for p in range(len(self.topics[topic].partitions))]

    def partition_for_key(self, topic: str, key: bytes | None) -> int:
        count = len(self.topics[topic].partitions)
        if key is None:
            return self.rng.randrange(count)
        hashed: int = murmur2(key)
        return (hashed & 0x7FFFFFFF) % count

    def append(
        self,
        tp: TopicPartition,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes]] = (),
        txn: Txn | None = None,
    ) -> int:
        part = self.partition(tp)
        entry = Entry(part.next_offset, key, value, list(headers), txn, written_at=self.loop.time())
        part.append(entry)
        if txn is None:
            self._committed(tp, entry)
        elif tp not in txn.first_offsets:
            txn.first_offsets[tp] = entry.offset
            part.open[txn] = entry.offset
        self.notify()
        return entry.offset

    def _committed(self, tp: TopicPartition, entry: Entry) -> None:
        self.committed_records[tp.topic].append(
            Record(
                tp.topic, tp.partition, entry.offset, entry.key, entry.value, tuple(entry.headers)
            )
        )

    def notify(self) -> None:
        """Wake every reader waiting for new data."""
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def waiter(self) -> asyncio.Future[None]:
        future: asyncio.Future[None] = self.loop.create_future()
        self._waiters.append(future)
        return future

    def compact(self, topic: str, active_segment_s: float = 30.0) -> None:
        """The log cleaner: below the last stable offset and outside the active segment
        (records of the last `active_segment_s`: Kafka never cleans the segment being
        written), keep the last record of each key and drop aborted records (markers
        stay: they only take offsets)."""
        for part in self.topics[topic].partitions:
            recent = [
                e.offset for e in part.entries if e.written_at > self.loop.time() - active_segment_s
            ]
            stable = (
                min(part.last_stable_offset, *recent[:1]) if recent else part.last_stable_offset
            )
            last: dict[bytes | None, int] = {}
            for entry in part.entries:
                if entry.offset < stable and entry.visible:
                    last[entry.key] = entry.offset
            part.entries = [
                e
                for e in part.entries
                if e.offset >= stable or e.control or (e.visible and last.get(e.key) == e.offset)
            ]
        self.log.append(f"compacted {topic}")

    # -- transactions -------------------------------------------------------------------

    def init_producer(self, transactional_id: str) -> int:
        """InitProducerId: a new epoch; the previous session's open transaction is aborted."""
        old = self.open_txns.pop(transactional_id, None)
        if old is not None:
            self._end(old, TxnState.ABORTED)
            self.log.append(f"aborted the open transaction of {transactional_id} (new session)")
        epoch = self.producer_epochs.get(transactional_id, -1) + 1
        self.producer_epochs[transactional_id] = epoch
        return epoch

    def begin(self, transactional_id: str, epoch: int) -> Txn:
        self._check_epoch(transactional_id, epoch)
        txn = Txn(transactional_id, epoch, self.loop.time())
        self.open_txns[transactional_id] = txn
        return txn

    def _check_epoch(self, transactional_id: str, epoch: int) -> None:
        if self.producer_epochs.get(transactional_id) != epoch:
            raise ProducerFenced(f"producer {transactional_id} epoch {epoch} was fenced")

    def check_open(self, txn: Txn) -> None:
        self._check_epoch(txn.transactional_id, txn.epoch)
        if txn.state is not TxnState.OPEN:
            raise ProducerFenced(f"transaction of {txn.transactional_id} already {txn.state.value}")

    def add_offsets(self, txn: Txn, group_id: str, offsets: Mapping[TopicPartition, Any]) -> None:
        """TxnOffsetCommit: fenced by generation when one is given (KIP-447)."""
        self.check_open(txn)
        generation = getattr(group_id, "generation_id", -1)
        member_id = getattr(group_id, "member_id", "")
        if generation >= 0 or member_id:
            group = self.groups.get(str(group_id))
            if group is None or member_id not in group.members:
                raise UnknownMemberIdError(f"{member_id} is not a member of {group_id}")
            if generation != group.generation:
                raise IllegalGenerationError(
                    f"generation {generation} of {member_id}, group {group_id} is at "
                    f"{group.generation}"
                )
        for tp, point in offsets.items():
            # aiokafka takes an offset, an (offset, metadata) pair or OffsetAndMetadata.
            if isinstance(point, int):
                offset, metadata = point, ""
            else:
                offset, metadata = point[0], point[1]
            self.max_metadata = max(self.max_metadata, len(metadata or ""))
            # The broker compares Java's String.length(): UTF-16 units, not bytes.
            chars = len((metadata or "").encode("utf-16-le")) // 2
            if chars > MAX_METADATA_CHARS:
                raise OffsetMetadataTooLargeError(f"{tp}: {chars} characters of metadata")
            txn.offsets[(str(group_id), tp)] = (offset, metadata or "")

    def end(self, txn: Txn, commit: bool) -> None:
        """EndTxn from the producer."""
        self.check_open(txn)
        if commit and txn.error is not None:
            raise txn.error
        self._end(txn, TxnState.COMMITTED if commit else TxnState.ABORTED)

    def _end(self, txn: Txn, state: TxnState) -> None:
        if self.open_txns.get(txn.transactional_id) is txn:
            del self.open_txns[txn.transactional_id]
        txn.state = state
        for tp in txn.first_offsets:
            part = self.partition(tp)
            part.open.pop(txn, None)
            if state is TxnState.COMMITTED:
                for entry in part.entries[part.index_of(txn.first_offsets[tp]) :]:
                    if entry.txn is txn:
                        self._committed(tp, entry)
            part.append(Entry(part.next_offset, None, None, [], txn, control=True))
        if state is TxnState.COMMITTED:
            for (group_id, tp), point in txn.offsets.items():
                self.group(group_id).committed[tp] = point
        self.notify()

    # -- consumer groups ----------------------------------------------------------------

    def group(self, group_id: str) -> Group:
        group = self.groups.get(group_id)
        if group is None:
            group = self.groups[group_id] = Group(group_id)
        return group

    def join(self, group_id: str, member_id: str, consumer: SimConsumer) -> asyncio.Future[Any]:
        """JoinGroup (+ SyncGroup): a future of (generation, member id, assignment); an
        unknown non-empty member id fails at once with UnknownMemberIdError."""
        group = self.group(group_id)
        future: asyncio.Future[Any] = self.loop.create_future()
        if member_id and member_id not in group.members:
            future.set_exception(UnknownMemberIdError(member_id))
            return future
        if not member_id:
            member_id = f"{consumer.client_id}-{next(self._member_ids):05d}"
            group.members[member_id] = Member(member_id, consumer, self.loop.time())
            self.log.append(f"{group_id}: {member_id} joins")
        member = group.members[member_id]
        member.last_heartbeat = self.loop.time()
        member.join = future
        if not group.rebalancing:
            self._start_rebalance(group)
        self._maybe_complete(group)
        return future

    def _start_rebalance(self, group: Group) -> None:
        group.rebalancing = True
        timeouts = [m.consumer.rebalance_timeout_s for m in group.members.values()]
        group.deadline = self.loop.time() + max(timeouts, default=0.0)
        self.log.append(f"{group.group_id}: rebalance (generation {group.generation})")

    def _maybe_complete(self, group: Group, *, deadline_passed: bool = False) -> None:
        if not group.rebalancing:
            return
        waiting = [m for m in group.members.values() if m.join is not None]
        if not deadline_passed and len(waiting) < len(group.members):
            return
        for member in [m for m in group.members.values() if m.join is None]:
            del group.members[member.member_id]
            self.log.append(f"{group.group_id}: {member.member_id} removed (did not rejoin)")
        group.rebalancing = False
        group.generation += 1  # an empty group too (the broker's group goes Empty)
        if not group.members:
            group.assignment = {}
            return
        members = sorted(group.members)
        topics = sorted({t for m in group.members.values() for t in m.consumer.topics})
        partitions = [tp for t in topics for tp in self.partitions_for(t)]
        assignment: dict[str, list[TopicPartition]] = {m: [] for m in members}
        for index, tp in enumerate(partitions):
            assignment[members[index % len(members)]].append(tp)
        group.assignment = assignment
        self.log.append(
            f"{group.group_id}: generation {group.generation}: "
            + "; ".join(f"{m} {[tp.partition for tp in tps]}" for m, tps in assignment.items())
        )
        for member_id in members:
            member = group.members[member_id]
            member.last_heartbeat = self.loop.time()
            joined, member.join = member.join, None
            if joined is not None and not joined.done():
                joined.set_result((group.generation, member_id, assignment[member_id]))

    def heartbeat(self, group_id: str, member_id: str, generation: int) -> str:
        """'ok', 'rebalance', 'unknown' (not a member) or 'illegal' (stale generation)."""
        group = self.group(group_id)
        member = group.members.get(member_id)
        if member is None:
            return "unknown"
        member.last_heartbeat = self.loop.time()
        if group.rebalancing:
            return "rebalance"
        if generation != group.generation:
            return "illegal"
        return "ok"

    def leave(self, group_id: str, member_id: str, why: str) -> None:
        group = self.group(group_id)
        member = group.members.pop(member_id, None)
        if member is None:
            return
        self.log.append(f"{group_id}: {member_id} leaves ({why})")
        if member.join is not None and not member.join.done():
            member.join.cancel()
        member.join = None
        if group.members:
            if not group.rebalancing:
                self._start_rebalance(group)
            self._maybe_complete(group)
        else:
            group.rebalancing = False
            group.generation += 1  # the broker's group goes Empty in a new generation
            group.assignment = {}

    # -- time ---------------------------------------------------------------------------

    def start(self) -> None:
        self._ticker = self.loop.create_task(self._tick(), name="broker")

    async def _tick(self) -> None:
        sweep = self.loop.time() + TXN_TIMEOUT_SWEEP_S
        while True:
            await asyncio.sleep(BROKER_TICK_S)
            now = self.loop.time()
            expired: list[Txn] = []
            if now >= sweep:
                sweep += TXN_TIMEOUT_SWEEP_S
                expired = list(self.open_txns.values())
            for txn in expired:
                if now - txn.started_at > self.transaction_timeout_s:
                    self._end(txn, TxnState.ABORTED)
                    self.producer_epochs[txn.transactional_id] += 1  # fenced
                    self.log.append(f"aborted {txn.transactional_id}'s transaction (timeout)")
            for group in self.groups.values():
                for member in list(group.members.values()):
                    session = member.consumer.session_timeout_s
                    if member.join is None and now - member.last_heartbeat > session:
                        self.leave(group.group_id, member.member_id, "session timeout")
                if group.rebalancing and now >= group.deadline:
                    self._maybe_complete(group, deadline_passed=True)


class SimProducer:
    """aiokafka's transactional producer, as the committer uses it.

    Once fenced, or once its sender task died (commit metadata the broker refused), the
    producer is dead, as aiokafka's turns fatal: transaction calls fail the way its state
    machine does (AssertionError), sends find no transaction (IllegalOperation)."""

    def __init__(self, broker: Broker, transactional_id: str) -> None:
        self._broker = broker
        self.transactional_id = transactional_id
        self._epoch = -1
        self._txn: Txn | None = None
        self._dead = False

    async def start(self) -> None:
        self._epoch = self._broker.init_producer(self.transactional_id)

    async def stop(self) -> None:
        return None

    def _alive(self, call: str) -> None:
        if self._dead:
            if call in ("send", "send_offsets_to_transaction"):
                raise IllegalOperation("Can't send messages while not in transaction")
            raise AssertionError(f"Invalid state transition TransactionState.FATAL_ERROR -> {call}")

    def _fenced(self, check: Callable[[], T]) -> T:
        try:
            return check()
        except ProducerFenced:
            self._dead = True
            raise

    async def begin_transaction(self) -> None:
        self._alive("IN_TRANSACTION")
        self._txn = self._fenced(lambda: self._broker.begin(self.transactional_id, self._epoch))

    def _open(self, call: str) -> Txn:
        self._alive(call)
        txn = self._txn
        if txn is None:
            raise IllegalStateError("no transaction begun")
        self._fenced(lambda: self._broker.check_open(txn))
        return txn

    async def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> asyncio.Future[int]:
        txn = self._open("send")
        if partition is None:
            partition = self._broker.partition_for_key(topic, key)
        offset = self._broker.append(
            TopicPartition(topic, partition), key, value, headers or (), txn
        )
        done: asyncio.Future[int] = self._broker.loop.create_future()
        done.set_result(offset)
        return done

    async def send_offsets_to_transaction(
        self, offsets: Mapping[TopicPartition, Any], group_id: str
    ) -> None:
        txn = self._open("send_offsets_to_transaction")
        generation = getattr(group_id, "generation_id", None)
        if generation is not None and (generation < 0 or not getattr(group_id, "member_id", "")):
            # service/fencing.py refuses this before anything is sent.
            txn.error = GroupFencedError(f"not a member of group {group_id!s}")
            raise txn.error
        try:
            self._broker.add_offsets(txn, group_id, offsets)
        except (UnknownMemberIdError, IllegalGenerationError) as exc:
            txn.error = GroupFencedError(f"group {group_id!s} refused the commit: {exc}")
            raise txn.error from exc
        except OffsetMetadataTooLargeError as exc:
            # aiokafka's sender task dies of it; the transaction is left open at the broker.
            self._dead = True
            raise KafkaError("Unexpected error during batch delivery") from exc

    async def commit_transaction(self) -> None:
        txn = self._open("COMMITTING_TRANSACTION")
        # A commit refused (the group fenced it) leaves the transaction to be aborted.
        self._fenced(lambda: self._broker.end(txn, commit=True))
        self._txn = None

    async def abort_transaction(self) -> None:
        self._alive("ABORTING_TRANSACTION")
        txn = self._txn
        self._txn = None
        if txn is None:
            return
        self._fenced(lambda: self._broker.end(txn, commit=False))


class SimConsumer:
    """aiokafka's consumer, as intake, the ledger view and the poller use it: with a
    group (subscribe + listener) or without one (every partition of its topics)."""

    def __init__(
        self,
        broker: Broker,
        *,
        client_id: str,
        group_id: str | None = None,
        topics: Sequence[str] = (),
        read_committed: bool = True,
        fetch_records: int = 500,
        session_timeout_s: float = 10.0,
        heartbeat_interval_s: float = 3.0,
        rebalance_timeout_s: float = 10.0,
        max_poll_interval_s: float = 60.0,
    ) -> None:
        self._broker = broker
        self.client_id = client_id
        self.group_id = group_id
        self.topics: list[str] = list(topics)
        self._read_committed = read_committed
        self._fetch_records = fetch_records
        self.session_timeout_s = session_timeout_s
        self._heartbeat_interval_s = heartbeat_interval_s
        self.rebalance_timeout_s = rebalance_timeout_s
        self._max_poll_interval_s = max_poll_interval_s
        self._listener: ConsumerRebalanceListener | None = None
        self._assignment: set[TopicPartition] = set()
        self._positions: dict[TopicPartition, int] = {}
        self._highwater: dict[TopicPartition, int] = {}
        self._paused: set[TopicPartition] = set()
        self.generation = -1
        self.member_id = ""
        self._rebalancing = group_id is not None
        self._assigned = asyncio.Event()
        self._rejoin = asyncio.Event()
        self._polled = asyncio.Event()
        self._last_poll = broker.loop.time()
        # getmany calls under way: aiokafka counts no idle time while one is (its
        # subscription's fetch_context and fetcher_idle_time).
        self._fetching = 0
        self._left_for_poll = False
        self._revoked = False  # the revoke callback of the coming join has run
        self._closed = False
        self._coordinator: asyncio.Task[None] | None = None

    # -- membership ---------------------------------------------------------------------

    def subscribe(self, topics: list[str], listener: ConsumerRebalanceListener) -> None:
        """Subscribe with a listener; a started member (re)joins (as aiokafka)."""
        self.topics = list(topics)
        self._listener = listener
        self._rejoin.set()

    async def start(self) -> None:
        if self.group_id is None:
            self._assignment = {tp for t in self.topics for tp in self._broker.partitions_for(t)}
            for tp in self._assignment:
                self._positions[tp] = self._broker.partition(tp).log_start
            self._rebalancing = False
            return
        self._rejoin.set()
        self._coordinator = asyncio.get_running_loop().create_task(
            self._coordinate(), name=f"{self.client_id}-coordinator"
        )
        if self.topics:  # as aiokafka: a subscribed consumer starts once it has partitions
            await self._assigned.wait()

    async def stop(self) -> None:
        """LeaveGroup; no revoke callback (as aiokafka)."""
        if self._broker.loop.is_closed():
            # A killed replica's coroutine, finalized by the garbage collector after the
            # history ended: the world is gone, there is nobody to tell.
            return
        self._closed = True
        if self._coordinator is not None:
            self._coordinator.cancel()
        if self.group_id is not None and self.member_id:
            self._broker.leave(self.group_id, self.member_id, "stopped")

    async def _coordinate(self) -> None:
        """The member's side of the group protocol: join when asked, heartbeat every
        `heartbeat_interval_s`, leave when not polled for `max_poll_interval_s`."""
        assert self.group_id is not None
        while not self._closed:
            if not self.topics:  # not subscribed yet: nothing to join
                self._rejoin.clear()
                await self._rejoin.wait()
                continue
            if self._left_for_poll:  # left for a poll timeout: rejoin at the next poll
                if not self._fetching:  # (one under way is polling already)
                    self._polled.clear()
                    await self._polled.wait()
                self._left_for_poll = False
                self._rejoin.set()
                continue
            if self._rejoin.is_set():
                await self._join()
                continue
            try:
                async with asyncio.timeout(self._heartbeat_interval_s):
                    await self._rejoin.wait()
                continue
            except TimeoutError:
                pass
            now = self._broker.loop.time()
            idle_s = 0.0 if self._fetching else now - self._last_poll
            if idle_s > self._max_poll_interval_s:
                # aiokafka: "poll timeout expired": leave the group and prepare the rejoin
                # (the revoke callback) at once; the join itself waits for the next poll.
                self._broker.leave(self.group_id, self.member_id, "poll timeout")
                self._reset_generation()
                await self._revoke()
                self._left_for_poll = True
                continue
            answer = self._broker.heartbeat(self.group_id, self.member_id, self.generation)
            if answer in ("unknown", "illegal"):
                self._reset_generation()
                self._rejoin.set()
            elif answer == "rebalance":
                self._rejoin.set()

    def _reset_generation(self) -> None:
        """As aiokafka: before the revoke callback of the rejoin."""
        self.generation = -1
        self.member_id = ""

    async def _revoke(self) -> None:
        """Before a join: no more records, then the revoke callback, heartbeating on
        through it (aiokafka keeps its heartbeat task running there)."""
        assert self.group_id is not None
        self._rebalancing = True
        self._assigned.clear()
        self._revoked = True
        if self._listener is None:
            return
        beating = asyncio.get_running_loop().create_task(self._heartbeat_while_revoking())
        try:
            await self._listener.on_partitions_revoked(set(self._assignment))
        finally:
            beating.cancel()

    async def _heartbeat_while_revoking(self) -> None:
        assert self.group_id is not None
        while self.member_id:
            await asyncio.sleep(self._heartbeat_interval_s)
            answer = self._broker.heartbeat(self.group_id, self.member_id, self.generation)
            if answer == "unknown":  # dropped meanwhile: aiokafka forgets its membership
                self._reset_generation()

    async def _join(self) -> None:
        assert self.group_id is not None
        if not self._revoked:
            await self._revoke()
        while True:
            try:
                generation, member_id, assignment = await self._broker.join(
                    self.group_id, self.member_id, self
                )
            except UnknownMemberIdError:
                self._reset_generation()
                continue
            except asyncio.CancelledError:
                if self._closed:
                    raise
                # Removed from the group while waiting (it left, or was evicted).
                self._reset_generation()
                continue
            break
        self.generation, self.member_id = generation, member_id
        self._assignment = set(assignment)
        group = self._broker.group(self.group_id)
        for tp in self._assignment:
            point = group.committed.get(tp)
            self._positions[tp] = point[0] if point else self._broker.partition(tp).log_start
        self._paused &= self._assignment
        self._rejoin.clear()
        self._revoked = False
        self._rebalancing = False
        self._assigned.set()
        if self._listener is not None:
            await self._listener.on_partitions_assigned(set(self._assignment))

    # -- reading ------------------------------------------------------------------------

    async def getmany(
        self, *partitions: TopicPartition, timeout_ms: int = 0, max_records: int | None = None
    ) -> Mapping[TopicPartition, Sequence[Record]]:
        self._fetching += 1
        try:
            return await self._getmany(partitions, timeout_ms, max_records)
        finally:
            self._fetching -= 1
            self._last_poll = self._broker.loop.time()

    async def _getmany(
        self, partitions: tuple[TopicPartition, ...], timeout_ms: int, max_records: int | None
    ) -> Mapping[TopicPartition, Sequence[Record]]:
        self._last_poll = self._broker.loop.time()
        self._polled.set()
        if self._rebalancing:
            await self._assigned.wait()
            self._last_poll = self._broker.loop.time()
        deadline = self._broker.loop.time() + timeout_ms / 1000
        while True:
            if self._rebalancing:
                # As aiokafka's fetcher, at every wake-up: no records of an assignment
                # being revoked; the new one's, once it is assigned. Its timeout counts
                # from after that wait.
                waited_from = self._broker.loop.time()
                await self._assigned.wait()
                deadline += self._broker.loop.time() - waited_from
            fetched = self._fetch(partitions, max_records)
            if fetched or self._broker.loop.time() >= deadline or self._closed:
                self._last_poll = self._broker.loop.time()
                return fetched
            waiter = self._broker.waiter()
            try:
                # At the deadline itself: a delay from now, summed back in floats, may
                # end a hair before it, and the wait would begin again, for ever.
                async with asyncio.timeout_at(deadline):
                    await waiter
            except TimeoutError:
                # aiokafka returns nothing at its timeout, rebalance or not.
                self._last_poll = self._broker.loop.time()
                return {}

    def _fetch(
        self, partitions: Collection[TopicPartition], max_records: int | None
    ) -> dict[TopicPartition, list[Record]]:
        wanted = set(partitions) or self._assignment
        left = max_records if max_records is not None else 1 << 30
        fetched: dict[TopicPartition, list[Record]] = {}
        for tp in sorted(wanted & self._assignment - self._paused):
            if left <= 0:
                break
            part = self._broker.partition(tp)
            position = max(self._positions.get(tp, part.log_start), part.log_start)
            end = part.last_stable_offset if self._read_committed else part.high_watermark
            self._highwater[tp] = part.high_watermark
            records: list[Record] = []
            index = part.index_of(position)
            limit = min(left, self._fetch_records)
            while index < len(part.entries) and part.entries[index].offset < end:
                entry = part.entries[index]
                if len(records) >= limit:
                    break
                if entry.visible or (not self._read_committed and not entry.control):
                    records.append(
                        Record(
                            tp.topic,
                            tp.partition,
                            entry.offset,
                            entry.key,
                            entry.value,
                            tuple(entry.headers),
                        )
                    )
                position = entry.offset + 1
                index += 1
            else:
                # Everything below the end was scanned: markers, aborted records and
                # compaction's gaps are stepped over, up to the last stable offset.
                position = max(position, end)
            self._positions[tp] = position
            if records:
                fetched[tp] = records
                left -= len(records)
        return fetched

    def assignment(self) -> set[TopicPartition]:
        return set(self._assignment)

    def highwater(self, partition: TopicPartition) -> int | None:
        return self._highwater.get(partition)

    async def position(self, partition: TopicPartition) -> int:
        if partition not in self._assignment:
            raise IllegalStateError(f"{partition} is not assigned")
        return self._positions[partition]

    def pause(self, *partitions: TopicPartition) -> None:
        self._paused |= set(partitions) & self._assignment

    def resume(self, *partitions: TopicPartition) -> None:
        self._paused -= set(partitions)

    def seek(self, partition: TopicPartition, offset: int) -> None:
        if partition not in self._assignment:
            raise IllegalStateError(f"{partition} is not assigned")
        self._positions[partition] = offset

    async def seek_to_beginning(self, *partitions: TopicPartition) -> bool:
        for tp in partitions or tuple(self._assignment):
            self._positions[tp] = self._broker.partition(tp).log_start
        return True

    async def end_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        """ListOffsets at the consumer's isolation level: read_committed, the last stable
        offset."""
        ends: dict[TopicPartition, int] = {}
        for tp in partitions:
            part = self._broker.partition(tp)
            ends[tp] = part.last_stable_offset if self._read_committed else part.high_watermark
        return ends

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        if topic not in self._broker.topics:
            return None
        return set(range(len(self._broker.topics[topic].partitions)))


class SimAdmin:
    """The admin client, as the relay uses it: committed offsets and a metadata probe."""

    def __init__(self, broker: Broker) -> None:
        self._broker = broker

    async def list_consumer_group_offsets(
        self, group_id: str, group_coordinator_id: int | None = None, partitions: Any = None
    ) -> dict[TopicPartition, OffsetAndMetadata | None]:
        committed = self._broker.group(group_id).committed
        result: dict[TopicPartition, OffsetAndMetadata | None] = {}
        for tp in partitions or []:
            point = committed.get(tp)
            # Never committed: the broker answers offset -1 (aiokafka passes it on).
            result[tp] = OffsetAndMetadata(*point) if point else OffsetAndMetadata(-1, "")
        return result

    async def list_topics(self) -> list[str]:
        return sorted(self._broker.topics)
