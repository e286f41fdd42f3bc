"""The generic retry loops on tenacity keep the waits, counts and endings they had when
they were written by hand: the backoff's seeded delays, the attempt numbers logged, the
last failure (never tenacity's RetryError) when a loop gives up, and the start-up wait
for Kafka's deadline, stop and liveness calls."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from structlog.testing import capture_logs
from tenacity import retry_if_exception_type, retry_if_result, stop_after_attempt

from service import kafka
from service.core.resilience import Backoff
from service.kafka import KafkaSetupError, KafkaUnreachableError, wait_for_kafka
from service.retrying import backoff_wait, call_with_retries
from service.scantrust.exchange import ApiCall, ApiResponse
from service.scantrust.observer import NullObserver
from service.scantrust.outcomes import Failure, Unavailable
from service.scantrust.read_retries import ReadRetries
from service.settings import KafkaSettings


class Flaky:
    """Fails `failures` times with `error`, then answers `answer`; counts the calls."""

    def __init__(self, failures: int, error: Exception, answer: str = "ok") -> None:
        self.failures = failures
        self.error = error
        self.answer = answer
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return self.answer


async def test_the_waits_are_the_backoffs_own_seeded_delays() -> None:
    backoff = Backoff(0.001, 0.004)
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    flaky = Flaky(4, OSError("down"))
    answer = await call_with_retries(
        flaky,
        retry=retry_if_exception_type(OSError),
        wait=backoff_wait(backoff, random.Random(3)),
        sleep=sleep,
    )
    expected = random.Random(3)
    assert answer == "ok"
    assert flaky.calls == 5
    assert slept == [backoff.delay(n, expected) for n in range(4)]


async def test_a_loop_that_gives_up_raises_the_last_failure_itself() -> None:
    error = OSError("still down")
    flaky = Flaky(10, error)
    with pytest.raises(OSError, match="still down") as raised:
        await call_with_retries(
            flaky,
            retry=retry_if_exception_type(OSError),
            wait=lambda _state: 0.0,
            stop=stop_after_attempt(3),
        )
    assert raised.value is error
    assert flaky.calls == 3


async def test_an_error_not_retried_ends_the_loop_at_once() -> None:
    flaky = Flaky(1, ValueError("bad"))
    with pytest.raises(ValueError, match="bad"):
        await call_with_retries(
            flaky, retry=retry_if_exception_type(OSError), wait=lambda _state: 0.0
        )
    assert flaky.calls == 1


async def test_a_result_retried_until_it_is_good() -> None:
    answers = iter(["no", "no", "yes"])

    async def ask() -> str:
        return next(answers)

    seen: list[int] = []
    answer = await call_with_retries(
        ask,
        retry=retry_if_result(lambda value: value == "no"),
        wait=lambda _state: 0.0,
        before_sleep=lambda state: seen.append(state.attempt_number),
    )
    assert answer == "yes"
    assert seen == [1, 2]


async def test_read_retries_log_each_retry_with_its_number_and_backoff_wait() -> None:
    scheduled: list[float] = []

    class Observer(NullObserver):
        def retry_scheduled(self, endpoint: str, outcome: str, wait_s: float) -> None:
            scheduled.append(wait_s)

    outage = Unavailable("HTTP 503", status=503)
    answer = ApiResponse(200, "{}", None)
    answers: list[ApiResponse | Failure] = [outage, outage, answer]

    async def attempt(_call: ApiCall) -> ApiResponse | Failure:
        return answers.pop(0)

    backoff = Backoff(0.001, 0.002)
    reads = ReadRetries(
        attempt, backoff, random.Random(5), Observer(), budget_s=60.0, now=lambda: 0.0
    )
    with capture_logs() as logs:
        assert await reads.call(ApiCall("task", "GET", "https://api.example/t/")) == answer
    expected = random.Random(5)
    assert scheduled == [backoff.delay(0, expected), backoff.delay(1, expected)]
    assert [(line["event"], line["attempt"]) for line in logs] == [
        ("api_retry", 1),
        ("api_retry", 2),
    ]


@pytest.fixture
def quick_startup(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start-up waits of milliseconds instead of seconds."""
    monkeypatch.setattr(kafka, "STARTUP_RETRY_INITIAL_S", 0.001)
    monkeypatch.setattr(kafka, "STARTUP_RETRY_MAX_S", 0.002)


