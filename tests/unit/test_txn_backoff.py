"""AddOffsetsToTxn retried after 20 ms while the last transaction's markers are written
(service/txn_backoff.py): what it changes, and what of aiokafka it relies on."""

from __future__ import annotations

import inspect
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import ConcurrentTransactions, CoordinatorLoadInProgressError, NoError
from aiokafka.producer.sender import AddOffsetsToTxnHandler, Sender

from service import txn_backoff


def _handler() -> txn_backoff.QuickRetryAddOffsetsHandler:
    sender = SimpleNamespace(
        _retry_backoff=0.1,
        _txn_manager=SimpleNamespace(consumer_group_added=lambda _group: None),
        _coordinator_dead=lambda _kind: None,
    )
    return txn_backoff.QuickRetryAddOffsetsHandler(sender, "group")


def test_concurrent_transactions_is_retried_after_20_ms_not_the_producer_backoff() -> None:
    answer = SimpleNamespace(error_code=ConcurrentTransactions.errno)
    assert AddOffsetsToTxnHandler.handle_response(_handler(), answer) == 0.1, (
        "aiokafka now retries this answer sooner itself: the patch can go"
    )
    assert _handler().handle_response(answer) == pytest.approx(0.02)


@pytest.mark.parametrize("error", [CoordinatorLoadInProgressError, NoError])
def test_every_other_answer_is_handled_as_aiokafka_does(error: Any) -> None:
    answer = SimpleNamespace(error_code=error.errno)
    assert _handler().handle_response(answer) == AddOffsetsToTxnHandler.handle_response(
        _handler(), answer
    )


async def test_install_replaces_the_sender_s_method_that_aiokafka_still_has() -> None:
    assert "group_id" in inspect.signature(Sender._do_add_offsets_to_txn).parameters
    producer = AIOKafkaProducer(bootstrap_servers="127.0.0.1:9", transactional_id="t")
    try:
        txn_backoff.install(producer)
        method = producer._sender._do_add_offsets_to_txn
        assert method.__func__ is txn_backoff._do_add_offsets_to_txn
    finally:
        await producer.stop()
