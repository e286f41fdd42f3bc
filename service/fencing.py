"""Transactional offset commits that a stale group member cannot make (KIP-447).

aiokafka 0.14 sends TxnOffsetCommit version 0, which carries no consumer-group
generation: a replica that was paused while the group gave its partitions to
another still commits offsets (and, in the same transaction, ledger records,
results and dead letters) when it resumes. Version 3 of the request carries the
member id and the generation the member joined with; the group coordinator
refuses a stale one (ILLEGAL_GENERATION, UNKNOWN_MEMBER_ID, FENCED_INSTANCE_ID)
and the transaction can then only be aborted. This is what Kafka's Java client
does since 2.5 (`sendOffsetsToTransaction(offsets, consumer.groupMetadata())`).

aiokafka has the flexible-version types but no hook for this request, so
`install` replaces one method of the producer's sender (a private attribute:
the versions in requirements/ are pinned, and tests/integration/test_fencing.py
fails if an upgrade changes it). Offsets given with a plain group id are sent as
before; offsets given with a `GroupGeneration` go out as version 3 whenever the
broker supports it (Kafka 2.5 and later).
"""

from __future__ import annotations

import collections
import types
from typing import Any, Final

import aiokafka.errors as kafka_errors
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.client import CoordinationType
from aiokafka.producer.sender import Sender, TxnOffsetCommitHandler
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.transaction import TxnOffsetCommitRequest_v0
from aiokafka.protocol.types import (
    CompactArray,
    CompactString,
    Int16,
    Int32,
    Int64,
    Schema,
    TaggedFields,
)
from aiokafka.structs import OffsetAndMetadata

# Answers meaning: this member no longer owns what it is committing.
STALE_MEMBER: Final = (
    kafka_errors.IllegalGenerationError,
    kafka_errors.UnknownMemberIdError,
    getattr(kafka_errors, "FencedInstanceIdError", kafka_errors.UnknownMemberIdError),
)


class GroupFencedError(kafka_errors.KafkaError):  # type: ignore[misc]
    """The group coordinator refused the commit: a newer generation owns the partitions.

    The transaction must be aborted; nothing in it happened."""


class GroupGeneration(str):
    """A consumer group id together with the membership a commit is made under."""

    generation_id: int
    member_id: str
    group_instance_id: str | None

    def __new__(
        cls, group_id: str, generation_id: int, member_id: str, group_instance_id: str | None
    ) -> GroupGeneration:
        value = super().__new__(cls, group_id)
        value.generation_id = generation_id
        value.member_id = member_id
        value.group_instance_id = group_instance_id
        return value


def membership(consumer: AIOKafkaConsumer, group_id: str) -> GroupGeneration:
    """The generation and member id `consumer` last joined its group with (-1 and "" before
    it joined, and after aiokafka reset them because the group no longer knew the member:
    `_do_txn_offset_commit` refuses to commit under those)."""
    coordinator = consumer._coordinator
    if coordinator is None or not hasattr(coordinator, "generation"):
        return GroupGeneration(group_id, -1, "", None)
    return GroupGeneration(
        group_id,
        coordinator.generation,
        coordinator.member_id,
        getattr(coordinator, "_group_instance_id", None),
    )


class TxnOffsetCommitResponse_v3(Response):  # type: ignore[misc]
    API_KEY = 28
    API_VERSION = 3
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "topics",
            CompactArray(
                ("name", CompactString("utf-8")),
                (
                    "partitions",
                    CompactArray(
                        ("partition_index", Int32),
                        ("error_code", Int16),
                        ("tags", TaggedFields),
                    ),
                ),
                ("tags", TaggedFields),
            ),
        ),
        ("tags", TaggedFields),
    )


class TxnOffsetCommitRequest_v3(RequestStruct):  # type: ignore[misc]
    FLEXIBLE_VERSION = True
    API_KEY = 28
    API_VERSION = 3
    RESPONSE_TYPE = TxnOffsetCommitResponse_v3
    SCHEMA = Schema(
        ("transactional_id", CompactString("utf-8")),
        ("group_id", CompactString("utf-8")),
        ("producer_id", Int64),
        ("producer_epoch", Int16),
        ("generation_id", Int32),
        ("member_id", CompactString("utf-8")),
        ("group_instance_id", CompactString("utf-8")),
        (
            "topics",
            CompactArray(
                ("name", CompactString("utf-8")),
                (
                    "partitions",
                    CompactArray(
                        ("partition_index", Int32),
                        ("committed_offset", Int64),
                        ("committed_leader_epoch", Int32),
                        ("committed_metadata", CompactString("utf-8")),
                        ("tags", TaggedFields),
                    ),
                ),
                ("tags", TaggedFields),
            ),
        ),
        ("tags", TaggedFields),
    )


