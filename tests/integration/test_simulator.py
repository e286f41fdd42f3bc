"""The simulator follows the vendor's documentation, and is strict where it is silent.

Raw HTTP on loopback, so the exact status codes and bodies are checked.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from devkit.simulator.seed import Seed, SeedCampaign, SeedCode
from devkit.simulator.state import USER_SCOPE, Faults
from tests.api_support import TOKEN, Simulator, simulator

AUTH = {"Authorization": f"UAT {TOKEN}"}
UPLOAD = "/api/v2/scm/upload/async/"


@asynccontextmanager
async def session_on(sim: Simulator) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=sim.base_url, headers=AUTH) as session:
        yield session


async def post(session: aiohttp.ClientSession, path: str, body: Any) -> tuple[int, Any]:
    async with session.post(path, json=body) as response:
        return response.status, await response.json()


async def get(session: aiohttp.ClientSession, path: str) -> tuple[int, Any]:
    async with session.get(path) as response:
        return response.status, await response.json()


def upload_body(**fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "constraints": {"extended_id": ["11X000001"]},
        "scm_data": {"intended_market": "DE"},
    }
    body.update(fields)
    return {k: v for k, v in body.items() if v is not ...}


async def wait_complete(session: aiohttp.ClientSession, task_id: str) -> dict[str, Any]:
    for _ in range(500):
        _, task = await get(session, f"/api/v2/scm/tasks/{task_id}/")
        if task["state"] in ("complete", "failed"):
            return dict(task)
        await asyncio.sleep(0.01)
    raise AssertionError(f"task {task_id} did not finish")


@pytest.mark.parametrize(
    ("body", "status", "errors"),
    [
        (
            upload_body(
                campaign="11",
                scm_data={"extended_id": "x", "status": "1"},
                constraints={"message": ["11X000001"]},
            ),
            400,
            {
                "campaign": ["Incorrect type. Expected pk value, received str."],
                "scm_data": {
                    "extended_id": "Invalid key name",
                    "status": "Invalid key name, use 'activation_status' instead",
                },
                "constraints": {
                    "message": "Invalid constraint name, please use 'extended_id' instead"
                },
            },
        ),
        (
            upload_body(scm_data={"product_id": "p", "serial_number": "s", "message": "m"}),
            400,
            {
                "scm_data": {
                    "product_id": "Invalid key name, use 'product' instead",
                    "serial_number": "Invalid key name",
                    "message": "Invalid key name",
                }
            },
        ),
        (
            upload_body(constraints={"product": "p", "campaign_id": "1"}),
            400,
            {
                "constraints": {
                    "product": "Invalid constraint name",
                    "campaign_id": "Invalid constraint name",
                }
            },
        ),
        (
            upload_body(constraints={f"k{i}": "v" for i in range(6)}),
            400,
            {"constraints": ["At most 5 constraints are allowed."]},
        ),
        (
            upload_body(constraints={"extended_id": [f"c{i}" for i in range(1001)]}),
            400,
            {"constraints": ["At most 1000 values are allowed."]},
        ),
        (
            upload_body(constraints={"extended_id": [f"c{i}" for i in range(600)],
                                     "rfid": [f"r{i}" for i in range(401)]}),
            400,
            {"constraints": ["At most 1000 values are allowed."]},
        ),
        (
            upload_body(constraints={"extended_id": ["a", " "]}),
            400,
            {"constraints": {"extended_id": "Blank values are not allowed."}},
        ),
        (
            upload_body(constraints={"extended_id": ["a", "a"]}),
            400,
            {"constraints": {"extended_id": "Duplicate values are not allowed."}},
        ),
        (
            upload_body(constraints={"extended_id": [1]}, scm_data={"lot": 2}),
            400,
            {
                "constraints": {"extended_id": "Values must be strings."},
                "scm_data": {"lot": "Values must be strings."},
            },
        ),
        (
            upload_body(scm_data={"activation_status": "3", "blacklist_reason": "11"}),
            400,
            {
                "scm_data": {
                    "activation_status": "Invalid value, use 0 (inactive), 1 (active) "
                    "or 2 (blacklisted)",
                    "blacklist_reason": "Invalid value, use 0 to 10",
                }
            },
        ),
        (
            upload_body(campaign=99),
            400,
            {"campaign": ['Invalid pk "99" - object does not exist.']},
        ),
        (
            upload_body(campaign=12, constraints={"rfid": "E2801160000001"}),
            400,
            {"constraints": {
                "rfid": "Invalid constraint name, 'rfid' is not a field of campaign 12"
            }},
        ),
        (
            upload_body(constraints=..., scm_data=...),
            400,
            {"constraints": ["This field is required."], "scm_data": ["This field is required."]},
        ),
        (upload_body(scm_data={}), 400, {"scm_data": ["At least one field is required."]}),
        (
            # The vendor's own example: "the server checks that client_custom_field is a
            # field of campaign 11" (it is not one in the simulator's campaign 11).
            {
                "constraints": {"rfid": ["rfid1", "rfid2", "rfid3"]},
                "scm_data": {"client_custom_field": "some_val"},
                "campaign": 11,
                "reference": "SCM upload 11202020-10",
            },
            400,
            {"scm_data": {
                "client_custom_field":
                    "Invalid key name, 'client_custom_field' is not a field of campaign 11"
            }},
        ),
        (
            upload_body(campaign=11, scm_data={"lot": "L1", "batch_number": "B1",
                                               "status": "1", "product": "SKU-Z"}),
            400,
            {"scm_data": {
                "lot": "Invalid key name, 'lot' is not a field of campaign 11",
                "status": "Invalid key name, use 'activation_status' instead",
            }},
        ),
        (
            upload_body(constraints={"extended_id": ["11X000001", "11X\u0000000002"]}),
            400,
            {"constraints": {"extended_id": "Control and format characters are not allowed: "
                                            "U+0000 (Cc) at position 3."}},
        ),
        (
            upload_body(constraints={"rfid": ["E28\u200b01160000001"], "extended_id": ["a\n"]},
                        scm_data={"lot": "L\u202e1", "intended_market": "\u001b[31mDE"}),
            400,
            {
                "constraints": {
                    "rfid": "Control and format characters are not allowed: "
                            "U+200B (Cf) at position 3.",
                    "extended_id": "Control and format characters are not allowed: "
                                   "U+000A (Cc) at position 1.",
                },
                "scm_data": {
                    "lot": "Control and format characters are not allowed: "
                           "U+202E (Cf) at position 1.",
                    "intended_market": "Control and format characters are not allowed: "
                                       "U+001B (Cc) at position 0.",
                },
            },
        ),
        (
            upload_body(reference="line 7\r\n", scm_data={"lot\t": "L1"}),
            400,
            {
                "scm_data": {"lot\t": "Control and format characters are not allowed: "
                                      "U+0009 (Cc) at position 3."},
                "reference": ["Control and format characters are not allowed: "
                              "U+000D (Cc) at position 6."],
            },
        ),
    ],
    ids=[
        "documented example",
        "scm_data keys",
        "constraint keys",
        "more than 5 keys",
        "more than 1000 values",
        "1000 values across keys",
        "blank value",
        "duplicate value",
        "non-string values",
        "special values",
        "unknown campaign",
        "constraint key not in campaign",
        "missing fields",
        "empty scm_data",
        "vendor example: scm_data key not in campaign",
        "scm_data keys not in campaign",
        "NUL in a constraint value",
        "format and control characters in values",
        "control characters in the reference and a key",
    ],
)  # fmt: skip
async def test_upload_validation_answers_the_documented_400(
    body: dict[str, Any], status: int, errors: dict[str, Any]
) -> None:
    async with simulator() as sim, session_on(sim) as session:
        assert await post(session, UPLOAD, body) == (status, errors)
        assert sim.account.stats.uploads_accepted == 0


async def test_codes_affected_counts_real_matches_and_fields_outside_the_campaign_are_dropped() -> (
    None
):
    async with simulator() as sim, session_on(sim) as session:
        body = upload_body(
            constraints={"serial_number": ["SN11-000003", "SN12-000003", "SN99-000000"]},
            scm_data={"lot": "L-1"},  # lot is a field of campaign 12 only
        )
        status, answer = await post(session, UPLOAD, body)
        assert status == 200
        task = await wait_complete(session, answer["task_id"])
        assert task["codes_affected"] == 1
        assert task["details"] == {"constraints": body["constraints"], "scm_data": body["scm_data"]}
        _, in_12 = await sim.get("/_sim/codes?serial_number=SN12-000003")
        _, in_11 = await sim.get("/_sim/codes?serial_number=SN11-000003")
        assert in_12["scm_data"]["lot"] == "L-1"
        assert "lot" not in in_11["scm_data"]
        assert in_11["history"] == []


async def test_details_show_one_value_as_a_string_and_several_as_a_list() -> None:
    """As the vendor's task example shows `"constraints": {"rfid": "test_rfid"}`; the list
    form for several values is the simulator's assumption."""
    async with simulator() as sim, session_on(sim) as session:
        body = upload_body(
            constraints={"extended_id": ["11X000001"], "serial_number": ["SN11-000002", "SN11-3"]}
        )
        status, answer = await post(session, UPLOAD, body)
        assert status == 200
        for path in (f"/api/v2/scm/tasks/{answer['task_id']}/", f"/_sim/tasks/{answer['task_id']}"):
            _, task = await get(session, path)
            assert task["details"] == {
                "constraints": {
                    "extended_id": "11X000001",
                    "serial_number": ["SN11-000002", "SN11-3"],
                },
                "scm_data": {"intended_market": "DE"},
            }, path


