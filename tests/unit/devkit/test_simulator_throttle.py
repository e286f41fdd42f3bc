"""The simulator's throttles, judged by Django REST framework's rule (`SimpleRateThrottle`
and `APIView.check_throttles`), not by the relay's limiter:

- a throttle keeps the arrival times of the requests it allowed; those `duration` or
  more seconds old are dropped; a request is refused when `num_requests` remain;
- a refused request is not recorded by the throttle that refused it;
- the wait is `remaining_duration / available_requests`, with
  `remaining_duration = duration - (now - oldest)` and
  `available_requests = num_requests - len(history) + 1`; none when that is <= 0;
- every throttle of the view is asked, and the longest wait is the one reported;
- the 429 detail rounds the wait up to whole seconds ("1 second", "2 seconds").

Times are multiples of 1/16 s (exact in binary), so no comparison is decided by rounding.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import pytest

from devkit.simulator.seed import default_seed
from devkit.simulator.state import UPLOAD_SCOPE, USER_SCOPE, Account, Faults
from devkit.simulator.throttling import RateThrottle, retry_after, throttled_body

TOKEN = "t"


def ten_per_second() -> RateThrottle:
    return RateThrottle(10, 1.0, deque())


def account(**knobs: Any) -> Account:
    return Account(default_seed(1), Faults(**knobs), rng_seed=7)


def test_the_eleventh_request_within_a_second_is_refused_with_drf_s_wait() -> None:
    throttle = ten_per_second()
    assert [throttle.allow_request(k / 16) for k in range(10)] == [True] * 10
    assert not throttle.allow_request(10 / 16)
    # Oldest at 0: it leaves the window at 1.0, 0.375 s from now, and 10 - 10 + 1 = 1
    # request becomes available then.
    assert throttle.wait() == 0.375
    assert throttled_body(throttle.wait()) == {
        "detail": "Request was throttled. Expected available in 1 second.",
        "code": "throttled",
    }


def test_a_refused_request_is_not_recorded_and_one_exactly_a_duration_old_is_dropped() -> None:
    throttle = ten_per_second()
    for k in range(10):
        throttle.allow_request(k / 16)
    for k in (10, 12, 15):  # 0.625, 0.75, 0.9375: all refused, none recorded
        assert not throttle.allow_request(k / 16)
    assert throttle.wait() == 0.0625
    assert len(throttle.history) == 10
    # At 1.0 the request of 0.0 is exactly one second old: dropped (DRF's `<=`), so one
    # request fits. Had the refusals been recorded, the window would still be full.
    assert throttle.allow_request(1.0)
    assert not throttle.allow_request(1.0)
    assert throttle.wait() == 1 / 16  # now the oldest is 1/16, gone at 1 + 1/16
    assert list(throttle.history) == [1.0] + [k / 16 for k in range(9, 0, -1)]


def test_the_wait_shares_the_remaining_duration_among_the_requests_then_available() -> None:
    throttle = ten_per_second()
    assert throttle.allow_request(0.0)
    assert throttle.allow_request(0.5)
    # DRF's formula as written, even when asked after an allowed request: (1 - 0.5) / 9.
    assert throttle.wait() == 0.5 / 9
    assert RateThrottle(10, 1.0, deque()).wait() == 1.0 / 11  # empty history: duration


def test_a_lowered_rate_over_a_longer_history_names_no_wait() -> None:
    history: deque[float] = deque()
    throttle = RateThrottle(10, 1.0, history)
    for k in range(10):
        throttle.allow_request(k / 16)
    lowered = RateThrottle(4, 1.0, history)  # the same cache entry, a new rate
    assert not lowered.allow_request(10 / 16)
    assert lowered.wait() is None  # 4 - 10 + 1 <= 0
    assert throttled_body(None) == {"detail": "Request was throttled.", "code": "throttled"}
    assert retry_after(None) is None


@pytest.mark.parametrize(
    ("wait", "detail", "header"),
    [
        (0.001, "Expected available in 1 second.", "1"),
        (1.0, "Expected available in 1 second.", "1"),
        (1.0625, "Expected available in 2 seconds.", "2"),
        (59.375, "Expected available in 60 seconds.", "60"),
    ],
)
def test_the_429_rounds_the_wait_up_to_whole_seconds(wait: float, detail: str, header: str) -> None:
    assert throttled_body(wait)["detail"] == f"Request was throttled. {detail}"
    assert retry_after(wait) == header


def test_an_upload_refused_by_its_scope_still_counts_against_the_user_scope() -> None:
    """DRF asks every throttle: the user throttle records an upload the scm_update
    throttle refused."""
    sim = account(overall_rate_per_min=12)
    for k in range(10):
        assert sim.throttle_wait(TOKEN, is_upload=True, now=k / 16) == 0.0
    assert sim.throttle_wait(TOKEN, is_upload=True, now=10 / 16) == 0.375
    assert len(sim.counted_arrivals(USER_SCOPE, TOKEN)) == 11
    assert len(sim.counted_arrivals(UPLOAD_SCOPE, TOKEN)) == 10
    assert sim.throttle_wait(TOKEN, is_upload=True, now=1.0) == 0.0  # the user's 12th
    # The 13th request of the minute: the user throttle refuses it until 0.0 leaves.
    assert sim.throttle_wait(TOKEN, is_upload=False, now=1.0) == 59.0
    assert sim.throttle_wait("another token", is_upload=False, now=1.0) == 0.0


def test_when_both_scopes_refuse_the_longest_wait_is_reported() -> None:
    sim = account(overall_rate_per_min=10)
    for k in range(10):
        assert sim.throttle_wait(TOKEN, is_upload=True, now=k / 16) == 0.0
    # scm_update would say 0.375 s; the user scope 60 - 0.625 = 59.375 s.
    assert sim.throttle_wait(TOKEN, is_upload=True, now=10 / 16) == 59.375


def test_a_rate_changed_at_run_time_applies_to_the_history_already_there() -> None:
    sim = account()
    for k in range(10):
        assert sim.throttle_wait(TOKEN, is_upload=True, now=k / 16) == 0.0
    sim.faults = sim.faults.model_copy(update={"upload_rate_per_s": 4})
    assert sim.throttle_wait(TOKEN, is_upload=True, now=10 / 16) is None
    sim.faults = sim.faults.model_copy(update={"upload_rate_per_s": 20})
    assert sim.throttle_wait(TOKEN, is_upload=True, now=10 / 16) == 0.0


def test_reads_are_not_counted_by_the_upload_scope() -> None:
    sim = account()
    for k in range(30):
        assert sim.throttle_wait(TOKEN, is_upload=False, now=k / 16) == 0.0
    assert sim.counted_arrivals(UPLOAD_SCOPE, TOKEN) == []
    assert sim.throttle_wait(TOKEN, is_upload=True, now=2.0) == 0.0


# -- the one-way delay: arrival spacing is what the throttle sees ---------------------


def refused(sent: Sequence[float], delays: Sequence[float], judge: RateThrottle | Account) -> int:
    """How many of the requests sent at `sent` the throttle refuses when each arrives
    its delay later, judged in the order they arrive."""
    arrivals = sorted(s + d for s, d in zip(sent, delays, strict=True))
    if isinstance(judge, Account):
        return sum(judge.throttle_wait(TOKEN, is_upload=True, now=a) != 0.0 for a in arrivals)
    return sum(not judge.allow_request(a) for a in arrivals)


def test_sent_100_ms_apart_they_pass_and_a_one_way_delay_makes_them_draw_429s() -> None:
    """10 uploads a second, sent exactly 100 ms apart: each arrives exactly one second
    after the tenth before it, which DRF's rule still allows. With a random one-way delay
    of up to 30 ms, a request that travels less than the tenth before it arrives within
    that second, and is refused.

    In exact arithmetic only: in float seconds, 1.2 - 1.0 < 0.2, and rounding would decide
    these ties. So the clock counts whole microseconds (the rule is the same)."""
    sent = [k * 100_000 for k in range(100)]
    still = account()
    assert refused(sent, [still.one_way_delay() for _ in sent], RateThrottle(10, 1e6, deque())) == 0
    delayed = account(one_way_delay_s=0.03)
    delays = [round(delayed.one_way_delay() * 1e6) for _ in sent]
    assert 0 < max(delays) <= 30_000
    assert refused(sent, delays, RateThrottle(10, 1e6, deque())) > 0


def test_the_account_judges_arrivals_not_sending_times() -> None:
    """The same through the account's own throttles, at 8 uploads a second (125 ms apart,
    exact in float seconds)."""
    sent = [k / 8 for k in range(80)]
    still = account(upload_rate_per_s=8)
    assert refused(sent, [still.one_way_delay() for _ in sent], still) == 0
    delayed = account(upload_rate_per_s=8, one_way_delay_s=0.03)
    assert refused(sent, [delayed.one_way_delay() for _ in sent], delayed) > 0


def test_a_one_way_delay_longer_than_the_spacing_reorders_requests() -> None:
    delayed = account(one_way_delay_s=0.3)
    sent = [k / 10 for k in range(50)]
    arrivals = [s + delayed.one_way_delay() for s in sent]
    assert arrivals != sorted(arrivals)
    assert all(0 <= a - s <= 0.3 for s, a in zip(sent, arrivals, strict=True))
