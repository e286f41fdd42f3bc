"""The API client against the simulator over real loopback HTTP: one test per outcome
class and per fault knob, the rate limit, the circuit breaker and pagination."""

from __future__ import annotations

import asyncio
import socket

import pytest
from structlog.testing import capture_logs

from devkit.harness import wait_until
from devkit.simulator.state import Faults
from service.core.resilience import BreakerState
from service.scantrust.client import ScantrustClient, UploadRequest
from service.scantrust.outcomes import (
    Accepted,
    Ambiguous,
    ApiTask,
    ApiTaskGroup,
    AuthFailed,
    Rejected,
    TaskApiState,
    TaskPage,
    Throttled,
    Unavailable,
)
from tests.api_support import TOKEN, RecordingObserver, client, config, simulator

MARKET = UploadRequest(
    constraints={"extended_id": ["11X000001", "11X000002", "unknown-code"]},
    scm_data={"intended_market": "DE", "production_date": "2026-11-27"},
    campaign=11,
    reference="line-7",
)


def breaker_state(api: ScantrustClient) -> BreakerState:
    """Read through a call so the type checker does not pin it after an assert."""
    return api.breaker_state


async def finished(api: ScantrustClient, task_id: str) -> ApiTask:
    result: ApiTask | None = None

    async def done() -> bool:
        nonlocal result
        answer = await api.task(task_id)
        assert isinstance(answer, ApiTask), answer
        result = answer
        return answer.finished

    await wait_until(done, what=f"task {task_id} to finish", timeout_s=10.0, interval_s=0.02)
    assert result is not None
    return result


async def test_accepted_upload_becomes_a_completed_task_that_changed_the_codes() -> None:
    async with simulator() as sim, client(sim.base_url) as api:
        outcome = await api.upload(MARKET)
        assert isinstance(outcome, Accepted)
        task = await finished(api, outcome.task_id)
        assert task.state is TaskApiState.COMPLETE
        assert task.codes_affected == 2  # the unknown code matches nothing
        assert task.reference == "line-7"
        assert task.details == {"constraints": MARKET.constraints, "scm_data": MARKET.scm_data}
        status, code = await sim.get("/_sim/codes?extended_id=11X000001")
        assert status == 200
        assert code["scm_data"]["intended_market"] == "DE"
        assert [entry["task_id"] for entry in code["history"]] == [outcome.task_id]


async def test_rejected_upload_carries_the_error_body_by_field() -> None:
    bad = UploadRequest(constraints={"message": ["11X000001"]}, scm_data={"status": "1"})
    async with simulator() as sim, client(sim.base_url) as api:
        outcome = await api.upload(bad)
        assert isinstance(outcome, Rejected)
        assert outcome.status == 400
        assert outcome.errors == {
            "constraints": {"message": "Invalid constraint name, please use 'extended_id' instead"},
            "scm_data": {"status": "Invalid key name, use 'activation_status' instead"},
        }
        assert sim.account.stats.requests["upload"] == 1, "a 400 must not be retried"


async def test_wrong_token_is_an_auth_failure_never_retried() -> None:
    observer = RecordingObserver()
    async with simulator() as sim, client(sim.base_url, observer, token="wrong-token-xyz") as api:
        with capture_logs() as logs:
            outcome = await api.upload(MARKET)
        assert isinstance(outcome, AuthFailed)
        assert outcome.status == 401
        assert "Invalid token." in outcome.body
        assert sim.account.stats.requests["upload"] == 1
        assert observer.retries == {}
        assert "wrong-token-xyz" not in repr(logs)


async def test_forbidden_knob_is_an_auth_failure() -> None:
    async with simulator(Faults(forbidden=True)) as sim, client(sim.base_url) as api:
        outcome = await api.me()
        assert isinstance(outcome, AuthFailed)
        assert outcome.status == 403


async def test_throttle_storm_is_waited_out_using_the_seconds_in_the_body() -> None:
    observer = RecordingObserver()
    async with simulator() as sim, client(sim.base_url, observer, retry_max_elapsed_s=10) as api:
        await sim.set_faults(throttle_storm_s=1.2)
        outcome = await api.me()
        assert not isinstance(outcome, Throttled | Unavailable)
        # The body said "2 seconds" (1.2 rounded up): one wait covers the storm.
        assert observer.throttled_count == 1
        assert observer.retries == {"Throttled": 1}