async def test_scm_field_constraints_select_by_value_and_special_keys_apply() -> None:
    async with simulator() as sim, session_on(sim) as session:
        body = upload_body(
            constraints={"case_number": "CASE-00000"},  # the first 24 codes of campaign 11
            scm_data={"activation_status": "2", "blacklist_reason": "4", "product": "SKU-Z"},
            campaign=11,
        )
        _, answer = await post(session, UPLOAD, body)
        task = await wait_complete(session, answer["task_id"])
        assert task["codes_affected"] == 24
        _, code = await sim.get("/_sim/codes?extended_id=11X000023")
        assert (code["activation_status"], code["blacklist_reason"], code["product"]) == (
            "2",
            "4",
            "SKU-Z",
        )


async def test_history_records_the_order_updates_were_applied() -> None:
    async with simulator() as sim, session_on(sim) as session:
        task_ids = []
        for market in ("A", "B", "A"):
            _, answer = await post(
                session, UPLOAD, upload_body(scm_data={"intended_market": market})
            )
            await wait_complete(session, answer["task_id"])
            task_ids.append(answer["task_id"])
        _, code = await sim.get("/_sim/codes?extended_id=11X000001")
        assert [entry["set"]["intended_market"] for entry in code["history"]] == ["A", "B", "A"]
        assert [entry["task_id"] for entry in code["history"]] == task_ids
        sequences = [entry["sequence"] for entry in code["history"]]
        assert sequences == sorted(sequences)


