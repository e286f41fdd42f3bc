"""The relay's configuration: what its stages need from the settings, and nothing else.

Built from the settings in one place, the composition root (service/app.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from service.core.contract_limits import ContractLimits

# The wall clock the relay reads: the system's, or in the deterministic simulation
# (tests/sim) each replica's own, drifting one. A context variable, so that several
# replicas in one process each read their own.
WALL_CLOCK: Final[ContextVar[Callable[[], float]]] = ContextVar(
    "scm_relay_wall_clock", default=time.time
)


@dataclass(frozen=True)
class RelayConfig:
    """Topics, bounds, timeouts and polling of the relay's stages."""

    input_topic: str
    results_topic: str
    dlq_topic: str
    tasks_topic: str
    group_id: str
    limits: ContractLimits
    batch_max_values: int = 1000
    batch_max_bytes: int = 256 * 1024
    batch_max_keys: int = 1
    batch_linger_s: float = 1.0
    max_in_flight_requests: int = 4
    max_open_batches: int = 1000
    max_buffered_values: int = 200_000
    max_read_ahead: int = 50_000
    max_unfinished_tasks: int = 200
    shutdown_timeout_s: float = 30.0
    upload_grace_s: float = 30.0
    rebalance_timeout_s: float = 20.0
    poll_initial_s: float = 1.0
    poll_factor: float = 1.5
    poll_max_s: float = 30.0
    task_stuck_after_s: float = 900.0
    status_chunk_size: int = 100
    retry_initial_s: float = 0.5
    retry_max_backoff_s: float = 30.0
    # After an ambiguous upload, how long until the original request can no longer
    # create a task: the API request timeout (see service/relay/reconcile.py).
    reconcile_after_s: float = 30.0
    # How long a new task may take to show in the API's task list (an assumption: the
    # vendor does not say): a lookup that found none looks again after it.
    list_lag_s: float = 5.0
    # An intent allows its writer to send the upload this long after it is committed
    # (then it is renewed); another process may resolve it once `send_by` is this far
    # behind: the request timeout, once more for a request the API still processes,
    # and a margin for the clocks of two machines (docs/design.md section 11).
    intent_send_window_s: float = 10.0
    intent_clock_margin_s: float = 5.0

    # Bounds that keep every record under the topics' max.message.bytes (read at start).
    dead_letter_max_bytes: int = 512 * 1024
    dead_letter_prefix_bytes: int = 64 * 1024

    @property
    def intent_resolve_delay_s(self) -> float:
        """From an intent's `send_by` to when another process may resolve it."""
        return 2 * self.reconcile_after_s + self.intent_clock_margin_s


def wall_time() -> float:
    """The wall-clock time in seconds since the epoch (see WALL_CLOCK)."""
    return WALL_CLOCK.get()()


def utcnow() -> datetime:
    """The wall-clock time, timezone-aware (the times in ledger and result records)."""
    return datetime.fromtimestamp(wall_time(), UTC)
