"""Back-to-back transactions without aiokafka's 100 ms pause between them.

Right after a transaction commits, the broker is still writing its markers, and the
next transaction's first request to the coordinator is answered CONCURRENT_TRANSACTIONS
until they are written (a few milliseconds). aiokafka, like Kafka's Java client
(KAFKA-5477), retries the first AddPartitionsToTxn after 20 ms, but its
AddOffsetsToTxn waits the producer's whole `retry_backoff_ms` (100 ms). The relay's
transactions often carry offsets only (a flush, the poller's fenced results), so
about one in ten waited those 100 ms, and every intent queued behind it: the p99 of
an upload's latency (docs/benchmarks.md, figure 5).

`install` gives AddOffsetsToTxn the same 20 ms retry for that one answer, as aiokafka
does for AddPartitionsToTxn. Every other retry keeps the producer's backoff, which
bounds the requests a broker outage draws. aiokafka has no setting for it, so one
method of the producer's sender (a private attribute, as in `service/fencing.py`) is
replaced; `tests/unit/test_txn_backoff.py` fails if an upgrade changes what it relies on.
"""

from __future__ import annotations

import types
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.client import CoordinationType
from aiokafka.errors import ConcurrentTransactions, for_code
from aiokafka.producer.sender import BACKOFF_OVERRIDE, AddOffsetsToTxnHandler, Sender


class QuickRetryAddOffsetsHandler(AddOffsetsToTxnHandler):  # type: ignore[misc]
    """AddOffsetsToTxn, retried after 20 ms while the last transaction's markers are
    being written."""

    def handle_response(self, resp: Any) -> float | None:
        backoff: float | None = super().handle_response(resp)
        if backoff is not None and for_code(resp.error_code) is ConcurrentTransactions:
            return float(BACKOFF_OVERRIDE)
        return backoff


async def _do_add_offsets_to_txn(self: Sender, group_id: str) -> bool:
    # aiokafka's own method, with the handler above.
    node_id = await self._find_coordinator(
        CoordinationType.TRANSACTION, self._txn_manager.transactional_id
    )
    done: bool = await QuickRetryAddOffsetsHandler(self, group_id).do(node_id)
    return done


def install(producer: AIOKafkaProducer) -> None:
    """Make `producer` retry AddOffsetsToTxn after 20 ms on CONCURRENT_TRANSACTIONS."""
    sender = producer._sender
    sender._do_add_offsets_to_txn = types.MethodType(_do_add_offsets_to_txn, sender)
