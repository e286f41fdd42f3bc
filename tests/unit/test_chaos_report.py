"""tests/chaos/run.py's report: a case run alone replaces its own row only."""

from __future__ import annotations

import re
from pathlib import Path

from tests.chaos.harness import Row
from tests.chaos.run import KEPT_MARK, write

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
