"""Sliding-window limiter, circuit breaker and backoff, driven by a fake clock."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.core.resilience import Backoff, BreakerState, CircuitBreaker, SlidingWindowLimiter


def test_limiter_allows_limit_per_window_then_waits_for_the_oldest() -> None:
    limiter = SlidingWindowLimiter(3, 1.0)
    assert [limiter.try_acquire(0.0), limiter.try_acquire(0.2), limiter.try_acquire(0.4)] == [
        True,
        True,
        True,
    ]
    assert not limiter.try_acquire(0.5)
    assert limiter.delay(0.5) == pytest.approx(0.5)
    assert limiter.try_acquire(1.0)
    assert not limiter.try_acquire(1.1)


@given(st.lists(st.floats(0, 0.3), min_size=1, max_size=300))
def test_limiter_never_grants_more_than_limit_in_any_window(gaps: list[float]) -> None:
    """Whatever the arrival pattern, any window of the period holds at most `limit` grants."""
    limiter = SlidingWindowLimiter(10, 1.0, margin_s=0.02)
    now, granted = 0.0, []
    for gap in gaps:
        now += gap
        wait = limiter.delay(now)
        now += wait
        assert limiter.try_acquire(now)
        granted.append(now)
    for index, start in enumerate(granted):
        in_window = [t for t in granted[index:] if t < start + 1.0]
        assert len(in_window) <= 10


def test_limiter_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="limit >= 1"):
        SlidingWindowLimiter(0, 1.0)


def state(breaker: CircuitBreaker) -> BreakerState:
    """The state, read through a call so the type checker does not pin it after an assert."""
    return breaker.state


def test_breaker_opens_after_threshold_and_probes_after_cooldown() -> None:
    breaker = CircuitBreaker(failure_threshold=3, cooldown_s=10.0)
    for now in (0.0, 1.0):
        assert breaker.allow(now)
        breaker.record_failure(now)
    assert state(breaker) is BreakerState.CLOSED
    breaker.record_failure(2.0)
    assert state(breaker) is BreakerState.OPEN
    assert not breaker.allow(5.0)
    assert breaker.retry_in(5.0) == pytest.approx(7.0)
    assert breaker.allow(12.0)  # the probe
    assert state(breaker) is BreakerState.HALF_OPEN
    assert not breaker.allow(12.1)  # only one probe at a time
    breaker.record_success()
    assert state(breaker) is BreakerState.CLOSED
    assert breaker.allow(12.2)


def test_a_failed_probe_reopens_for_a_full_cooldown() -> None:
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=5.0)
    breaker.record_failure(0.0)
    assert breaker.allow(5.0)
    breaker.record_failure(5.0)
    assert state(breaker) is BreakerState.OPEN
    assert not breaker.allow(9.0)
    assert breaker.allow(10.0)


def test_success_resets_the_failure_count() -> None:
    breaker = CircuitBreaker(failure_threshold=2, cooldown_s=5.0)
    breaker.record_failure(0.0)
    breaker.record_success()
    breaker.record_failure(1.0)
    assert state(breaker) is BreakerState.CLOSED


@given(st.integers(0, 100), st.integers(0, 2**32))
def test_backoff_is_full_jitter_within_the_cap(attempt: int, seed: int) -> None:
    backoff = Backoff(initial_s=0.5, cap_s=30.0)
    delay = backoff.delay(attempt, random.Random(seed))
    assert 0.0 <= delay <= min(30.0, 0.5 * 2**attempt)


def test_backoff_grows_exponentially_on_average() -> None:
    backoff = Backoff(initial_s=0.1, cap_s=100.0)
    rng = random.Random(1)
    means = [sum(backoff.delay(n, rng) for _ in range(2000)) / 2000 for n in range(4)]
    for n, mean in enumerate(means):
        assert mean == pytest.approx(0.1 * 2**n / 2, rel=0.1)
