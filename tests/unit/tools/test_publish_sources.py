"""service/tools/sources.py: CSV rows and JSON lines into events, without Kafka."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from service.core.contract_limits import DEFAULT_LIMITS
from service.tools.sources import CsvEvents, HeaderError, JsonLinesEvents, judge


def csv_events(text: str, **options: Any) -> tuple[list[dict[str, Any]], CsvEvents]:
    source = CsvEvents(io.StringIO(text), DEFAULT_LIMITS, **options)
    drafts = list(source.events())
    return [draft.document for draft in drafts], source


def test_rows_with_the_same_data_become_one_event_and_empty_cells_change_nothing() -> None:
    events, source = csv_events(
        "extended_id,production_date,lot\nA1,2026-11-27,\nA2,2026-11-28,L7\nA3,2026-11-27,\n",
        campaign=11,
        reference="line 7",
    )
    assert events == [
        {
            "constraints": {"extended_id": ["A1", "A3"]},
            "scm_data": {"production_date": "2026-11-27"},
            "campaign": 11,
            "reference": "line 7",
        },
        {
            "constraints": {"extended_id": ["A2"]},
            "scm_data": {"production_date": "2026-11-28", "lot": "L7"},
            "campaign": 11,
            "reference": "line 7",
        },
    ]
    assert source.rows == 3
    assert source.problems == []


def test_a_group_is_cut_at_values_per_event() -> None:
    rows = "".join(f"C{n},DE\n" for n in range(7))
    events, _ = csv_events("serial_number,intended_market\n" + rows, values_per_event=3)
    assert [len(e["constraints"]["serial_number"]) for e in events] == [3, 3, 1]


def test_grouping_holds_a_bounded_number_of_values_sending_the_oldest_group_first() -> None:
    rows = "".join(f"C{n},{'DE' if n % 2 else 'FR'}\n" for n in range(10))
    events, _ = csv_events("extended_id,intended_market\n" + rows, max_buffered_values=3)
    # Never more than 3 values held: groups leave early, the oldest first.
    assert sum(len(e["constraints"]["extended_id"]) for e in events) == 10
    assert len(events) > 2
    assert events[0]["scm_data"] == {"intended_market": "FR"}


def test_the_constraint_column_can_be_named() -> None:
    events, _ = csv_events("lot,rfid\nL1,E200\nL1,E201\n", constraint="rfid")
    assert events == [{"constraints": {"rfid": ["E200", "E201"]}, "scm_data": {"lot": "L1"}}]


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("extended_id,lot,lot\n", "column 3 'lot' repeats column 2"),
        ("extended_id,lot number\n", "not a valid field key"),
        ("extended_id, lot\n", "white space around its name"),
        ("extended_id,,lot\n", "column 2 has no name"),
        ("extended_id\n", "no SCM key to change"),
        ("extended_id,status\n", "activation_status"),
        ("message,lot\n", "extended_id"),
    ],
)
def test_a_bad_header_is_refused_before_any_row(header: str, message: str) -> None:
    with pytest.raises(HeaderError, match=message):
        csv_events(header + "A1,x\n")


def test_an_empty_file_needs_a_header() -> None:
    with pytest.raises(HeaderError, match="the file is empty"):
        csv_events("")


def test_an_unknown_constraint_column_is_named() -> None:
    with pytest.raises(HeaderError, match="--constraint 'rfid' is not a column"):
        csv_events("extended_id,lot\nA1,L\n", constraint="rfid")


def test_row_problems_name_their_line_and_the_rest_is_read() -> None:
    events, source = csv_events(
        "extended_id,lot\n"
        "A1,L1\n"
        ",L1\n"  # no code
        "A2\n"  # a cell short
        "A1,L1\n"  # the same code with the same data again
        "A3,\n"  # nothing to change
        "\n"  # a blank line: skipped, not a problem
        "A4,L1\n"
    )
    assert events == [{"constraints": {"extended_id": ["A1", "A4"]}, "scm_data": {"lot": "L1"}}]
    assert [(p.line, p.reason) for p in source.problems] == [
        (3, "csv_no_constraint"),
        (4, "csv_cell_count"),
        (5, "csv_duplicate_code"),
        (6, "csv_nothing_to_change"),
    ]


def test_a_broken_quote_stops_the_read_at_its_line() -> None:
    _, source = csv_events('extended_id,lot\nA1,"L1\nA2,L2\n')
    assert [p.reason for p in source.problems] == ["csv_malformed"]


def test_quoted_cells_keep_commas_and_line_numbers_follow_the_file() -> None:
    events, source = csv_events('extended_id,reference_note\nA1,"a, b"\nA2,"two\nlines"\n')
    assert events[0]["scm_data"] == {"reference_note": "a, b"}
    drafts = list(
        CsvEvents(io.StringIO('extended_id,note\nA1,"x\ny"\nA2,z\n'), DEFAULT_LIMITS).events()
    )
    assert [(d.first_line, d.last_line) for d in drafts] == [(3, 3), (4, 4)]
    assert source.problems == []


def test_the_contract_judges_each_event_with_its_id() -> None:
    (draft,) = CsvEvents(io.StringIO("extended_id,lot\nA1, L1\n"), DEFAULT_LIMITS).events()
    value, problem = judge(draft, "csv-0123-2", DEFAULT_LIMITS)
    assert json.loads(value)["event_id"] == "csv-0123-2"
    assert problem is not None
    assert problem.reason == "scm_data_value_whitespace"
    assert problem.line == 2


def test_json_lines_keep_their_own_ids_and_report_bad_lines() -> None:
    lines = (
        b'{"event_id": "mine", "constraints": {"extended_id": ["A1"]}, "scm_data": {"lot": "1"}}\n'
        b"\n"
        b"{not json\n"
        b'{"constraints": {"extended_id": ["A2"]}, "scm_data": {"lot": "1"}}\n'
    )
    source = JsonLinesEvents(io.BytesIO(lines), DEFAULT_LIMITS, campaign=11)
    drafts = list(source.events())
    assert [d.first_line for d in drafts] == [1, 4]
    assert [(p.line, p.reason) for p in source.problems] == [(3, "invalid_json")]
    first = json.loads(drafts[0].with_id("jsonl-x-1"))
    second = json.loads(drafts[1].with_id("jsonl-x-4"))
    assert first["event_id"] == "mine"
    assert second["event_id"] == "jsonl-x-4"
    assert second["campaign"] == 11


def test_a_json_line_with_several_constraint_keys_counts_all_its_values() -> None:
    lines = (
        b'{"constraints": {"serial_number": ["S1", "S2"], "rfid": "R"}, "scm_data": {"lot": "1"}}\n'
        b'{"constraints": {"serial_number": ["S3"]}, "scm_data": {"lot": "1"}}\n'
        b'{"constraints": {"serial_number": "S4", "rfid": ["R4"]}, "scm_data": {"lot": "1"}}\n'
    )
    drafts = list(JsonLinesEvents(io.BytesIO(lines), DEFAULT_LIMITS).events())
    assert [draft.values for draft in drafts] == [3, 1, 2]
    # The publish key names every constraint key: the same keys, the same key.
    assert drafts[0].group == drafts[2].group != drafts[1].group
