"""The uploaders against a fake API: outcomes handed on, retries owned here, and a
shutdown that parked or retrying uploads cannot hold up."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from service.core.batching import Batch, Batcher, PendingEvent, Source
from service.core.parsing import ParsedEvent, parse_event
from service.core.records import IntentRecord
from service.metrics import RelayMetrics
from service.relay.config import WALL_CLOCK
from service.relay.health import ApiHealth
from service.relay.messages import ApiRejection, BatchRejected, IntentWrite, LedgerAppend
from service.relay.reconcile import api_reference
from service.relay.uploaders import Uploaders
from service.scantrust.outcomes import (
    Ambiguous,
    AuthFailed,
    Expired,
    Misconfigured,
    PagesExceeded,
    Rejected,
    TaskApiState,
    Throttled,
    Unavailable,
    UploadOutcome,
)
from tests.unit.relay.fakes import FakeApi, Inbox, config
from tests.unit.relay.support import api_task, batch


class Recorder:
    """A committer that commits at once (or never, when `hold`); `on_intent` runs as each
    intent is committed."""

    def __init__(
        self, *, hold: bool = False, on_intent: Callable[[IntentRecord], None] | None = None
    ) -> None:
        self.items: list[Any] = []
        self.intents: list[IntentRecord] = []
        self.intent_times: list[float] = []  # the event loop's time of each commit
        self.hold = hold
        self.on_intent = on_intent

    async def submit(self, item: LedgerAppend | ApiRejection) -> None:
        self.items.append(item)
        if isinstance(item, LedgerAppend) and not self.hold:
            item.recorded.set_result(None)

    async def write_intent(self, intent: IntentWrite) -> None:
        self.intents.append(intent.record)
        self.intent_times.append(asyncio.get_running_loop().time())
        if self.on_intent is not None:
            self.on_intent(intent.record)
        intent.written.set_result(None)


def uploaders(
    api: FakeApi,
    recorder: Recorder,
    inbox: Inbox,
    health: ApiHealth | None = None,
    owns: Callable[[Batch], bool] = lambda _batch: True,
    **settings: Any,
) -> Uploaders:
    return Uploaders(
        config(**settings),
        api=api,
        committer=recorder,
        intake=inbox,
        health=health or ApiHealth(),
        metrics=RelayMetrics(CollectorRegistry()),
        owns=owns,
        rng=random.Random(7),
    )


async def run_until_drained(stage: Uploaders, batches: list[Batch], **drain: float) -> None:
    runner = asyncio.create_task(stage.run())
    for ready in batches:
        await stage.put(ready)
    await stage.drain([], drain.get("timeout_s", 5.0), drain.get("grace_s", 5.0))
    await asyncio.wait_for(runner, 5)


async def test_accepted_becomes_a_ledger_record_and_rejected_dead_letters_and_a_release() -> None:
    refusal = Rejected(400, {"scm_data": ["bad"]}, "{}")
    api = FakeApi(script=[refusal])
    recorder, inbox = Recorder(), Inbox()
    first, second = batch(["a"]), batch(["b"])
    await run_until_drained(
        uploaders(api, recorder, inbox, max_in_flight_requests=1), [first, second]
    )
    rejection, append = recorder.items
    assert isinstance(rejection, ApiRejection)
    assert rejection.batch is first
    assert isinstance(append, LedgerAppend)
    assert append.batch is second
    assert append.record.task_id == "task-2"
    assert append.record.constraints == {"extended_id": ["b"]}
    assert inbox.messages == [BatchRejected(first.batch_id)]


async def test_retries_are_owned_here_and_honour_the_api_wait() -> None:
    script: list[UploadOutcome | Expired] = [
        Throttled(0.2, "throttled"),
        Unavailable("HTTP 503", status=503),
        Unavailable("connect: refused"),
    ]
    api, recorder, health = FakeApi(script=script), Recorder(), ApiHealth()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await run_until_drained(uploaders(api, recorder, Inbox(), health), [batch(["a"])])
    # One attempt per call: three failures, then the accepted fourth.
    assert len(api.uploads) == 4
    assert loop.time() - started >= 0.2, "the 429's named wait was not honoured"
    assert isinstance(recorder.items[0], LedgerAppend)
    assert health.degraded is False, "an accepted upload clears the degraded state"


async def test_the_next_batch_waits_until_the_last_is_recorded() -> None:
    api, recorder = FakeApi(), Recorder(hold=True)
    stage = uploaders(api, recorder, Inbox(), max_in_flight_requests=1)
    runner = asyncio.create_task(stage.run())
    await stage.put(batch(["a"]))
    await stage.put(batch(["b"]))
    await asyncio.sleep(0.1)
    assert len(api.uploads) == 1, "a second upload started before the first was recorded"
    recorder.items[0].recorded.set_result(None)
    await asyncio.sleep(0.1)
    assert len(api.uploads) == 2
    recorder.items[1].recorded.set_result(None)
    await stage.drain([], 1.0, 1.0)
    await asyncio.wait_for(runner, 1)


async def test_parked_after_403_does_not_hold_up_the_shutdown() -> None:
    health = ApiHealth()
    api = FakeApi(refusal=AuthFailed(403, "forbidden"))
    stage = uploaders(api, Recorder(), Inbox(), health, retry_max_backoff_s=10.0)
    runner = asyncio.create_task(stage.run())
    await stage.put(batch(["a"]))
    await asyncio.sleep(0.05)
    assert health.auth_failed is not None
    tried = len(api.uploads)
    loop = asyncio.get_running_loop()
    started = loop.time()
    # The final batches are not even tried with a token the API refused.
    await stage.drain([batch(["b"]), batch(["c"])], timeout_s=30.0, grace_s=30.0)
    await asyncio.wait_for(runner, 1)
    assert loop.time() - started < 1.0
    assert len(api.uploads) == tried


@pytest.mark.parametrize(
    "refusal", [AuthFailed(403, "forbidden"), Misconfigured(404, "<h1>Not Found</h1>")]
)
async def test_a_refused_batch_is_kept_and_probes_until_the_api_accepts_it(
    refusal: AuthFailed | Misconfigured,
) -> None:
    health = ApiHealth()
    api = FakeApi(refusal=refusal)
    recorder, inbox = Recorder(), Inbox()
    stage = uploaders(api, recorder, inbox, health)
    runner = asyncio.create_task(stage.run())
    await stage.put(batch(["a"]))
    await asyncio.sleep(0.3)
    assert health.refusal == refusal
    assert len(api.uploads) >= 3, "the refused batch was not probed again"
    assert recorder.items == [], "a refusal dead-lettered the batch"
    assert inbox.messages == []
    api.refusal = None  # the token or the URL fixed
    await asyncio.sleep(0.2)
    assert health.refusal is None, "the relay did not resume by itself"
    (append,) = recorder.items
    assert isinstance(append, LedgerAppend)
    await stage.drain([], 1.0, 1.0)
    await asyncio.wait_for(runner, 1)


async def test_at_the_deadline_retrying_uploads_stop_and_requests_under_way_finish() -> None:
    outage: list[UploadOutcome | Expired] = [
        Unavailable("HTTP 503", status=503, retry_after_s=60.0)
    ]
    api, recorder = FakeApi(script=outage), Recorder()
    stage = uploaders(api, recorder, Inbox(), max_in_flight_requests=2)
    runner = asyncio.create_task(stage.run())
    await stage.put(batch(["a"]))  # gets the 503 and waits 60 s to retry
    await asyncio.sleep(0.05)
    api.upload_delay_s = 0.3
    slow = batch(["b"])
    await stage.put(slow)  # its request is under way at the deadline
    await asyncio.sleep(0.05)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await stage.drain([batch(["c"])], timeout_s=0.1, grace_s=5.0)
    await asyncio.wait_for(runner, 1)
    elapsed = loop.time() - started
    assert elapsed < 1.0, "the retry wait held up the shutdown"
    # The request under way finished and was handed on; nothing new started.
    assert [item.batch for item in recorder.items] == [slow]
    assert len(api.uploads) == 2


async def test_a_request_past_its_grace_is_cancelled() -> None:
    api = FakeApi(upload_delay_s=10.0)
    stage = uploaders(api, Recorder(), Inbox(), max_in_flight_requests=1)
    runner = asyncio.create_task(stage.run())
    await stage.put(batch(["a"]))
    await asyncio.sleep(0.05)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await stage.drain([], timeout_s=0.1, grace_s=0.2)
    await asyncio.wait_for(runner, 1)
    assert 0.25 <= loop.time() - started < 1.0


async def test_take_queued_returns_batches_no_uploader_started() -> None:
    api = FakeApi(upload_delay_s=10.0)
    stage = uploaders(api, Recorder(), Inbox(), max_in_flight_requests=1)
    runner = asyncio.create_task(stage.run())
    first, second, third = batch(["a"]), batch(["b"]), batch(["c"])
    for ready in (first, second, third):
        await stage.put(ready)
    await asyncio.sleep(0.05)
    assert stage.take_queued() == [second, third]
    assert stage.idle
    await stage.drain([], timeout_s=0.05, grace_s=0.05)
    await asyncio.wait_for(runner, 1)


async def test_an_ambiguous_upload_is_looked_up_and_its_task_adopted_not_resent() -> None:
    api = FakeApi(lost_answers=1)
    recorder = Recorder()
    await run_until_drained(uploaders(api, recorder, Inbox()), [batch(["a"])])
    assert len(api.uploads) == 1, "the batch was sent again although its task existed"
    assert api.lookups == 1
    (append,) = recorder.items
    assert append.record.task_id == "task-1"
    assert api.uploads[0].reference == f"scm-relay:{append.batch.batch_id}"


async def test_when_no_task_exists_the_batch_is_sent_again_once() -> None:
    api = FakeApi(script=[Ambiguous("HTTP 502", status=502)])
    recorder = Recorder()
    await run_until_drained(uploaders(api, recorder, Inbox()), [batch(["a"])])
    assert len(api.uploads) == 2
    (append,) = recorder.items
    assert append.record.task_id == "task-2"


async def test_nothing_is_resent_before_a_lookup_has_answered() -> None:
    api = FakeApi(
        script=[Ambiguous("connection lost: ServerDisconnectedError")],
        lookup_failure=Unavailable("HTTP 503", status=503),
    )
    recorder = Recorder()
    await run_until_drained(uploaders(api, recorder, Inbox()), [batch(["a"])])
    # One lookup failed (no answer: nothing resent), one found none, and one more after
    # the task list's lag found none: only then the batch went again.
    assert api.lookups == 3
    assert len(api.uploads) == 2


async def test_every_task_found_is_recorded_and_the_first_accounts_for_the_events() -> None:
    ready = batch(["a"])
    api = FakeApi(lost_answers=1)
    # An earlier attempt's task that appeared after its own lookup, say.
    api.states["late"] = api_task(
        "late", TaskApiState.PENDING, reference=api_reference(ready), age_s=1
    )
    recorder = Recorder()
    await run_until_drained(uploaders(api, recorder, Inbox()), [ready])
    (append,) = recorder.items
    # One record for the batch, closing its intent: both tasks, the first accounting.
    assert isinstance(append, LedgerAppend)
    assert [append.record.task_id, *(r.task_id for r in append.more)] == ["late", "task-1"]


async def test_an_event_with_several_keys_is_sent_as_published_intent_and_ledger_alike() -> None:
    raw = (
        b'{"constraints": {"serial_number": ["SN-1", "SN-2"], "rfid": "E28"}, '
        b'"scm_data": {"intended_market": "DE"}, "event_id": "multi"}'
    )
    parsed = parse_event(raw)
    assert isinstance(parsed, ParsedEvent)
    pending = PendingEvent(Source("in", 0, 3, "multi"), parsed.event, raw, None, 0.0)
    ready, _ = Batcher(max_values=1000, max_keys=1, linger_s=1, max_open_batches=1).add(
        pending, 0.0
    )
    api, recorder = FakeApi(), Recorder()
    await run_until_drained(uploaders(api, recorder, Inbox()), ready)
    sent = {"serial_number": ["SN-1", "SN-2"], "rfid": ["E28"]}
    (request,) = api.uploads
    assert request.constraints == sent
    (intent,) = recorder.intents
    assert intent.constraints == sent
    assert intent.expected_codes == 3
    (append,) = recorder.items
    assert isinstance(append, LedgerAppend)
    assert append.record.constraints == sent
    assert [source.event_id for source in append.record.events] == ["multi"]


def changes_a_b_a() -> list[Batch]:
    """Code X changed A, B, A under one shared reference: three batches, one each."""
    return [batch(["x"], market, reference="line-7") for market in ("A", "B", "A")]


async def test_a_shared_reference_never_adopts_a_task_recorded_for_another_batch() -> None:
    """The third upload's connection resets before the API created anything: the lookup
    sees the first A's task (same reference, constraints and scm_data, created minutes
    ago) and must not take it for this batch's: it is recorded already, and adopting it
    would leave X at B and give the old task a second record and result."""
    api = FakeApi(answer_at={3: Ambiguous("connection lost: ServerDisconnectedError")})
    recorder = Recorder()
    first, second, third = changes_a_b_a()
    await run_until_drained(
        uploaders(api, recorder, Inbox(), max_in_flight_requests=1), [first, second, third]
    )
    recorded = [(item.batch, item.record.task_id) for item in recorder.items]
    assert recorded == [(first, "task-1"), (second, "task-2"), (third, "task-4")], (
        "the third A adopted an earlier batch's task instead of being sent again"
    )
    assert [request.scm_data["intended_market"] for request in api.uploads] == [
        "A",
        "B",
        "A",
        "A",
    ]


async def test_a_shared_reference_adopts_the_task_its_own_lost_answer_created() -> None:
    api = FakeApi(lose_answer_at={3})
    recorder = Recorder()
    first, second, third = changes_a_b_a()
    await run_until_drained(
        uploaders(api, recorder, Inbox(), max_in_flight_requests=1), [first, second, third]
    )
    assert len(api.uploads) == 3, "the batch was sent again although its task existed"
    last = recorder.items[-1]
    assert (last.batch, last.record.task_id, last.more) == (third, "task-3", [])


async def test_a_lookup_that_cannot_finish_says_why_and_sends_nothing_again() -> None:
    """The reference lists more pages of tasks than the client follows: not a passing
    outage. Said in an error line and a metric at each attempt; nothing is resent until a
    lookup finishes."""
    api = FakeApi(
        script=[Ambiguous("no answer before timeout")],
        lookup_failure=PagesExceeded("task_list: more than 10000 pages", pages=10_000),
    )
    metrics = RelayMetrics(CollectorRegistry())
    stage = Uploaders(
        config(),
        api=api,
        committer=(recorder := Recorder()),
        intake=Inbox(),
        health=ApiHealth(),
        metrics=metrics,
        rng=random.Random(7),
    )
    with capture_logs() as logs:
        await run_until_drained(stage, [batch(["a"], reference="line-7")])
    (line,) = [entry for entry in logs if entry["event"] == "reconcile_lookup_unfinished"]
    assert (line["log_level"], line["reference"], line["pages"]) == ("error", "line-7", 10_000)
    unfinished = metrics.registry.get_sample_value("scm_relay_reconcile_lookups_unfinished_total")
    assert unfinished == 1
    # Looked up again (it finished: no task), once more after the list's lag (still
    # none), and only then sent again.
    assert (api.lookups, len(api.uploads)) == (3, 2)
    assert isinstance(recorder.items[0], LedgerAppend)


@contextmanager
def wall_clock(clock: Callable[[], float]) -> Iterator[None]:
    """The wall clock the relay reads (service.relay.config.WALL_CLOCK), as a test sets it."""
    token = WALL_CLOCK.set(clock)
    try:
        yield
    finally:
        WALL_CLOCK.reset(token)


async def test_a_lagging_wall_clock_cannot_stretch_the_send_window() -> None:
    """A VM whose wall clock lags (after a suspend or a migration) must not send after its
    intent's send window: the window is also kept on the event loop's monotonic clock,
    checked where the client checks `send_by` (after its last wait)."""
    frozen = time.time()
    api = FakeApi(upload_delays=[0.5])  # the first request waits past its window to go out
    recorder = Recorder()
    with wall_clock(lambda: frozen):
        await run_until_drained(
            uploaders(api, recorder, Inbox(), intent_send_window_s=0.2), [batch(["a"])]
        )
    assert len(api.uploads) == 1
    assert len(recorder.intents) == 2, "sent under an intent whose window had passed"
    assert api.sent_at[0] - recorder.intent_times[-1] < 0.2
    assert api.sent_by == [recorder.intents[-1].send_by.timestamp()]


async def test_a_wall_clock_that_jumps_is_refused_and_the_upload_waits_for_a_fresh_intent() -> None:
    """The wall clock steps back 5 s (an NTP step) right after the intent is committed: by
    it, the intent would allow sending 5 s longer than it does. Detected (the monotonic
    clock disagrees), refused, logged and counted; a fresh intent, then the upload."""
    offset = [0.0]

    def step_back(_intent: IntentRecord) -> None:
        offset[0] = -5.0

    api, recorder = FakeApi(), Recorder(on_intent=step_back)
    metrics = RelayMetrics(CollectorRegistry())
    stage = Uploaders(
        config(intent_send_window_s=10.0),
        api=api,
        committer=recorder,
        intake=Inbox(),
        health=ApiHealth(),
        metrics=metrics,
        rng=random.Random(7),
    )
    with wall_clock(lambda: time.time() + offset[0]), capture_logs() as logs:
        await run_until_drained(stage, [batch(["a"])])
    assert len(recorder.intents) == 2, "sent under an intent written before the clock jumped"
    assert api.sent_by == [recorder.intents[1].send_by.timestamp()]
    (line,) = [entry for entry in logs if entry["event"] == "clock_jump"]
    assert 4.5 < line["wall_clock_behind_s"] < 5.5
    assert metrics.registry.get_sample_value("scm_relay_clock_jumps_total") == 1