class FencedTxnOffsetCommitRequest(
    Request[TxnOffsetCommitRequest_v0 | TxnOffsetCommitRequest_v3]  # type: ignore[misc]
):
    """TxnOffsetCommit at the highest of versions 0 and 3 the broker supports."""

    API_KEY = 28

    def __init__(
        self,
        transactional_id: str,
        group: GroupGeneration,
        producer_id: int,
        producer_epoch: int,
        offsets: dict[TopicPartition, OffsetAndMetadata],
    ) -> None:
        self._transactional_id = transactional_id
        self._group = group
        self._producer_id = producer_id
        self._producer_epoch = producer_epoch
        self._offsets = offsets

    def build(self, request_struct_class: type[Any]) -> Any:
        by_topic: dict[str, list[tuple[int, OffsetAndMetadata]]] = collections.defaultdict(list)
        for tp, offset in sorted(self._offsets.items()):
            by_topic[tp.topic].append((tp.partition, offset))
        group = self._group
        if request_struct_class is TxnOffsetCommitRequest_v0:
            return TxnOffsetCommitRequest_v0(
                self._transactional_id,
                str(group),
                self._producer_id,
                self._producer_epoch,
                [
                    (topic, [(p, o.offset, o.metadata) for p, o in parts])
                    for topic, parts in by_topic.items()
                ],
            )
        return TxnOffsetCommitRequest_v3(
            self._transactional_id,
            str(group),
            self._producer_id,
            self._producer_epoch,
            group.generation_id,
            group.member_id,
            group.group_instance_id,
            [
                (topic, [(p, o.offset, -1, o.metadata, {}) for p, o in parts], {})
                for topic, parts in by_topic.items()
            ],
            {},
        )


class FencedTxnOffsetCommitHandler(TxnOffsetCommitHandler):  # type: ignore[misc]
    """aiokafka's handler, sending version 3 and turning a stale membership into an
    abortable transaction error."""

    def create_request(self) -> FencedTxnOffsetCommitRequest:
        txn_manager = self._sender._txn_manager
        return FencedTxnOffsetCommitRequest(
            txn_manager.transactional_id,
            self._group_id,
            txn_manager.producer_id,
            txn_manager.producer_epoch,
            self._offsets,
        )

    def handle_response(self, resp: Any) -> float | None:
        if isinstance(resp, TxnOffsetCommitResponse_v3):
            for _topic, partitions, _tags in resp.topics:
                for _partition, error_code, _ptags in partitions:
                    if kafka_errors.for_code(error_code) in STALE_MEMBER:
                        self._fail_transaction(kafka_errors.for_code(error_code).__name__)
                        return None
            resp.errors = [
                (topic, [(p, code) for p, code, _ in partitions])
                for topic, partitions, _ in resp.topics
            ]
        return super().handle_response(resp)  # type: ignore[no-any-return]

    def _fail_transaction(self, error: str) -> None:
        group = self._group_id
        abortable(
            self._sender._txn_manager,
            GroupFencedError(
                f"group {group!s} refused generation {group.generation_id} "
                f"of member {group.member_id or '(none)'}: {error}"
            ),
        )


def abortable(txn_manager: Any, exc: Exception) -> None:
    """Make the transaction abortable only, with `exc` as its error. aiokafka's
    `error_transaction` also forgets the partitions the transaction wrote to, after which
    `abort_transaction` believes it empty and sends no EndTxn: the broker would keep the
    transaction open and commit its records with the next one. They are put back so that
    the abort reaches the broker."""
    partitions = set(txn_manager._txn_partitions)
    consumer_group = txn_manager._txn_consumer_group
    txn_manager.error_transaction(exc)
    txn_manager._txn_partitions |= partitions
    txn_manager._txn_consumer_group = consumer_group


async def _do_txn_offset_commit(self: Sender, offsets: Any, group_id: str) -> None:
    """`Sender._do_txn_offset_commit`, with the fenced handler for a `GroupGeneration`."""
    if not offsets:
        return
    if not isinstance(group_id, GroupGeneration):
        await Sender._do_txn_offset_commit(self, offsets, group_id)
        return
    if group_id.generation_id < 0 or not group_id.member_id:
        # The broker accepts a transactional commit with no generation unchecked (the
        # compatibility rule for clients before KIP-447): a member the group dropped (aiokafka
        # reset its generation) would commit unfenced. Not a member now: fenced.
        abortable(
            self._txn_manager,
            GroupFencedError(
                f"not a member of group {group_id!s} (generation {group_id.generation_id}): "
                "the group dropped this member, its offsets are no longer its to commit"
            ),
        )
        return
    try:
        node_id = await self._find_coordinator(CoordinationType.GROUP, group_id)
    except kafka_errors.GroupAuthorizationFailedError as exc:
        abortable(self._txn_manager, exc)
        return
    await FencedTxnOffsetCommitHandler(self, offsets, group_id).do(node_id)


def install(producer: AIOKafkaProducer) -> None:
    """Make `producer` send offsets given with a `GroupGeneration` as fenced commits."""
    sender = producer._sender
    sender._do_txn_offset_commit = types.MethodType(_do_txn_offset_commit, sender)