async def test_an_upload_is_attempted_once_and_its_throttle_wait_handed_to_the_caller() -> None:
    # The uploaders own upload retries (docs/design.md, "Retries"): the client reports.
    observer = RecordingObserver()
    async with simulator() as sim, client(sim.base_url, observer, retry_max_elapsed_s=10) as api:
        await sim.set_faults(throttle_storm_s=1.2)
        outcome = await api.upload(MARKET)
        assert isinstance(outcome, Throttled)
        assert 1.0 <= outcome.retry_after_s <= 2.0
        assert observer.retries == {}
        assert sim.account.stats.requests["upload"] == 1


async def test_throttled_outcome_when_the_wait_exceeds_the_retry_budget() -> None:
    async with simulator() as sim, client(sim.base_url, retry_max_elapsed_s=0.5) as api:
        await sim.set_faults(throttle_storm_s=30, retry_after_header=True)
        outcome = await api.me()
        assert isinstance(outcome, Throttled)
        assert 25 <= outcome.retry_after_s <= 30  # from the Retry-After header
        assert sim.account.stats.requests["me"] == 1


async def test_a_throttle_wait_is_capped_by_the_setting() -> None:
    async with (
        simulator() as sim,
        client(sim.base_url, retry_max_elapsed_s=0.5, retry_after_max_s=60.0) as api,
    ):
        await sim.set_faults(throttle_storm_s=3600, retry_after_header=True)
        outcome = await api.upload(MARKET)
        assert isinstance(outcome, Throttled)
        assert outcome.retry_after_s == 60.0


async def test_server_errors_are_retried_then_reported_unavailable() -> None:
    observer = RecordingObserver()
    async with (
        simulator(Faults(error_rate=1.0)) as sim,
        client(sim.base_url, observer, retry_max_elapsed_s=0.3, breaker_failures=1000) as api,
    ):
        outcome = await api.me()
        assert isinstance(outcome, Unavailable)
        assert outcome.status == 503
        assert observer.retries["Unavailable"] >= 2
        assert sim.account.stats.requests["me"] == observer.retries["Unavailable"] + 1
        # An upload gets one attempt, whatever the budget, and a 5xx to it is ambiguous: a
        # gateway may fail after the task was created.
        upload = await api.upload(MARKET)
        assert isinstance(upload, Ambiguous)
        assert upload.status == 503
        assert observer.ambiguous_count == 1
        assert sim.account.stats.requests["upload"] == 1


async def test_error_rate_knob_is_survived_by_retries() -> None:
    async with (
        simulator(Faults(error_rate=0.5)) as sim,
        client(sim.base_url, retry_max_elapsed_s=10, breaker_failures=1000) as api,
    ):
        outcomes = [await api.me() for _ in range(10)]
        assert all(isinstance(o, dict) for o in outcomes)
        assert sim.account.stats.statuses["5xx"] > 0
        assert sim.account.stats.statuses["2xx"] == 10


async def test_connection_refused_is_unavailable() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    base_url = f"http://127.0.0.1:{port}"
    async with client(base_url, retry_max_elapsed_s=0.1, breaker_failures=1000) as api:
        outcome = await api.upload(MARKET)
    assert isinstance(outcome, Unavailable)
    assert outcome.reason.startswith("connect")


async def test_dropped_response_is_ambiguous_and_counted() -> None:
    observer = RecordingObserver()
    async with (
        simulator(Faults(drop_response_rate=1.0)) as sim,
        client(sim.base_url, observer, retry_max_elapsed_s=0.2, breaker_failures=1000) as api,
    ):
        outcome = await api.upload(MARKET)
        assert isinstance(outcome, Ambiguous)
        assert "connection lost" in outcome.reason
        # Each attempt was processed: the API has a task for every ambiguous answer.
        assert sim.account.stats.uploads_accepted == observer.ambiguous_count
        assert observer.ambiguous_count >= 1


