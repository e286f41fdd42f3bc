"""What the relay knows of the API's health: written by the stages that call it, read
by intake (to pause) and by readiness.

A small shared board rather than a message: the stages only set and read a few
facts, and whoever reads them wants the latest value, not a history.
"""

from __future__ import annotations

import structlog

from service.metrics import RelayMetrics
from service.scantrust.outcomes import AuthFailed, Misconfigured, Refused

log = structlog.get_logger(__name__)

HINTS = {
    AuthFailed: "the API token (SCM_RELAY_API_TOKEN or SCM_RELAY_API_TOKEN_FILE) is missing, "
    "wrong or lacks permissions",
    Misconfigured: "the API answers as if SCM_RELAY_API_BASE_URL were wrong (host or path), "
    "or a proxy in front of it refuses the relay",
}


class ApiHealth:
    """Refusals of the relay by the API (per kind of call: `upload`, `status`, `me`),
    uploads failing, and whether the start-up check has answered."""

    def __init__(self, metrics: RelayMetrics | None = None) -> None:
        self._metrics = metrics
        self._refusals: dict[str, Refused] = {}
        self.degraded = False
        self.checked = False

    @property
    def refusal(self) -> Refused | None:
        """Why the API refuses the relay, if it does (a refused token first)."""
        refusals = sorted(self._refusals.values(), key=lambda r: not isinstance(r, AuthFailed))
        return refusals[0] if refusals else None

    @property
    def auth_failed(self) -> AuthFailed | None:
        """The API refuses the relay's token."""
        return next((r for r in self._refusals.values() if isinstance(r, AuthFailed)), None)

    @property
    def misconfigured(self) -> Misconfigured | None:
        """The API answers as if the relay's base URL were wrong."""
        return next((r for r in self._refusals.values() if isinstance(r, Misconfigured)), None)

    def refused(self, call: str, outcome: Refused) -> None:
        """The API refused a call of this kind: logged once, loudly; intake stops."""
        if call not in self._refusals:
            log.error(
                "api_auth_failed_intake_stopped"
                if isinstance(outcome, AuthFailed)
                else "api_misconfigured_intake_stopped",
                call=call,
                status=outcome.status,
                hint=f"{HINTS[type(outcome)]}; fix it: the relay probes again with backoff and "
                "resumes by itself; no event is lost or dead-lettered",
            )
        self._refusals[call] = outcome
        self.checked = True
        self._show()

    def accepted(self, call: str) -> None:
        """A call of this kind went through: a refusal of it is over."""
        self.checked = True
        if self._refusals.pop(call, None) is not None:
            log.info("api_accepts_the_relay_again", call=call)
            self._show()

    def _show(self) -> None:
        """The gauges an alert fires on follow at once, not at the next heartbeat."""
        if self._metrics is not None:
            self._metrics.api_auth_failed.set(1 if self.auth_failed is not None else 0)
            self._metrics.api_misconfigured.set(1 if self.misconfigured is not None else 0)
            if self.refusal is not None:
                self._metrics.ready.set(0)

    def upload_failed(self) -> None:
        """An upload could not get through (outage, throttling, an answer lost)."""
        self.degraded = True

    def upload_accepted(self) -> None:
        """An upload got through."""
        self.degraded = False
        self.accepted("upload")

    def upload_given_up(self) -> None:
        """An upload that had failed was given up (its partitions moved): it no longer
        waits on the API, so it holds intake no more; the next upload that fails says
        again if the API is down."""
        self.degraded = False
