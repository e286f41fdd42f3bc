"""The result record of a finished task: its state, its shortfall or excess against
the codes its events expected, and what it carries from the ledger and the API."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from service.core.records import TaskLedgerRecord, TaskState
from service.core.task_outcomes import task_outcome
from tests.unit.core.test_records import NOW as SUBMITTED
from tests.unit.core.test_records import ledger as record_of_two_codes

PUBLISHED = SUBMITTED + timedelta(minutes=5)


@dataclass(frozen=True)
class Task:
    finished_well: bool
    codes_affected: int | None
    created_at: datetime | None = SUBMITTED + timedelta(seconds=1)
    started_at: datetime | None = SUBMITTED + timedelta(seconds=2)
    completed_at: datetime | None = SUBMITTED + timedelta(seconds=3)


def ledger(expected_codes: int | None = 2) -> TaskLedgerRecord:
    return record_of_two_codes().model_copy(update={"expected_codes": expected_codes})


def test_a_complete_task_short_of_its_codes_says_by_how_many() -> None:
    entry, task = ledger(), Task(finished_well=True, codes_affected=1)
    outcome = task_outcome(entry, task, published_at=PUBLISHED)
    assert outcome.state is TaskState.COMPLETE
    assert (outcome.codes_affected, outcome.expected_codes) == (1, 2)
    assert (outcome.shortfall, outcome.short, outcome.excess, outcome.over) == (1, True, 0, False)
    assert outcome.api_details is None


def test_a_complete_task_over_its_codes_says_by_how_many() -> None:
    outcome = task_outcome(ledger(), Task(True, 5), published_at=PUBLISHED)
    assert (outcome.shortfall, outcome.short, outcome.excess, outcome.over) == (0, False, 3, True)


def test_a_complete_task_that_names_no_count_touched_none() -> None:
    outcome = task_outcome(ledger(), Task(True, None), published_at=PUBLISHED)
    assert outcome.codes_affected is None
    assert (outcome.shortfall, outcome.short, outcome.excess, outcome.over) == (2, True, 0, False)


def test_a_complete_task_with_the_expected_count_is_neither_short_nor_over() -> None:
    outcome = task_outcome(ledger(), Task(True, 2), published_at=PUBLISHED)
    assert (outcome.shortfall, outcome.short, outcome.excess, outcome.over) == (0, False, 0, False)


def test_without_an_expectation_nothing_is_short_or_over() -> None:
    outcome = task_outcome(ledger(expected_codes=None), Task(True, 7), published_at=PUBLISHED)
    assert outcome.expected_codes is None
    assert (outcome.shortfall, outcome.short, outcome.excess, outcome.over) == (
        None,
        False,
        None,
        False,
    )


def test_a_failed_task_is_never_short_and_carries_the_api_s_details() -> None:
    details = {"error": "campaign 11 is archived"}
    outcome = task_outcome(ledger(), Task(False, 0), details, published_at=PUBLISHED)
    assert outcome.state is TaskState.FAILED
    assert (outcome.shortfall, outcome.short, outcome.excess, outcome.over) == (
        None,
        False,
        None,
        False,
    )
    assert outcome.api_details == details


def test_the_result_carries_what_was_sent_and_when_each_step_happened() -> None:
    entry, task = ledger(), Task(True, 2)
    outcome = task_outcome(entry, task, published_at=PUBLISHED)
    assert outcome.task_id == entry.task_id
    assert (outcome.campaign, outcome.reference) == (entry.campaign, entry.reference)
    assert (outcome.scm_data, outcome.constraints) == (entry.scm_data, entry.constraints)
    assert outcome.events == entry.events
    assert outcome.submitted_at == SUBMITTED
    assert (outcome.created_at, outcome.started_at, outcome.completed_at) == (
        task.created_at,
        task.started_at,
        task.completed_at,
    )
    assert outcome.published_at == PUBLISHED
