"""The built wheel stands alone: installed without dev dependencies, outside the repository."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UV = ROOT / ".tools" / "bin" / "uv"
EXAMPLES = ROOT / "schemas" / "examples"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with the wheel and the runtime lock only; its bin dir."""
    assert UV.exists(), "run `make setup` first (it installs uv into .tools/)"
    work = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [str(UV), "build", "--wheel", "--out-dir", str(work / "dist"), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (work / "dist").glob("scm_relay-*.whl")
    venv = work / "venv"
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


def test_simulator_starts_from_the_installed_package(installed: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCM_RELAY_")}
    command = [str(installed / "scm-relay"), "simulator", "--port", "0", "--token", "t"]
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path, env=env
    ) as process:
        assert process.stdout is not None
        url = process.stdout.readline().decode().strip()
        assert url.startswith("http://127.0.0.1:")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0


def maven_mirror(root: Path) -> str:
    """A file:// Maven repository of the jars the session's broker already fetched
    (deploy/local-kafka/.jars), laid out as jars.lock names them: the wheel's demo fetches
    from it as it would from Maven Central, offline."""
    local = ROOT / "deploy" / "local-kafka"
    for line in (local / "jars.lock").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        group, artifact, version = line.split()[0].split(":")
        folder = root / group.replace(".", "/") / artifact / version
        folder.mkdir(parents=True, exist_ok=True)
        name = f"{artifact}-{version}.jar"
        (folder / name).symlink_to(local / ".jars" / name)
    return root.as_uri()


def quick_demo(
    installed: Path, env: dict[str, str], cwd: Path, timeout_s: float
) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [str(installed / "scm-relay"), "demo", "--quick"],
        capture_output=True,
        timeout=timeout_s,
        cwd=cwd,
        env=env,
        check=False,
    )


@pytest.mark.kafka
@pytest.mark.timeout(900)
def test_the_demo_runs_from_the_installed_wheel(installed: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCM_RELAY_")}
    env |= {
        "HOME": str(tmp_path / "home"),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "SCM_RELAY_MAVEN_REPO": maven_mirror(tmp_path / "maven"),
    }
    demo = quick_demo(installed, env, tmp_path, timeout_s=800)
    assert demo.returncode == 0, demo.stderr.decode()[-3000:]
    assert b"scm-relay demo: summary" in demo.stdout, demo.stdout.decode()
    assert b"codes affected" in demo.stdout
    jars = tmp_path / "cache" / "scm-relay" / "kafka-jars"
    assert len(list(jars.glob("*.jar"))) > 40, "the broker's jars were not fetched to the cache"


def test_the_demo_says_what_is_missing_without_java(installed: Path, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCM_RELAY_")}
    env["PATH"] = str(installed)  # the wheel's scm-relay, and no java
    demo = quick_demo(installed, env, tmp_path, timeout_s=120)
    assert demo.returncode == 1
    assert b"needs Java 17" in demo.stderr
    assert b"SCM_RELAY_KAFKA_BOOTSTRAP_SERVERS" in demo.stderr
