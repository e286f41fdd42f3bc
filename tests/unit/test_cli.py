"""The `scm-relay` entry points answer without any server."""

from __future__ import annotations

import subprocess
import sys

import pytest

from service import __version__
from service.cli import main


def test_version_is_printed(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.strip() == f"scm-relay {__version__}"


def test_no_command_prints_help_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: scm-relay" in capsys.readouterr().out


def test_python_dash_m_service_runs_the_same_cli() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "service", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"scm-relay {__version__}"
