"""`make audit`: requirements/runtime.lock against known vulnerabilities.

pip-audit reads PyPI's vulnerability data for each locked package and version. Exit
codes: 0 every package was audited and none has a known vulnerability that is not
accepted; 1 a vulnerability (package, version, id, the versions that fix it), or an
accepted one whose acceptance has expired; 2 requirements/audit-accepted.toml is
malformed; 3 the audit could not be done for some package (the vulnerability data
could not be read: offline, or the service answers no per-version data). It never
passes for a package it could not check: plain pip-audit reports "No known
vulnerabilities found" when every package was skipped.

A vulnerability is accepted by an entry in requirements/audit-accepted.toml with its
id, the package, the reason and an expiry date (that file says how).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "runtime.lock"
ACCEPTED = ROOT / "requirements" / "audit-accepted.toml"
EXIT_CLEAN = 0
EXIT_VULNERABLE = 1
EXIT_BAD_ACCEPTANCE = 2
EXIT_NOT_AUDITED = 3
FIELDS = {"id", "package", "reason", "expires"}


class AcceptanceError(Exception):
    """requirements/audit-accepted.toml is malformed; the message says where."""


@dataclass(frozen=True)
class Acceptance:
    id: str
    package: str
    reason: str
    expires: date


@dataclass
class Verdict:
    code: int = EXIT_CLEAN
    lines: list[str] = field(default_factory=list)


def canonical(name: str) -> str:
    """A package name as PyPI compares them (PEP 503)."""
    return "-".join(name.lower().replace("_", "-").replace(".", "-").split("-"))


def load_acceptances(text: str) -> list[Acceptance]:
    """The `[[accepted]]` entries, each with exactly id, package, reason and expires."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise AcceptanceError(f"not TOML: {exc}") from None
    unknown = set(document) - {"accepted"}
    if unknown:
        raise AcceptanceError(f"unknown top-level keys {sorted(unknown)}: only [[accepted]]")
    found: list[Acceptance] = []
    for number, entry in enumerate(document.get("accepted", []), start=1):
        where = f"[[accepted]] entry {number}"
        if set(entry) != FIELDS:
            missing, extra = sorted(FIELDS - set(entry)), sorted(set(entry) - FIELDS)
            raise AcceptanceError(f"{where}: missing {missing}, unknown {extra}")
        if not isinstance(entry["expires"], date):
            raise AcceptanceError(f"{where}: expires must be a date (2027-01-31), unquoted")
        for name in ("id", "package", "reason"):
            if not isinstance(entry[name], str) or not entry[name].strip():
                raise AcceptanceError(f"{where}: {name} must be a non-empty string")
        found.append(
            Acceptance(entry["id"], canonical(entry["package"]), entry["reason"], entry["expires"])
        )
    return found


def judge(report: Mapping[str, Any], accepted: Sequence[Acceptance], today: date) -> Verdict:
    """The verdict on pip-audit's JSON report (`--format json`)."""
    verdict = Verdict()
    dependencies = report.get("dependencies", [])
    skipped = [dep for dep in dependencies if "skip_reason" in dep]
    used: set[Acceptance] = set()
    for dep in dependencies:
        for vuln in dep.get("vulns", []):
            ids = {vuln["id"], *vuln.get("aliases", [])}
            name = canonical(dep["name"])
            match = next((a for a in accepted if a.package == name and a.id in ids), None)
            described = (
                f"{dep['name']} {dep['version']}: {vuln['id']}"
                f" (aliases {', '.join(sorted(vuln.get('aliases', []))) or 'none'};"
                f" fixed in {', '.join(vuln.get('fix_versions', [])) or 'no release yet'})"
            )
            if match is None:
                verdict.code = EXIT_VULNERABLE
                verdict.lines.append(f"VULNERABLE {described}")
            elif match.expires < today:
                used.add(match)
                verdict.code = EXIT_VULNERABLE
                verdict.lines.append(
                    f"VULNERABLE {described}: its acceptance expired on {match.expires}; "
                    "upgrade, or review the reason and renew the date"
                )
            else:
                used.add(match)
                verdict.lines.append(f"accepted until {match.expires}: {described}: {match.reason}")
    for acceptance in accepted:
        if acceptance not in used:
            verdict.lines.append(
                f"note: the acceptance of {acceptance.id} ({acceptance.package}) matches no "
                "finding: remove it"
            )
    audited = len(dependencies) - len(skipped)
    if skipped or not dependencies:
        if verdict.code == EXIT_CLEAN:
            verdict.code = EXIT_NOT_AUDITED
        verdict.lines += [f"NOT AUDITED {dep['name']}: {dep['skip_reason']}" for dep in skipped]
        verdict.lines.append(
            f"the audit is incomplete: {len(skipped)} of {len(dependencies)} packages could "
            "not be checked (their vulnerability data could not be read); this is not a pass"
        )
    elif verdict.code == EXIT_CLEAN:
        verdict.lines.append(f"{audited} packages audited: no known vulnerability")
    return verdict


def run_pip_audit(lock: Path, report: Path) -> subprocess.CompletedProcess[str]:
    # --disable-pip: the lock pins every package, nothing is installed or resolved.
    pinning = "--require-hashes" if "--hash=" in lock.read_text() else "--no-deps"
    return subprocess.run(  # noqa: S603 - this interpreter's pip-audit, fixed arguments
        [
            sys.executable, "-m", "pip_audit", "--requirement", str(lock), pinning,
            "--disable-pip", "--progress-spinner", "off", "--timeout", "30",
            "--format", "json", "--output", str(report),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lock", type=Path, default=LOCK, help="the requirements to audit")
    parser.add_argument("--accepted", type=Path, default=ACCEPTED, help="accepted findings")
    args = parser.parse_args(argv)
    try:
        accepted = load_acceptances(args.accepted.read_text())
    except (OSError, AcceptanceError) as exc:
        print(f"audit: {args.accepted}: {exc}", file=sys.stderr)
        return EXIT_BAD_ACCEPTANCE
    with tempfile.TemporaryDirectory() as scratch:
        report_file = Path(scratch) / "report.json"
        finished = run_pip_audit(args.lock, report_file)
        if finished.returncode not in (0, 1) or not report_file.exists():
            print(finished.stderr.strip()[-2000:], file=sys.stderr)
            print(
                f"audit: pip-audit could not run (exit {finished.returncode}); "
                "the dependencies were not audited",
                file=sys.stderr,
            )
            return EXIT_NOT_AUDITED
        report = json.loads(report_file.read_text())
    verdict = judge(report, accepted, date.today())
    for line in verdict.lines:
        print(f"audit: {line}", file=sys.stderr if verdict.code else sys.stdout)
    return verdict.code


if __name__ == "__main__":
    sys.exit(main())
