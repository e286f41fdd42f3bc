"""The relay's configuration: the sections of the settings its stages take, whole.

`RelayConfig.of(settings)` builds it; the composition root (service/app.py) then fits
its byte bounds to the topics' limits.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from service.core.contract_limits import ContractLimits
from service.settings import (
    ApiSettings,
    BatchingSettings,
    KafkaSettings,
    Settings,
    TrackingSettings,
)

# The wall clock the relay reads: the system's, or in the deterministic simulation
# (sim) each replica's own, drifting one. A context variable, so that several
# replicas in one process each read their own.
WALL_CLOCK: Final[ContextVar[Callable[[], float]]] = ContextVar(
    "scm_relay_wall_clock", default=time.time
)


@dataclass(frozen=True)
class RelayConfig:
    """The sections of the settings the relay's stages take, whole, and what the relay
    derives from them: `of(settings)` in production, sections of their own in tests."""

    # Topics and the consumer group.
    kafka: KafkaSettings
    # Request timeout, list lag, status chunk and backoff of the API the relay calls.
    api: ApiSettings
    batching: BatchingSettings
    tracking: TrackingSettings
    limits: ContractLimits
    # How long uploads already sent get to finish at shutdown: the API request timeout.
    upload_grace_s: float
    # After an ambiguous upload, how long until the original request can no longer
    # create a task: the API request timeout (see service/relay/reconcile.py).
    reconcile_after_s: float
    # An intent allows its writer to send the upload this long after it is committed
    # (then it is renewed); another process may resolve it once `send_by` is this far
    # behind: the request timeout, once more for a request the API still processes,
    # and a margin for the clocks of two machines (docs/design.md section 11).
    intent_send_window_s: float = 10.0
    intent_clock_margin_s: float = 5.0

    # Bounds that keep every record under the topics' max.message.bytes (read at start).
    dead_letter_max_bytes: int = 512 * 1024
    dead_letter_prefix_bytes: int = 64 * 1024

    @classmethod
    def of(cls, settings: Settings) -> RelayConfig:
        """The relay's sections of the settings."""
        return cls(
            kafka=settings.kafka,
            api=settings.api,
            batching=settings.batching,
            tracking=settings.tracking,
            limits=settings.limits,
            upload_grace_s=settings.api.request_timeout_s,
            reconcile_after_s=settings.api.request_timeout_s,
        )

    @property
    def batch_linger_s(self) -> float:
        """How long the oldest event of a batch waits before the batch is sent."""
        return self.batching.batch_linger_ms / 1000

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