async def test_concurrent_tasks_can_finish_out_of_submission_order() -> None:
    """With processing jitter, a later task may overtake an earlier one, as a busy API may:
    so the relay's ordering guarantee is tested against a simulator that can break it."""
    jittery = Faults(pending_delay_s=0.0, progress_delay_s=0.0, jitter_s=0.2)
    async with simulator(jittery) as sim, session_on(sim) as session:
        answers = []
        for market in [f"M{i}" for i in range(8)]:
            _, answer = await post(
                session, UPLOAD, upload_body(scm_data={"intended_market": market})
            )
            answers.append(answer["task_id"])
        for task_id in answers:
            await wait_complete(session, task_id)
        _, code = await sim.get("/_sim/codes?extended_id=11X000001")
        applied = [entry["task_id"] for entry in code["history"]]
        assert sorted(applied) == sorted(answers)
        assert applied != answers, "8 jittered tasks all finished in submission order"


async def test_task_states_move_pending_in_progress_complete_after_the_delays() -> None:
    slow = Faults(pending_delay_s=0.3, progress_delay_s=0.3, jitter_s=0.0)
    async with simulator(slow) as sim, session_on(sim) as session:
        _, answer = await post(session, UPLOAD, upload_body())
        path = f"/api/v2/scm/tasks/{answer['task_id']}/"
        _, task = await get(session, path)
        assert (task["state"], task["started_at"], task["codes_affected"]) == (
            "pending",
            None,
            None,
        )
        await asyncio.sleep(0.45)
        _, task = await get(session, path)
        assert task["state"] == "in-progress"
        assert task["started_at"] is not None
        await asyncio.sleep(0.4)
        _, task = await get(session, path)
        assert (task["state"], task["codes_affected"]) == ("complete", 1)
        assert task["created_at"] <= task["started_at"] <= task["completed_at"]


async def test_authentication_answers() -> None:
    async with simulator() as sim, aiohttp.ClientSession(base_url=sim.base_url) as session:
        async with session.get("/api/v2/me/") as response:
            assert response.status == 401
            assert await response.json() == {
                "detail": "Authentication credentials were not provided."
            }
        for header in (f"Token {TOKEN}", "UAT other", f"UAT  {TOKEN}"):
            async with session.get("/api/v2/me/", headers={"Authorization": header}) as response:
                assert response.status == 401, header
                assert await response.json() == {"detail": "Invalid token."}


async def test_uploads_over_ten_per_second_get_the_documented_429() -> None:
    async with simulator() as sim, session_on(sim) as session:
        statuses = [(await post(session, UPLOAD, upload_body()))[0] for _ in range(10)]
        assert statuses == [200] * 10
        status, body = await post(session, UPLOAD, upload_body())
        assert status == 429
        assert body["code"] == "throttled"
        # DRF's Throttled: the wait rounded up to whole seconds, "second" for one.
        assert body["detail"] == "Request was throttled. Expected available in 1 second."
        # Reads are not uploads: the scm_update limit does not apply to them.
        assert (await get(session, "/api/v2/me/"))[0] == 200


