"""The client's retries of reads on their own, against scripted attempts: a throttled
read waits exactly what the API asked, a refusal is never retried, and the budget
ends the loop before a wait would pass it."""

from __future__ import annotations

import random

from structlog.testing import capture_logs

from service.core.resilience import Backoff
from service.scantrust.exchange import ApiCall, ApiResponse
from service.scantrust.observer import NullObserver
from service.scantrust.outcomes import AuthFailed, Failure, Throttled, Unavailable
from service.scantrust.read_retries import ReadRetries

CALL = ApiCall("task", "GET", "https://api.example/api/v2/scm/tasks/t1/")


class Waits(NullObserver):
    """The retries the loop scheduled."""

    def __init__(self) -> None:
        self.scheduled: list[tuple[str, str, float]] = []

    def retry_scheduled(self, endpoint: str, outcome: str, wait_s: float) -> None:
        self.scheduled.append((endpoint, outcome, wait_s))


def retries(
    answers: list[ApiResponse | Failure], observer: Waits, budget_s: float = 60.0
) -> tuple[ReadRetries, list[ApiCall]]:
    attempted: list[ApiCall] = []

    async def attempt(call: ApiCall) -> ApiResponse | Failure:
        attempted.append(call)
        return answers.pop(0)

    reads = ReadRetries(
        attempt,
        Backoff(0.01, 0.02),
        random.Random(7),
        observer,
        budget_s=budget_s,
        now=lambda: 0.0,  # the budget's clock stands still: only the waits count
    )
    return reads, attempted


async def test_a_throttled_read_waits_what_the_api_asked_then_succeeds() -> None:
    observer = Waits()
    answer = ApiResponse(200, '{"id": "t1"}', None)
    reads, attempted = retries([Throttled(0.05, "slow down"), answer], observer)
    with capture_logs() as logs:
        assert await reads.call(CALL) == answer
    assert attempted == [CALL, CALL]
    assert observer.scheduled == [("task", "Throttled", 0.05)]
    assert [line["event"] for line in logs] == ["api_retry"]


async def test_a_refused_read_is_returned_at_once() -> None:
    observer = Waits()
    refused = AuthFailed(401, "bad token")
    reads, attempted = retries([refused], observer)
    assert await reads.call(CALL) == refused
    assert len(attempted) == 1
    assert observer.scheduled == []


async def test_a_wait_past_the_budget_ends_the_retries_with_the_last_failure() -> None:
    observer = Waits()
    outage = Unavailable("HTTP 503", status=503, retry_after_s=5.0)
    reads, attempted = retries([outage], observer, budget_s=1.0)
    with capture_logs() as logs:
        assert await reads.call(CALL) == outage
    assert len(attempted) == 1
    assert observer.scheduled == []
    (line,) = logs
    assert (line["event"], line["attempts"]) == ("api_retries_exhausted", 1)
