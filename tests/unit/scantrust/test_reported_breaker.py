"""The client's circuit breaker as the relay reports it: each change of state logged
and observed once, a refusal naming the failure that opened it, and a probe given up
freeing the half-open breaker."""

from __future__ import annotations

from structlog.testing import capture_logs

from service.core.resilience import BreakerState
from service.scantrust.breaker import ReportedBreaker
from service.scantrust.exchange import ApiResponse
from service.scantrust.observer import NullObserver
from service.scantrust.outcomes import Ambiguous, Unavailable


class Changes(NullObserver):
    def __init__(self) -> None:
        self.states: list[BreakerState] = []

    def breaker_changed(self, state: BreakerState) -> None:
        self.states.append(state)


def test_an_open_breaker_refuses_naming_the_last_failure_and_its_cool_down() -> None:
    now = [100.0]
    observer = Changes()
    breaker = ReportedBreaker(2, 30.0, observer, now=lambda: now[0])
    for reason in ("connect: refused", "no answer before timeout"):
        assert breaker.refusal() is None
        breaker.record(Ambiguous(reason) if "answer" in reason else Unavailable(reason))
    now[0] += 10.0
    refusal = breaker.refusal()
    assert refusal is not None
    assert refusal.reason == "circuit breaker open (last failure: no answer before timeout)"
    assert refusal.retry_after_s == 20.0
    assert observer.states == [BreakerState.OPEN]


def test_a_probe_given_up_frees_the_half_open_breaker_and_a_success_closes_it() -> None:
    now = [0.0]
    observer = Changes()
    breaker = ReportedBreaker(1, 5.0, observer, now=lambda: now[0])
    breaker.record(Unavailable("HTTP 503", status=503))
    now[0] += 5.0
    with capture_logs() as logs:
        assert breaker.refusal() is None  # the probe
        assert breaker.refusal() is not None  # one probe at a time
        breaker.release()  # never sent
        assert breaker.refusal() is None  # the next call probes
        breaker.record(ApiResponse(200, "{}", None))
    assert breaker.state is BreakerState.CLOSED
    assert observer.states == [BreakerState.OPEN, BreakerState.HALF_OPEN, BreakerState.CLOSED]
    assert [(line["event"], line["state"]) for line in logs] == [
        ("api_circuit_breaker", "half_open"),
        ("api_circuit_breaker", "closed"),
    ]
