"""The built wheel stands alone: installed without dev dependencies, outside the repository,
and holds the relay and the operator tools only (no development kit: no simulator, demo,
schema or settings generator, and no broker script)."""

from __future__ import annotations

import json
import os
import subprocess
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UV = ROOT / ".tools" / "bin" / "uv"
EXAMPLES = ROOT / "schemas" / "examples"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel `uv build` makes of the repository, as the image's build stage does."""
    assert UV.exists(), "run `make setup` first (it installs uv into .tools/)"
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [str(UV), "build", "--wheel", "--out-dir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (built,) = out.glob("scm_relay-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with the wheel and the runtime lock only; its bin dir."""
    venv = tmp_path_factory.mktemp("wheel") / "venv"
    subprocess.run([str(UV), "venv", "--quiet", str(venv)], check=True, timeout=120)
    python = str(venv / "bin" / "python")
    install = [str(UV), "pip", "install", "--quiet", "--python", python]
    lock = str(ROOT / "requirements" / "runtime.lock")
    subprocess.run([*install, "--require-hashes", "-r", lock], check=True, timeout=300)
    subprocess.run([*install, "--no-deps", str(wheel)], check=True, timeout=120)
    return venv / "bin"


def run(
    bin_dir: Path, *args: str, stdin: bytes = b"", cwd: Path
) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCM_RELAY_")}
    return subprocess.run(
        [str(bin_dir / "scm-relay"), *args],
        input=stdin,
        capture_output=True,
        timeout=120,
        cwd=cwd,
        env=env,
        check=False,
    )


def test_no_dev_dependency_is_installed(installed: Path, tmp_path: Path) -> None:
    for module in ("pytest", "hypothesis", "mypy", "ruff", "jsonschema"):
        probe = subprocess.run(
            [str(installed / "python"), "-c", f"import {module}"], capture_output=True, check=False
        )
        assert probe.returncode != 0, f"{module} is installed at run time"


def test_help_and_validate_work_from_anywhere(installed: Path, tmp_path: Path) -> None:
    help_text = run(installed, "--help", cwd=tmp_path)
    assert help_text.returncode == 0
    assert b"validate" in help_text.stdout
    valid = b"\n".join(
        json.dumps(json.loads(p.read_bytes())).encode()
        for p in sorted((EXAMPLES / "valid").glob("*.json"))
    )
    verdicts = run(installed, "validate", "-", stdin=valid, cwd=tmp_path)
    assert verdicts.returncode == 0, verdicts.stderr
    assert b"0 invalid" in verdicts.stderr
    bad = (EXAMPLES / "invalid" / "constraint_key_message.json").read_bytes()
    refused = run(
        installed, "validate", "-", stdin=json.dumps(json.loads(bad)).encode(), cwd=tmp_path
    )
    assert refused.returncode == 1
    assert b'"reason": "constraint_key_message"' in refused.stdout


def test_the_wheel_holds_no_development_tool(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "service/cli.py" in names
    assert "service/tools/dlq.py" in names
    assert "service/settings.py" in names
    development = [
        name
        for name in names
        if name.split("/")[0] in {"devkit", "bench", "chaos", "sim", "tests", "deploy"}
        # The kit's modules where they lived before it: the simulator, the demo, the
        # schema and settings-reference generators.
        or name.startswith(("service/simulator/", "service/_kafka_local/"))
        or name in {"service/demo.py", "service/schemas.py", "service/settings_reference.py"}
        or Path(name).name in {"kafka-local", "fetch_jars.py", "jars.lock", "probe_metadata.py"}
    ]
    assert development == []
    # Nor anything that could reach the kit from the checkout: no .pth file.
    assert [name for name in names if name.endswith(".pth")] == []


@pytest.mark.parametrize("command", [["demo", "--quick"], ["simulator", "--port", "0"]])
def test_a_development_command_of_the_installed_wheel_says_it_is_not_there(
    installed: Path, tmp_path: Path, command: list[str]
) -> None:
    refused = run(installed, *command, cwd=tmp_path)
    assert refused.returncode == 2
    assert f"scm-relay {command[0]}: not part of this installation".encode() in refused.stderr
    assert b"development kit (the `devkit` package" in refused.stderr
    assert b"make setup" in refused.stderr
    assert b"Traceback" not in refused.stderr
