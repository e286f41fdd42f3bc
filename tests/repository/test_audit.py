"""requirements/audit.py (`make audit`): its verdict on pip-audit's JSON report, and the
accepted-findings file. The reports have the shape pip-audit 2.10 writes with
`--format json`; the all-skipped one is what it wrote on a machine where the per-version
vulnerability data could not be read (and where plain pip-audit said "No known
vulnerabilities found")."""

from __future__ import annotations

import importlib.util
import sys
from datetime import date
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
TODAY = date(2026, 12, 6)


def load_audit() -> ModuleType:
    name = "requirements_audit"
    spec = importlib.util.spec_from_file_location(name, ROOT / "requirements" / "audit.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


audit = load_audit()

CLEAN = {"name": "yarl", "version": "1.25.1", "vulns": []}
VULNERABLE = {
    "name": "Jinja2",
    "version": "2.10",
    "vulns": [
        {
            "id": "PYSEC-2019-217",
            "fix_versions": ["2.10.1"],
            "aliases": ["CVE-2019-10906", "GHSA-462w-v97r-4m45"],
            "description": "sandbox escape",
        }
    ],
}
SKIPPED = {
    "name": "aiohttp",
    "skip_reason": "Dependency not found on PyPI and could not be audited: aiohttp (3.14.5)",
}


def report(*dependencies: dict[str, Any]) -> dict[str, Any]:
    return {"dependencies": list(dependencies), "fixes": []}


def accepted(**changes: Any) -> str:
    entry = {
        "id": '"CVE-2019-10906"',
        "package": '"jinja2"',
        "reason": '"templates come only from this repository"',
        "expires": "2027-01-31",
    } | changes
    return "[[accepted]]\n" + "".join(f"{k} = {v}\n" for k, v in entry.items() if v is not None)


def test_a_clean_report_passes_naming_how_many_were_audited() -> None:
    verdict = audit.judge(report(CLEAN, {**CLEAN, "name": "idna"}), [], TODAY)
    assert verdict.code == 0
    assert verdict.lines == ["2 packages audited: no known vulnerability"]


def test_a_known_vulnerability_fails_with_its_id_and_fix() -> None:
    verdict = audit.judge(report(CLEAN, VULNERABLE), [], TODAY)
    assert verdict.code == 1
    (line,) = verdict.lines[:1]
    assert line.startswith("VULNERABLE Jinja2 2.10: PYSEC-2019-217")
    assert "CVE-2019-10906" in line
    assert "fixed in 2.10.1" in line


def test_a_report_where_nothing_could_be_checked_is_not_a_pass() -> None:
    verdict = audit.judge(report(SKIPPED, {**SKIPPED, "name": "rich"}), [], TODAY)
    assert verdict.code == 3
    assert "NOT AUDITED aiohttp" in verdict.lines[0]
    assert "2 of 2 packages could not be checked" in verdict.lines[-1]
    assert audit.judge(report(), [], TODAY).code == 3


def test_one_unchecked_package_makes_the_audit_incomplete() -> None:
    assert audit.judge(report(CLEAN, SKIPPED), [], TODAY).code == 3
    # A vulnerability found elsewhere still fails as a vulnerability.
    assert audit.judge(report(VULNERABLE, SKIPPED), [], TODAY).code == 1


def test_an_accepted_vulnerability_passes_with_its_reason_until_it_expires() -> None:
    acceptances = audit.load_acceptances(accepted())
    verdict = audit.judge(report(CLEAN, VULNERABLE), acceptances, TODAY)
    assert verdict.code == 0
    assert verdict.lines[0].startswith("accepted until 2027-01-31: Jinja2 2.10: PYSEC-2019-217")
    assert verdict.lines[0].endswith("templates come only from this repository")
    expired = audit.judge(report(VULNERABLE), acceptances, date(2027, 2, 1))
    assert expired.code == 1
    assert "expired on 2027-01-31" in expired.lines[0]


def test_an_acceptance_holds_for_its_package_only_and_unused_ones_are_named() -> None:
    acceptances = audit.load_acceptances(accepted(package='"markupsafe"'))
    verdict = audit.judge(report(VULNERABLE), acceptances, TODAY)
    assert verdict.code == 1
    assert any("matches no finding: remove it" in line for line in verdict.lines)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (accepted(reason=None), "missing ['reason']"),
        (accepted(reason='"  "'), "reason must be a non-empty string"),
        (accepted(expires='"2027-01-31"'), "expires must be a date"),
        (accepted(owner='"me"'), "unknown ['owner']"),
        ("[accepted]\nid = 1\n", "entry 1"),
        ("ignore = []\n", "unknown top-level keys ['ignore']"),
        ("[[accepted]\n", "not TOML"),
    ],
)
def test_a_malformed_acceptance_is_refused_saying_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(audit.AcceptanceError, match=message.replace("[", r"\[")):
        audit.load_acceptances(text)


def test_the_repository_acceptances_are_valid_and_none_has_expired() -> None:
    acceptances = audit.load_acceptances(
        (ROOT / "requirements" / "audit-accepted.toml").read_text()
    )
    assert all(a.expires >= date.today() for a in acceptances)