async def test_a_one_way_delay_is_spent_before_the_request_arrives_and_is_counted() -> None:
    """Set at run time; the throttle counts the request when it arrives, after its delay."""
    async with simulator() as sim, session_on(sim) as session:
        knobs = await sim.set_faults(one_way_delay_s=0.4)
        assert knobs["one_way_delay_s"] == 0.4
        # The delay is the request's first draw from the account's seeded dice: read it
        # from a copy of them.
        dice = random.Random()
        dice.setstate(sim.account.rng.getstate())
        travel = dice.uniform(0.0, 0.4)
        assert travel > 0.1, "this seed draws too short a delay to see"
        loop = asyncio.get_running_loop()
        sent = loop.time()
        assert (await get(session, "/api/v2/me/"))[0] == 200
        answered = loop.time()
        (arrived,) = sim.account.counted_arrivals(USER_SCOPE, TOKEN)
        # (The event loop may wake a timer up to its clock resolution, 1 ns, early.)
        assert sent + travel - 1e-6 <= arrived <= answered
        assert answered - sent >= travel - 1e-6


async def test_list_pages_carry_next_and_previous_links() -> None:
    async with simulator(Faults(page_size=2)) as sim, session_on(sim) as session:
        for _ in range(5):
            _, answer = await post(session, UPLOAD, upload_body())
            await wait_complete(session, answer["task_id"])
        _, first = await get(session, "/api/v2/scm/tasks/?state=complete")
        assert first["previous"] is None
        assert first["next"].startswith(sim.base_url)
        assert "state=complete" in first["next"]
        _, last = await get(session, "/api/v2/scm/tasks/?page=3")
        assert (last["count"], len(last["results"]), last["next"]) == (5, 1, None)
        assert (await get(session, "/api/v2/scm/tasks/?page=4"))[0] == 404
        status, body = await get(session, "/api/v2/scm/tasks/?state=done")
        assert status == 400
        assert body == {
            "state": ["Select a valid choice. done is not one of the available choices."]
        }


async def test_fault_knobs_are_validated() -> None:
    async with simulator() as sim, aiohttp.ClientSession() as session:
        url = f"{sim.base_url}/_sim/faults"
        async with session.post(url, json={"error_rate": 2}) as response:
            assert response.status == 400
        async with session.post(url, json={"no_such_knob": 1}) as response:
            assert response.status == 400
        assert sim.account.faults.error_rate == 0


def test_seed_file_is_checked(tmp_path: Path) -> None:
    seed = Seed(
        campaigns=[SeedCampaign(id=5, scm_fields=["rfid"])],
        codes=[SeedCode(extended_id="X1", campaign=5, scm_data={"rfid": "R1"})],
    )
    good = tmp_path / "seed.json"
    good.write_text(seed.model_dump_json())
    bad = tmp_path / "bad.json"
    bad.write_text(
        json.dumps(
            {
                "campaigns": [{"id": 5, "scm_fields": ["rfid"]}],
                "codes": [{"extended_id": "X1", "campaign": 5, "scm_data": {"lot": "1"}}],
            }
        )
    )
    run = [sys.executable, "-m", "service", "simulator", "--port", "0", "--token", "t"]
    failed = subprocess.run(
        [*run, "--seed", str(bad)], capture_output=True, text=True, timeout=60, check=False
    )
    assert failed.returncode == 2
    assert "campaign 5 does not define" in failed.stderr
    with subprocess.Popen(
        [*run, "--seed", str(good), "--fault", "error_rate=0.5", "--fault", "one_way_delay_s=0.03"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("SCM_RELAY_")},
    ) as process:
        assert process.stdout is not None
        assert process.stderr is not None
        base_url = process.stdout.readline().strip()
        assert base_url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(f"{base_url}/_sim/faults", timeout=30) as answer:  # noqa: S310 - the loopback URL it printed
            knobs = json.load(answer)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
        banner = process.stderr.read()
    assert "LOCAL SIMULATION of the documented Scantrust SCM upload API" in banner
    assert "1 codes in campaigns 5" in banner
    assert (knobs["error_rate"], knobs["one_way_delay_s"]) == (0.5, 0.03)


def test_help_says_it_is_a_simulation() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service", "simulator", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "LOCAL SIMULATION" in result.stdout
    assert "not Scantrust" in result.stdout


def test_simulator_needs_a_token() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCM_RELAY_")}
    result = subprocess.run(
        [sys.executable, "-m", "service", "simulator", "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert result.returncode == 2
    assert "give --token or set SCM_RELAY_API_TOKEN" in result.stderr
