"""Reconciliation: the tasks an ambiguous upload created, found by reference."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from structlog.testing import capture_logs

from service.relay.ledger import KnownTasks
from service.relay.reconcile import Reconciler, api_reference, same_change
from service.scantrust.client import UploadRequest
from service.scantrust.outcomes import ApiTask, Failure, TaskApiState, Unavailable
from tests.unit.relay.fakes import FakeApi
from tests.unit.relay.support import api_task, batch

REQUEST = UploadRequest(constraints={"extended_id": ["a", "b"]}, scm_data={"intended_market": "DE"})


def test_a_task_matches_only_the_exact_change() -> None:
    details = {"constraints": {"extended_id": ["b", "a"]}, "scm_data": {"intended_market": "DE"}}
    assert same_change(details, REQUEST)
    single = UploadRequest(constraints={"rfid": ["r1"]}, scm_data={"x": "1"})
    assert same_change({"constraints": {"rfid": "r1"}, "scm_data": {"x": "1"}}, single)
    assert not same_change({**details, "scm_data": {"intended_market": "FR"}}, REQUEST)
    assert not same_change({**details, "constraints": {"extended_id": ["a"]}}, REQUEST)
    assert not same_change(None, REQUEST)
    assert not same_change({"constraints": "a"}, REQUEST)


def test_a_batch_without_a_reference_gets_one_of_its_own() -> None:
    own = batch(["a"])
    assert api_reference(own) == f"scm-relay:{own.batch_id}"


async def test_every_task_with_a_batch_s_own_reference_is_its_own() -> None:
    own = batch(["a", "b"])
    api = FakeApi()
    reference = api_reference(own)
    older = api_task("t1", TaskApiState.COMPLETE, reference=reference)
    newer = api_task("t2", TaskApiState.PENDING, reference=reference, age_s=-1)
    api.states.update({"t2": newer, "t1": older, "t3": api_task("t3", TaskApiState.PENDING)})
    found = await Reconciler(api).find(own, REQUEST, datetime.now(UTC))
    assert found == ["t1", "t2"]


async def test_with_the_user_s_reference_only_matching_recent_tasks_count() -> None:
    shared = batch(["a", "b"], reference="line 7")
    api = FakeApi()
    ours = {"constraints": {"extended_id": ["a", "b"]}, "scm_data": {"intended_market": "DE"}}
    other = {"constraints": {"extended_id": ["c"]}, "scm_data": {"intended_market": "DE"}}
    api.states.update(
        {
            "mine": api_task("mine", TaskApiState.PENDING, reference="line 7", details=ours),
            "theirs": api_task("theirs", TaskApiState.PENDING, reference="line 7", details=other),
            "old": api_task(
                "old", TaskApiState.COMPLETE, reference="line 7", details=ours, age_s=3600
            ),
        }
    )
    found = await Reconciler(api).find(shared, REQUEST, datetime.now(UTC) - timedelta(seconds=5))
    assert found == ["mine"]


async def test_a_failed_lookup_is_reported_not_taken_for_none() -> None:
    api = FakeApi(lookup_failure=Unavailable("HTTP 503", status=503))
    found = await Reconciler(api).find(batch(["a"]), REQUEST, datetime.now(UTC))
    assert isinstance(found, Unavailable)


async def test_a_task_listed_on_two_pages_is_found_once() -> None:
    """Pages read while new tasks arrive shift: a task may be listed twice."""
    own = batch(["a", "b"])
    reference = api_reference(own)
    api = FakeApi(list_twice=True)
    api.states["t1"] = api_task("t1", TaskApiState.PENDING, reference=reference)
    api.states["t2"] = api_task("t2", TaskApiState.PENDING, reference=reference, age_s=-1)
    found = await Reconciler(api).find(own, REQUEST, datetime.now(UTC))
    assert found == ["t1", "t2"]
    shared = batch(["a", "b"], reference="line 7")
    ours = {"constraints": {"extended_id": ["a", "b"]}, "scm_data": {"intended_market": "DE"}}
    api.states = {"t3": api_task("t3", TaskApiState.PENDING, reference="line 7", details=ours)}
    found = await Reconciler(api).find(shared, REQUEST, datetime.now(UTC))
    assert found == ["t3"]


async def test_a_task_recorded_for_another_batch_is_never_a_candidate() -> None:
    """The same change under the same reference minutes ago (A, B, A): that task is in the
    ledger, recorded for its own batch, and cannot be this batch's."""
    shared = batch(["a", "b"], reference="line 7")
    ours = {"constraints": {"extended_id": ["a", "b"]}, "scm_data": {"intended_market": "DE"}}
    api = FakeApi()
    for task_id, age_s in (("earlier", 120), ("tombstoned", 60), ("mine", 0)):
        api.states[task_id] = api_task(
            task_id, TaskApiState.COMPLETE, reference="line 7", details=ours, age_s=age_s
        )
    known = KnownTasks()
    known.note("earlier", "b-earlier")
    known.note("tombstoned", None)  # only its tombstone was read: some other batch's
    known.note("mine", shared.batch_id)  # recorded for this very batch: still its own
    found = await Reconciler(api, known).find(shared, REQUEST, datetime.now(UTC))
    assert found == ["mine"]
    assert await Reconciler(api).find(shared, REQUEST, datetime.now(UTC), sends=3) == [
        "earlier",
        "tombstoned",
        "mine",
    ], "without the ledger's view every matching task created since the margin counts"


