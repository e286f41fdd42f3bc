"""Parsing the 429 wait, as the vendor documents it."""

from __future__ import annotations

import pytest

from service.scantrust.outcomes import DEFAULT_THROTTLE_WAIT_S, throttle_wait

BODY = '{"detail": "Request was throttled. Expected available in 7 seconds.", "code": "throttled"}'


@pytest.mark.parametrize(
    ("retry_after", "body", "expected"),
    [
        ("3", BODY, 3.0),
        (" 2.5 ", BODY, 2.5),
        (None, BODY, 7.0),
        (None, '{"detail": "Request was throttled. Expected available in 1 second."}', 1.0),
        (None, '{"detail": "Expected available in 0.4 seconds."}', 0.4),
        ("Wed, 21 Oct 2026 07:28:00 GMT", BODY, 7.0),
        (None, "<html>slow down</html>", DEFAULT_THROTTLE_WAIT_S),
    ],
)
def test_throttle_wait(retry_after: str | None, body: str, expected: float) -> None:
    assert throttle_wait(retry_after, body) == expected
