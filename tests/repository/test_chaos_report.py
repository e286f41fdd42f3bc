"""chaos/run.py's report: a case run alone replaces its own row only."""

from __future__ import annotations

import re
from pathlib import Path

from chaos.harness import Row
from chaos.run import KEPT_MARK, write

NAMES = ["first", "second", "third"]


def test_a_case_run_alone_replaces_its_row_and_keeps_the_others(tmp_path: Path) -> None:
    report = tmp_path / "reliability.md"
    write(report, [Row(case=name, fault=f"{name} fault") for name in NAMES], 11, NAMES)
    earlier = re.sub(r"on \d{4}-\d{2}-\d{2}", "on 1999-01-01", report.read_text(), count=1)
    report.write_text(earlier + "notes\n")

    write(report, [Row(case="second", fault="second again", lost=7)], 11, NAMES)

    text = report.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "| case |" not in line]
    assert [row.split("|")[1].strip() for row in rows] == NAMES
    assert "| second again | 0 | 7 |" in rows[1]
    assert "| first fault |" in rows[0]
    assert "| third fault |" in rows[2]
    assert "second run alone, other rows kept from 1999-01-01" in text
    assert text.endswith(f"{KEPT_MARK}\nnotes\n")


def test_a_full_run_names_no_kept_rows(tmp_path: Path) -> None:
    report = tmp_path / "reliability.md"
    write(report, [Row(case="first", fault="f")], 11, NAMES)
    write(report, [Row(case=name, fault="again") for name in NAMES], 11, NAMES)
    text = report.read_text()
    assert "kept from" not in text
    assert text.count("| again |") == 3


def test_the_header_names_the_commit_and_kept_rows_keep_theirs(tmp_path: Path) -> None:
    report = tmp_path / "reliability.md"
    write(report, [Row(case=name, fault="f") for name in NAMES], 11, NAMES)
    assert re.search(r"on \d{4}-\d{2}-\d{2} at commit `\w+(\+changes)?`", report.read_text())
    earlier = re.sub(
        r"at commit `\w+(\+changes)?`", "at commit `abc1234`", report.read_text(), count=1
    )
    report.write_text(earlier)
    write(report, [Row(case="second", fault="again")], 11, NAMES)
    assert "other rows kept from " in report.read_text()
    assert "at commit `abc1234`" in report.read_text(), "a kept row lost its commit"


def test_every_row_of_the_published_report_is_a_case_that_exists() -> None:
    from chaos.cases import CASES

    text = (Path(__file__).parents[2] / "docs" / "reliability.md").read_text()
    table = text[: text.index(KEPT_MARK)]
    named = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")]
    cases = {case.__name__ for case in CASES}
    assert named[0] == "case"
    assert set(named[1:]) <= cases, f"rows of cases that no longer exist: {set(named[1:]) - cases}"
    assert set(named[1:]) == cases, f"cases with no row: {cases - set(named[1:])}"