def scripted_probe(monkeypatch: pytest.MonkeyPatch, failures: list[Exception]) -> list[float]:
    """Replace the metadata probe: each call raises the next failure, then succeeds.
    Returns the probe timeouts asked for."""
    timeouts: list[float] = []

    async def probe(_config: KafkaSettings, _options: dict[str, Any], limit_s: float) -> None:
        timeouts.append(limit_s)
        if failures:
            raise failures.pop(0)

    monkeypatch.setattr(kafka, "probe_connection", probe)
    return timeouts


def settings() -> KafkaSettings:
    return KafkaSettings(bootstrap_servers="127.0.0.1:9")


@pytest.mark.usefixtures("quick_startup")
async def test_kafka_waited_for_at_start_logs_each_wait_then_the_success(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    down = KafkaUnreachableError("nothing answered")
    timeouts = scripted_probe(monkeypatch, [down, down])
    beats: list[None] = []
    with capture_logs() as logs:
        reached = await wait_for_kafka(
            settings(), {}, wait_s=60.0, stop=asyncio.Event(), alive=lambda: beats.append(None)
        )
    assert reached is True
    assert len(beats) == 3
    assert timeouts == [kafka.STARTUP_PROBE_TIMEOUT_S] * 3
    waits = [line for line in logs if line["event"] == "kafka_waiting"]
    assert [line["attempt"] for line in waits] == [1, 2]
    assert {line["problem"] for line in waits} == {"nothing answered"}
    assert all(line["gives_up_in_s"] in (59, 60) for line in waits)
    (reachable,) = [line for line in logs if line["event"] == "kafka_reachable_at_start"]
    assert reachable["attempts"] == 3


@pytest.mark.usefixtures("quick_startup")
async def test_kafka_reached_at_once_logs_no_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    scripted_probe(monkeypatch, [])
    with capture_logs() as logs:
        assert await wait_for_kafka(
            settings(), {}, wait_s=60.0, stop=asyncio.Event(), alive=lambda: None
        )
    assert logs == []


@pytest.mark.usefixtures("quick_startup")
async def test_kafka_still_unreachable_at_the_deadline_is_an_error_naming_the_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scripted_probe(monkeypatch, [KafkaUnreachableError("nothing answered")] * 1000)
    with pytest.raises(KafkaUnreachableError, match=r"after waiting 0\.05 s: nothing answered"):
        await wait_for_kafka(settings(), {}, wait_s=0.05, stop=asyncio.Event(), alive=lambda: None)


async def test_a_refused_credential_is_raised_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    timeouts = scripted_probe(monkeypatch, [KafkaSetupError("SASL authentication failed")])
    with pytest.raises(KafkaSetupError, match="SASL"):
        await wait_for_kafka(settings(), {}, wait_s=60.0, stop=asyncio.Event(), alive=lambda: None)
    assert len(timeouts) == 1


async def test_a_stop_while_waiting_for_kafka_ends_the_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The real start-up backoff (a first wait of up to 1 s): the stop cuts it short.
    stop = asyncio.Event()
    failures: list[Exception] = [KafkaUnreachableError("nothing answered")] * 1000
    timeouts = scripted_probe(monkeypatch, failures)
    asyncio.get_running_loop().call_later(0.01, stop.set)
    began = asyncio.get_running_loop().time()
    reached = await wait_for_kafka(
        settings(), {}, wait_s=60.0, stop=stop, alive=lambda: None, rng=_Ceiling()
    )
    assert reached is False
    assert len(timeouts) == 1
    assert asyncio.get_running_loop().time() - began < 0.5


class _Ceiling(random.Random):
    """Jitter that always draws the ceiling: the first start-up wait is its full 1 s."""

    def uniform(self, a: float, b: float) -> float:
        return b
