"""Ownership tokens of the input partitions (service/relay/ownership.py): a batch is
this intake's only while every partition it was handed on under keeps its token."""

from __future__ import annotations

from service.relay.ownership import PartitionOwnership
from tests.unit.relay.support import batch


def test_a_partition_kept_into_the_next_generation_keeps_its_batches() -> None:
    ownership = PartitionOwnership()
    ownership.assigned({("in", 0)}, 1)
    sent = batch(["a"])
    ownership.handed_on(sent)
    token = ownership.token("in", 0)
    ownership.revoked()
    ownership.assigned({("in", 0)}, 2)
    assert ownership.token("in", 0) == token
    assert ownership.owns(sent)


def test_a_partition_back_after_a_missed_generation_is_a_new_ownership() -> None:
    ownership = PartitionOwnership()
    ownership.assigned({("in", 0)}, 1)
    sent = batch(["a"])
    ownership.handed_on(sent)
    token = ownership.token("in", 0)
    ownership.assigned({("in", 0)}, 3)  # another member may have owned it in generation 2
    assert ownership.token("in", 0) not in (None, token)
    assert not ownership.owns(sent)
    assert not ownership.owns_partition("in", 0, token)
    assert ownership.owns_partition("in", 0)


def test_without_a_group_generation_every_partition_keeps_its_token() -> None:
    ownership = PartitionOwnership()
    ownership.assigned({("in", 0)}, None)
    token = ownership.token("in", 0)
    ownership.assigned({("in", 0), ("in", 1)}, None)
    assert ownership.token("in", 0) == token
    assert ownership.token("in", 1) not in (None, token)


def test_between_a_revoke_and_the_next_assignment_nothing_is_owned() -> None:
    ownership = PartitionOwnership()
    ownership.assigned({("in", 0)}, 1)
    sent = batch(["a"])
    ownership.handed_on(sent)
    ownership.revoked()
    assert ownership.between_assignments
    assert ownership.token("in", 0) is None
    assert not ownership.owns_partition("in", 0)
    assert not ownership.owns(sent)


def test_a_batch_let_go_or_never_handed_on_is_not_owned() -> None:
    ownership = PartitionOwnership()
    ownership.assigned({("in", 0)}, 1)
    sent = batch(["a"])
    assert not ownership.owns(sent), "never handed on"
    ownership.handed_on(sent)
    ownership.let_go(sent.batch_id)
    assert not ownership.owns(sent)


def test_a_batch_over_a_partition_not_owned_is_not_this_intakes() -> None:
    ownership = PartitionOwnership()
    ownership.assigned({("in", 1)}, 1)
    sent = batch(["a"])  # its event is in partition 0
    ownership.handed_on(sent)
    assert not ownership.owns(sent)
