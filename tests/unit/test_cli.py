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


def test_the_cli_imports_no_development_tool_until_its_command_runs() -> None:
    # The production wheel leaves the development kit out: the CLI must start, build its
    # parser and run the relay's commands without it.
    probe = (
        "import sys; import service.__main__; from service.cli import build_parser; "
        "build_parser(); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'devkit'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_development_kit_is_there_to_be_found_in_the_checkout() -> None:
    # The probe above sees no kit module; here the kit is importable, so "none loaded"
    # means "not imported", not "not installed".
    probe = "import devkit.demo, devkit.simulator.command; print('found')"
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "found"


@pytest.mark.parametrize(
    ("command", "missing"),
    [
        (["demo", "--quick"], "devkit"),
        (["demo", "--quick"], "devkit.demo"),
        (["simulator", "--token", "t"], "devkit"),
        (["simulator", "--token", "t"], "devkit.simulator"),
    ],
)
def test_a_development_command_without_the_kit_says_what_to_install(
    command: list[str],
    missing: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # None in sys.modules makes the import fail as it does where the wheel left it out.
    monkeypatch.setitem(sys.modules, missing, None)
    for loaded in [m for m in sys.modules if m.startswith(f"{missing}.")]:
        monkeypatch.delitem(sys.modules, loaded)
    assert main(command) == 2
    message = capsys.readouterr().err
    assert f"scm-relay {command[0]}: not part of this installation" in message
    assert "development kit (the `devkit` package" in message
    assert "source checkout with `make setup`" in message
    assert "make demo" in message


def test_a_missing_module_outside_the_kit_is_not_reported_as_the_kit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Only the kit's own absence gets the "install the kit" message: any other missing
    # module is a real fault and surfaces as one.
    for loaded in [m for m in sys.modules if m.split(".")[0] in {"aiohttp", "devkit"}]:
        monkeypatch.delitem(sys.modules, loaded)
    monkeypatch.setitem(sys.modules, "aiohttp", None)
    with pytest.raises(ModuleNotFoundError) as missing:
        main(["simulator", "--token", "t"])
    assert missing.value.name == "aiohttp"


def _stops_cleanly_on_the_early_signal(probe: str) -> None:
    """Run `probe` (which sends itself SIGTERM while the relay loads) in a process of
    its own, against no Kafka: it must stop with 0 and say why."""
    environment = {
        "PATH": "/usr/bin:/bin",
        "SCM_RELAY_API_BASE_URL": "http://127.0.0.1:9",
        "SCM_RELAY_API_TOKEN": "t0ken-under-test",
        "SCM_RELAY_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9",
        "SCM_RELAY_HTTP_PORT": "0",
    }
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=environment,
    )
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert "relay_stopping_on_early_signal" in result.stdout + result.stderr


def test_a_sigterm_while_the_relay_loads_stops_it_cleanly() -> None:
    # SIGTERM arrives while `scm-relay run` imports the relay (a second or more on a busy
    # node): the signal's default action would end it with -15; it stops with 0, told.
    probe = (
        "import builtins, os, signal, sys\n"
        "import service.cli as cli\n"
        "real_import = builtins.__import__\n"
        "def importing(name, *args, **kwargs):\n"
        "    if name == 'service.app':\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return real_import(name, *args, **kwargs)\n"
        "builtins.__import__ = importing\n"
        "sys.exit(cli.main(['run']))\n"
    )
    _stops_cleanly_on_the_early_signal(probe)


def test_a_sigterm_while_the_cli_itself_loads_stops_the_relay_cleanly() -> None:
    # The fault suite's SIGTERMs came while the CLI's own modules loaded (settings,
    # pydantic): before `_run` could install a handler, three of five ended the relay
    # with -15. The entry point now captures the signals before importing the CLI.
    probe = (
        "import builtins, os, signal, sys\n"
        "real_import = builtins.__import__\n"
        "def importing(name, *args, **kwargs):\n"
        "    if name == 'service.settings':\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return real_import(name, *args, **kwargs)\n"
        "builtins.__import__ = importing\n"
        "sys.argv = ['scm-relay', 'run']\n"
        "from service.__main__ import main\n"
        "sys.exit(main())\n"
    )
    _stops_cleanly_on_the_early_signal(probe)


def test_other_commands_keep_the_default_signal_actions() -> None:
    probe = (
        "import signal, sys\n"
        "from service.early_signals import capture_for\n"
        "capture_for(['validate', 'x.json'])\n"
        "sys.exit(0 if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL else 1)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], check=False, timeout=60)
    assert result.returncode == 0, "a tool's SIGTERM must end it"
