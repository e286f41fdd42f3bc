"""Reconciliation: the tasks an ambiguous upload created, found by reference."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from service.relay.reconcile import Reconciler, api_reference, same_change
from service.scantrust.client import UploadRequest
from service.scantrust.outcomes import TaskApiState, Unavailable
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
