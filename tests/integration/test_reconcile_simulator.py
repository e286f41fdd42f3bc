"""Reconciliation against the simulator: a batch sent with its events' own reference finds
its tasks by their details, which the API shows in two forms (one value as a string, as
the vendor's example shows; several as a list)."""

from __future__ import annotations

from datetime import UTC, datetime

from devkit.simulator.state import Faults
from service.relay.reconcile import Reconciler
from service.scantrust.client import UploadRequest
from service.scantrust.outcomes import Accepted, ApiTask
from tests.api_support import client, simulator
from tests.unit.relay.support import batch

REFERENCE = "line 7"


def request(values: list[str], market: str = "DE") -> UploadRequest:
    return UploadRequest(
        constraints={"extended_id": values},
        scm_data={"intended_market": market},
        reference=REFERENCE,
    )


async def test_tasks_are_found_by_details_shown_as_a_string_or_a_list() -> None:
    changes = {
        "one value": request(["11X000001"]),
        "several values": request(["11X000002", "11X000003"]),
        "another batch": request(["11X000004"]),
        "another market": request(["11X000001"], market="FR"),
    }
    async with (
        simulator(Faults(pending_delay_s=60)) as sim,
        client(sim.base_url) as api,
    ):
        first_sent = datetime.now(UTC)
        created: dict[str, str] = {}
        for name, change in changes.items():
            outcome = await api.upload(change)
            assert isinstance(outcome, Accepted), outcome
            created[name] = outcome.task_id
        shown = await api.task(created["one value"])
        assert isinstance(shown, ApiTask)
        assert shown.details is not None
        assert shown.details["constraints"] == {"extended_id": "11X000001"}
        reconciler = Reconciler(api)
        for name in ("one value", "several values"):
            change = changes[name]
            shared = batch(change.constraints["extended_id"], "DE", reference=REFERENCE)
            assert await reconciler.find(shared, change, first_sent) == [created[name]], name
