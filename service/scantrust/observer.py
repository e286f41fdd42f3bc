"""What the API client reports for metrics, as a Protocol the composition root fills
with its Prometheus implementation."""

from __future__ import annotations

from typing import Protocol

from service.core.clock_offset import Offset
from service.core.resilience import BreakerState


class ApiObserver(Protocol):
    """Hooks for metrics; the composition root passes the Prometheus implementation."""

    def request_finished(self, endpoint: str, status_class: str, duration_s: float) -> None:
        """One HTTP exchange ended; `status_class` is 2xx..5xx or `error` (no response)."""

    def retry_scheduled(self, endpoint: str, outcome: str, wait_s: float) -> None:
        """A call will be retried after `wait_s`."""

    def throttled(self, endpoint: str) -> None:
        """The API answered 429."""

    def ambiguous(self, endpoint: str) -> None:
        """A request was sent and its fate is unknown."""

    def breaker_changed(self, state: BreakerState) -> None:
        """The circuit breaker changed state."""

    def clock_offset(self, offset: Offset) -> None:
        """An answer's `Date` header gave this host's clock offset against the API's."""


class NullObserver:
    """Observes nothing (tools and tests that do not count)."""

    def request_finished(self, endpoint: str, status_class: str, duration_s: float) -> None:
        """Ignore."""

    def retry_scheduled(self, endpoint: str, outcome: str, wait_s: float) -> None:
        """Ignore."""

    def throttled(self, endpoint: str) -> None:
        """Ignore."""

    def ambiguous(self, endpoint: str) -> None:
        """Ignore."""

    def breaker_changed(self, state: BreakerState) -> None:
        """Ignore."""

    def clock_offset(self, offset: Offset) -> None:
        """Ignore."""
