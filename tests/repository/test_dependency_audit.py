"""`make audit`'s script end to end, through the real pip-audit and PyPI's data: a pin
with a published vulnerability never passes. Where the per-version vulnerability data
can be read it fails naming the vulnerability; where it cannot, it fails saying the
package was not audited (plain pip-audit passes there: "No known vulnerabilities")."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_pin_with_a_known_vulnerability_never_passes(tmp_path: Path) -> None:
    lock = tmp_path / "requirements.txt"
    lock.write_text("jinja2==2.10\n")  # CVE-2019-10906 (PYSEC-2019-217), fixed in 2.10.1
    accepted = tmp_path / "accepted.toml"
    accepted.write_text("")
    finished = subprocess.run(
        [sys.executable, str(ROOT / "requirements" / "audit.py"), "--lock", str(lock),
         "--accepted", str(accepted)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )  # fmt: skip
    output = finished.stdout + finished.stderr
    assert finished.returncode in (1, 3), output
    if finished.returncode == 1:
        assert "VULNERABLE jinja2 2.10" in output
        assert "CVE-2019-10906" in output
    else:
        assert "NOT AUDITED jinja2" in output
        assert "this is not a pass" in output