async def test_latency_past_the_request_timeout_is_ambiguous() -> None:
    observer = RecordingObserver()
    async with (
        simulator(Faults(latency_s=1.0)) as sim,
        client(sim.base_url, observer, request_timeout_s=0.3, retry_max_elapsed_s=0.0) as api,
    ):
        outcome = await api.upload(MARKET)
        assert isinstance(outcome, Ambiguous)
        assert observer.ambiguous_count == 1


async def test_latency_within_the_timeout_is_just_slower() -> None:
    async with simulator(Faults(latency_s=0.2)) as sim, client(sim.base_url) as api:
        assert isinstance(await api.upload(MARKET), Accepted)


async def test_a_lost_read_answer_is_plain_unavailability() -> None:
    async with (
        simulator(Faults(latency_s=1.0)) as sim,
        client(sim.base_url, request_timeout_s=0.3, retry_max_elapsed_s=0.0) as api,
    ):
        assert isinstance(await api.me(), Unavailable)


async def test_fail_and_never_finish_knobs() -> None:
    async with simulator() as sim, client(sim.base_url) as api:
        await sim.set_faults(fail_rate=1.0)
        failing = await api.upload(MARKET)
        assert isinstance(failing, Accepted)
        assert (await finished(api, failing.task_id)).state is TaskApiState.FAILED
        await sim.set_faults(fail_rate=0.0, never_finish_rate=1.0)
        stuck = await api.upload(MARKET)
        assert isinstance(stuck, Accepted)
        await asyncio.sleep(0.3)
        task = await api.task(stuck.task_id)
        assert isinstance(task, ApiTask)
        assert task.state is TaskApiState.IN_PROGRESS


async def test_circuit_breaker_opens_stops_calling_and_closes_after_a_good_probe() -> None:
    observer = RecordingObserver()
    async with (
        simulator(Faults(error_rate=1.0)) as sim,
        client(
            sim.base_url,
            observer,
            breaker_failures=3,
            breaker_cooldown_s=0.5,
            retry_max_elapsed_s=0.0,
        ) as api,
    ):
        for _ in range(3):
            assert isinstance(await api.me(), Unavailable)
        assert breaker_state(api) is BreakerState.OPEN
        sent = sim.account.stats.requests["me"]
        refused = await api.me()
        assert isinstance(refused, Unavailable)
        assert refused.reason == "circuit breaker open (last failure: HTTP 503)"
        assert refused.retry_after_s is not None
        assert 0 < refused.retry_after_s <= 0.5
        assert sim.account.stats.requests["me"] == sent, "an open breaker must not call the API"
        await sim.set_faults(error_rate=0.0)
        await asyncio.sleep(0.6)
        assert isinstance(await api.me(), dict)
        assert breaker_state(api) is BreakerState.CLOSED
        assert observer.breaker_states == [
            BreakerState.OPEN,
            BreakerState.HALF_OPEN,
            BreakerState.CLOSED,
        ]


async def test_a_failed_probe_reopens_the_breaker() -> None:
    async with (
        simulator(Faults(error_rate=1.0)) as sim,
        client(
            sim.base_url, breaker_failures=1, breaker_cooldown_s=0.2, retry_max_elapsed_s=0
        ) as api,
    ):
        await api.me()
        assert breaker_state(api) is BreakerState.OPEN
        await asyncio.sleep(0.25)
        await api.me()
        assert breaker_state(api) is BreakerState.OPEN


async def test_rate_limiter_holds_ten_uploads_per_second_with_no_429() -> None:
    """A burst of 200 uploads: the client spaces them so the simulator never throttles."""
    observer = RecordingObserver()
    async with (
        simulator() as sim,
        client(sim.base_url, observer, max_connections=50, retry_max_elapsed_s=60) as api,
    ):
        assert sim.account.faults.upload_rate_per_s == 10
        outcomes = await asyncio.gather(*(api.upload(MARKET) for _ in range(200)))
        assert all(isinstance(o, Accepted) for o in outcomes)
        assert sim.account.stats.throttled == 0
        assert observer.throttled_count == 0
        assert sim.account.stats.uploads_accepted == 200


