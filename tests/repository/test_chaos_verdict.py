"""The fault suite's verdict (chaos): it fails on what it must find."""

from __future__ import annotations

import json
import random
from collections import defaultdict

from chaos.backlog import INVALID, interleaved
from chaos.harness import CodeVerdict, Row, code_verdict, dead_letter_verdict
from chaos.run import line

EXPECTED = {"X1": ["G1"], "X2": ["G0", "G3", "G0"], "X3": ["G2"]}


def test_a_clean_history_is_clean() -> None:
    assert code_verdict(EXPECTED, EXPECTED.__getitem__) == CodeVerdict()


def test_lost_twice_reordered_and_wrong_ends_are_each_found() -> None:
    histories = {"X1": [], "X2": ["G0", "G0", "G3"], "X3": ["G2", "G2"]}
    assert code_verdict(EXPECTED, histories.__getitem__) == CodeVerdict(
        lost=1, twice=1, out_of_order=1, wrong_end=2
    )


def test_a_resent_change_that_reverts_a_later_one_is_twice_and_at_the_wrong_value() -> None:
    # A, B, A with the first A's request sent again after B: A, B, A, ... then B again.
    histories = {**EXPECTED, "X2": ["G0", "G3", "G0", "G3"]}
    assert code_verdict(EXPECTED, histories.__getitem__) == CodeVerdict(twice=1, wrong_end=1)


def test_a_lost_dead_letter_and_a_duplicate_do_not_cancel_out() -> None:
    invalid = [("in", 0, 5), ("in", 1, 9)]
    assert dead_letter_verdict(invalid, [("in", 0, 5), ("in", 1, 9)]) == (0, 0, 0)
    assert dead_letter_verdict(invalid, [("in", 0, 5), ("in", 0, 5)]) == (2, 1, 1)
    assert dead_letter_verdict(invalid, [("in", 0, 5), ("in", 2, 9)]) == (2, 1, 0)


def test_a_skipped_case_is_not_clean_and_shows_no_figures() -> None:
    row = Row(case="network_cut", fault="cut", skipped="needs root")
    assert not row.clean
    assert "**skipped**: needs root" in line(row)
    assert " 0 |" not in line(row)


def test_the_interleaved_backlog_is_what_its_verdict_assumes() -> None:
    backlog = interleaved(random.Random(3), events=400, partitions=6, sequences=10, invalid=4)
    named: defaultdict[str, list[tuple[int, str]]] = defaultdict(list)
    invalid = 0
    for partition, lane in enumerate(backlog.partitions):
        for record in lane:
            if record == INVALID:
                invalid += 1
                continue
            event = json.loads(record)
            for code in event["constraints"]["extended_id"]:
                named[code].append((partition, event["scm_data"]["batch_number"]))
    assert invalid == 4
    assert backlog.largest >= 1000
    groups = {value for changes in named.values() for _, value in changes}
    assert groups == {f"G{g}" for g in range(5)}
    # Each code's changes in one partition, in the order the verdict expects.
    for code, changes in named.items():
        assert len({partition for partition, _ in changes}) == 1, code
        assert [value for _, value in changes] == backlog.expected[code], code
    assert set(named) == set(backlog.expected)
    assert sum(1 for wanted in backlog.expected.values() if len(wanted) == 3) > 10