def test_known_tasks_keep_the_last_ones_noted() -> None:
    known = KnownTasks(limit=3)
    for task_id in ("t1", "t2", "t3"):
        known.note(task_id, f"b-{task_id}")
    known.note("t1", None)  # noted again (its tombstone): kept, and still t1's batch's
    known.note("t4", "b-t4")  # one over the bound: the least recently noted, t2, goes
    assert not known.recorded_for_another("t2", "b-x")
    assert [known.recorded_for_another(t, "b-x") for t in ("t1", "t3", "t4")] == [True] * 3
    assert not known.recorded_for_another("t1", "b-t1")


async def test_a_task_another_batch_records_while_the_lookup_reads_is_not_adopted() -> None:
    """The ledger view learns mid-lookup (between the reads of the candidates) that a
    matching task was recorded by another batch: it is not this batch's either."""
    shared = batch(["a", "b"], reference="line 7")
    ours = {"constraints": {"extended_id": ["a", "b"]}, "scm_data": {"intended_market": "DE"}}
    known = KnownTasks()

    class RecordedMeanwhile(FakeApi):
        async def task(self, task_id: str) -> ApiTask | Failure:
            known.note("first", "b-another")  # read back by the view during this read
            return await super().task(task_id)

    api = RecordedMeanwhile()
    for task_id, age_s in (("first", 2), ("second", 1)):
        api.states[task_id] = api_task(
            task_id, TaskApiState.COMPLETE, reference="line 7", details=ours, age_s=age_s
        )
    found = await Reconciler(api, known).find(shared, REQUEST, datetime.now(UTC))
    assert found == ["second"]


async def test_two_batches_with_the_same_change_take_one_task_each() -> None:
    """A repeated event under a shared reference: two batches with the same change, each
    sent once and both answers lost. Two matching tasks exist; the first batch looked up
    adopts one (the oldest), the other is left for the second batch (it was once adopted
    by both the first, and the second, finding none, sent its change a third time)."""
    first, second = batch(["a", "b"], reference="line 7"), batch(["a", "b"], reference="line 7")
    ours = {"constraints": {"extended_id": ["a", "b"]}, "scm_data": {"intended_market": "DE"}}
    api = FakeApi()
    for task_id, age_s in (("older", 2), ("newer", 1)):
        api.states[task_id] = api_task(
            task_id, TaskApiState.COMPLETE, reference="line 7", details=ours, age_s=age_s
        )
    known = KnownTasks()
    since = datetime.now(UTC) - timedelta(seconds=5)
    with capture_logs() as logs:
        assert await Reconciler(api, known).find(first, REQUEST, since, sends=1) == ["older"]
    (line,) = [entry for entry in logs if entry["event"] == "reconcile_left_matching_tasks"]
    assert (line["sends"], line["task_ids"]) == (1, ["newer"])
    known.note("older", first.batch_id)  # what recording it does
    assert await Reconciler(api, known).find(second, REQUEST, since, sends=1) == ["newer"]
    # A batch sent twice may have created both.
    both = await Reconciler(api, KnownTasks()).find(first, REQUEST, since, sends=2)
    assert both == ["older", "newer"]