async def test_without_our_limiter_the_simulator_does_throttle() -> None:
    """The contrast: the same burst with the client's limit lifted draws 429s."""
    observer = RecordingObserver()
    async with (
        simulator() as sim,
        client(sim.base_url, observer, upload_rate_per_s=1000, max_connections=50) as api,
    ):
        await asyncio.gather(*(api.upload(MARKET) for _ in range(30)))
        assert sim.account.stats.throttled > 0
        assert observer.throttled_count == sim.account.stats.throttled


async def test_list_follows_next_links_and_filters() -> None:
    async with (
        simulator(Faults(page_size=3, pending_delay_s=60)) as sim,
        client(sim.base_url) as api,
    ):
        ids = []
        for n in range(8):
            reference = "even" if n % 2 == 0 else "odd"
            outcome = await api.upload(MARKET.model_copy(update={"reference": reference}))
            assert isinstance(outcome, Accepted)
            ids.append(outcome.task_id)
        everything = await api.list_tasks()
        assert isinstance(everything, TaskPage)
        assert [t.id for t in everything.tasks] == list(reversed(ids))
        assert sim.account.stats.requests["task_list"] == 3  # 3 + 3 + 2
        even = await api.list_tasks(reference="even", state="pending")
        assert isinstance(even, TaskPage)
        assert sorted(t.id for t in even.tasks) == sorted(ids[0::2])
        none = await api.list_tasks(state="complete")
        assert none == TaskPage([])


async def test_bulk_status_is_chunked_and_paged() -> None:
    async with (
        simulator(Faults(page_size=2)) as sim,
        client(sim.base_url, status_chunk_size=3) as api,
    ):
        ids = []
        for _ in range(7):
            outcome = await api.upload(MARKET)
            assert isinstance(outcome, Accepted)
            ids.append(outcome.task_id)
        page = await api.tasks([*ids, "no-such-task"])
        assert isinstance(page, TaskPage)
        assert [t.id for t in page.tasks] == ids  # unknown ids are simply absent
        # chunks of 3, 3 and 2 ids, each answered in pages of 2: 2 + 2 + 1 requests
        assert sim.account.stats.requests["tasks_bulk"] == 5


async def test_task_group_by_reference_and_me() -> None:
    async with simulator() as sim, client(sim.base_url) as api:
        for _ in range(2):
            outcome = await api.upload(MARKET)
            assert isinstance(outcome, Accepted)
            await finished(api, outcome.task_id)
        group = await api.task_group("line-7")
        assert isinstance(group, ApiTaskGroup)
        assert (group.tasks_count, group.codes_affected, group.completed) == (2, 4, True)
        missing = await api.task_group("nothing")
        assert isinstance(missing, Rejected)
        assert missing.status == 404
        me = await api.me()
        assert isinstance(me, dict)
        assert me["username"] == "simulator"


async def test_oversized_response_body_is_refused() -> None:
    async with simulator() as sim, client(sim.base_url, max_response_bytes=100) as api:
        outcome = await api.upload(MARKET)
        assert isinstance(outcome, Accepted)  # {"task_id": ...} fits in 100 bytes
        listed = await api.list_tasks()
        assert isinstance(listed, Unavailable)
        assert "over 100 bytes" in listed.reason


async def test_token_appears_in_no_log_line_repr_or_outcome() -> None:
    secret = TOKEN
    async with simulator(Faults(error_rate=1.0)) as sim:
        api_config = config(sim.base_url, retry_max_elapsed_s=0.1, breaker_failures=2)
        with capture_logs() as logs:
            async with ScantrustClient(api_config) as api:
                outcomes = [await api.upload(MARKET), await api.me()]
                assert secret not in repr(api)
        assert logs, "the failing calls should have logged"
        assert secret not in repr(logs)
        assert secret not in repr(outcomes)
        assert secret not in repr(api_config)
        assert secret not in repr(api_config)


async def test_overall_limit_applies_to_every_request() -> None:
    """With 2 requests per minute, a third read waits for the window instead of being sent."""
    async with simulator() as sim, client(sim.base_url, rate_per_min=2) as api:
        assert isinstance(await api.me(), dict)
        assert isinstance(await api.list_tasks(), TaskPage)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(api.me(), timeout=0.5)
        assert sim.account.stats.requests["me"] == 1
