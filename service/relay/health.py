"""What the relay knows of the API's health: written by the stages that call it, read
by intake (to pause) and by readiness.

A small shared board rather than a message: the stages only set and read two
facts, and whoever reads them wants the latest value, not a history.
"""

from __future__ import annotations

import structlog

from service.scantrust.outcomes import AuthFailed

log = structlog.get_logger(__name__)


class ApiHealth:
    """Authentication refused (stop intake until fixed) and uploads failing (pause)."""

    def __init__(self) -> None:
        self.auth_failed: AuthFailed | None = None
        self.degraded = False

    def auth_refused(self, outcome: AuthFailed) -> None:
        """The API refused the token: logged once, loudly."""
        if self.auth_failed is None:
            log.error(
                "api_auth_failed_intake_stopped",
                status=outcome.status,
                hint="the API token (SCM_RELAY_API_TOKEN) is missing, wrong or lacks "
                "permissions; fix it and restart: no event is lost or dead-lettered",
            )
        self.auth_failed = outcome

    def upload_failed(self) -> None:
        """An upload could not get through (outage, throttling, an answer lost)."""
        self.degraded = True

    def upload_accepted(self) -> None:
        """An upload got through."""
        self.degraded = False
