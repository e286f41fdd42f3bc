"""`scm-relay validate`: one verdict per line, a summary, exit codes, bounded memory."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.cli import main
from service.core.contract_limits import ContractLimits
from service.tools.validate import validate_stream

GOOD = b'{"event_id": "e1", "constraints": {"extended_id": ["0A70X1"]}, "scm_data": {"m": "DE"}}'
WARN = b'{"constraints": {"extended_id": "0A70X2"}, "scm_data": {"production_date": "27.11.2026"}}'
BAD = b'{"constraints": {"message": ["0A70X1"]}, "scm_data": {"m": "DE"}}'


def run(data: bytes, limits: ContractLimits | None = None) -> tuple[list[dict[str, object]], str]:
    out = io.StringIO()
    summary = validate_stream(io.BytesIO(data), out, limits or ContractLimits())
    return [json.loads(line) for line in out.getvalue().splitlines()], summary.describe()


def test_mixed_file_gives_one_verdict_per_line() -> None:
    verdicts, summary = run(b"\n".join([GOOD, b"not json", BAD, b"", WARN, b"\xff"]) + b"\n")
    assert verdicts == [
        {"line": 1, "ok": True},
        {
            "line": 2,
            "ok": False,
            "stage": "decode",
            "reason": "invalid_json",
            "message": "the record is not valid JSON: expected ident at line 1 column 2",
            "field": None,
        },
        {
            "line": 3,
            "ok": False,
            "stage": "validate",
            "reason": "constraint_key_message",
            "message": "Invalid constraint name, please use 'extended_id' instead of 'message'",
            "field": "constraints.message",
        },
        {
            "line": 5,
            "ok": True,
            "warnings": [
                "scm_data.production_date: '27.11.2026' is not a YYYY-MM-DD date; "
                "the API saves it as-is and the portal may show it badly"
            ],
        },
        {
            "line": 6,
            "ok": False,
            "stage": "decode",
            "reason": "not_utf8",
            "message": "the record is not UTF-8 text (byte 0): publish JSON encoded as UTF-8",
            "field": None,
        },
    ]
    assert summary == (
        "5 events: 2 valid (1 with warnings), 3 invalid "
        "(invalid_json 1, constraint_key_message 1, not_utf8 1)"
    )


def test_crlf_line_endings_and_a_last_line_without_newline() -> None:
    verdicts, _ = run(GOOD + b"\r\n" + GOOD)
    assert [v["ok"] for v in verdicts] == [True, True]


def test_an_over_long_line_is_refused_without_reading_it_whole() -> None:
    limits = ContractLimits(max_record_bytes=len(GOOD))
    huge = b'{"x": "' + b"a" * 1_000_000 + b'"}'
    verdicts, _ = run(b"\n".join([GOOD, huge, GOOD, huge]), limits)
    assert [(v["line"], v.get("reason")) for v in verdicts] == [
        (1, None),
        (2, "record_too_large"),
        (3, None),
        (4, "record_too_large"),
    ]


def test_cli_reads_a_file_and_exits_1_when_any_line_is_invalid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    events = tmp_path / "events.jsonl"
    events.write_bytes(GOOD + b"\n" + BAD + b"\n")
    assert main(["validate", str(events)]) == 1
    captured = capsys.readouterr()
    assert len(captured.out.splitlines()) == 2
    assert "2 events: 1 valid (0 with warnings), 1 invalid" in captured.err


def test_cli_exits_0_when_all_lines_are_valid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    events = tmp_path / "events.jsonl"
    events.write_bytes(GOOD + b"\n" + WARN + b"\n")
    assert main(["validate", str(events)]) == 0
    assert "2 valid (1 with warnings), 0 invalid" in capsys.readouterr().err


def test_cli_names_an_unreadable_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["validate", str(tmp_path / "missing.jsonl")]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_cli_applies_limits_from_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    events = tmp_path / "events.jsonl"
    events.write_bytes(b'{"constraints": {"extended_id": ["a", "b"]}, "scm_data": {"m": 1}}\n')
    monkeypatch.setenv("SCM_RELAY_MAX_VALUES_PER_EVENT", "1")
    assert main(["validate", str(events)]) == 1
    assert '"reason": "too_many_values"' in capsys.readouterr().out
    monkeypatch.setenv("SCM_RELAY_MAX_VALUES_PER_EVENT", "zero")
    assert main(["validate", str(events)]) == 2
    assert "SCM_RELAY_MAX_VALUES_PER_EVENT" in capsys.readouterr().err


def peak_rss_kib_validating(lines: int) -> int:
    """Peak RSS (KiB, Linux) of a `scm-relay validate -` process fed `lines` events."""
    script = (
        "import resource, sys\n"
        "from service.cli import main\n"
        "code = main(['validate', '-'])\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCM_RELAY_")}
    chunk = (GOOD + b"\n") * 1000
    with subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    ) as process:
        assert process.stdin is not None
        assert process.stderr is not None
        for _ in range(lines // 1000):
            process.stdin.write(chunk)
        process.stdin.close()
        err = process.stderr.read().decode()
        assert process.wait(timeout=300) == 0, err
    summary, peak = err.strip().splitlines()[-2:]
    assert f"{lines} events: {lines} valid" in summary
    return int(peak)


def test_memory_stays_flat_as_the_input_grows() -> None:
    small = peak_rss_kib_validating(10_000)
    large = peak_rss_kib_validating(150_000)
    # 15x the lines must not cost more than a few MiB more memory.
    assert large - small < 8 * 1024, (small, large)
