"""The Dockerfile's stages, read from the file (no Docker engine runs on the test
machines; hadolint in `make lint` checks its style, tests/repository/test_packaging.py
the wheel the image installs)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Stage:
    name: str
    parent: str
    instructions: list[tuple[str, str]] = field(default_factory=list)


def stages(text: str) -> list[Stage]:
    """Each stage with its instructions (continuation lines joined, comments dropped)."""
    joined = re.sub(r"\\\n", " ", text)
    found: list[Stage] = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parent, _, name = rest.partition(" AS ")
            found.append(Stage(name.strip() or str(len(found)), parent.strip()))
        elif found:
            found[-1].instructions.append((keyword, rest.strip()))
    return found


def image_of(target: str) -> list[Stage]:
    """The stages whose instructions end up in `target`'s image, base first."""
    by_name = {stage.name: stage for stage in stages((ROOT / "Dockerfile").read_text())}
    chain = [by_name[target]]
    while chain[-1].parent in by_name:
        chain.append(by_name[chain[-1].parent])
    return chain[::-1]


def test_the_default_target_is_the_relay_without_development_tools() -> None:
    assert stages((ROOT / "Dockerfile").read_text())[-1].name == "runtime"
    copied = [
        rest
        for stage in image_of("runtime")
        for keyword, rest in stage.instructions
        if keyword in {"COPY", "ADD"}
    ]
    assert copied == ["--from=build /opt/scm-relay /opt/scm-relay"]
    assert ("CMD", '["run"]') in image_of("runtime")[-1].instructions


def test_the_compose_simulator_is_built_from_the_simulator_stage() -> None:
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    services = compose["services"]
    assert services["simulator"]["build"]["target"] == "simulator"
    assert services["relay"]["build"]["target"] == "runtime"
    assert services["simulator"]["image"] != services["relay"]["image"]
    simulator = image_of("simulator")[-1]
    assert any(
        keyword == "COPY" and rest.startswith("devkit/simulator ")
        for keyword, rest in simulator.instructions
    )


def copied_sources(stage: Stage) -> list[str]:
    """The source paths of a stage's COPY and ADD instructions (not --from copies)."""
    return [
        source
        for keyword, rest in stage.instructions
        if keyword in {"COPY", "ADD"} and not rest.startswith("--from=")
        for source in rest.split()[:-1]
    ]


def test_the_relay_image_installs_no_development_kit() -> None:
    # The runtime image takes /opt/scm-relay whole from the build stage, so the sources
    # that stage copies are all the image can hold: the relay's package, never the kit.
    build = {stage.name: stage for stage in stages((ROOT / "Dockerfile").read_text())}["build"]
    sources = copied_sources(build)
    assert "service" in sources
    assert [s for s in sources if s == "." or s.split("/")[0] in {"devkit", "deploy"}] == []
    runs = [command for stage in [build, *image_of("runtime")] for command in commands(stage)]
    assert [command for command in runs if "devkit" in command] == []
    # The compose stack's simulator image gets the simulator only, not the demo or the
    # generators of the kit.
    simulator = copied_sources(image_of("simulator")[-1])
    assert simulator == ["devkit/__init__.py", "devkit/simulator"]


def test_the_stage_reader_sees_a_copied_development_tool() -> None:
    broken = "FROM python AS runtime\nCOPY devkit/demo.py /x\n"
    assert stages(broken)[0].instructions == [("COPY", "devkit/demo.py /x")]
    assert copied_sources(stages(broken)[0]) == ["devkit/demo.py"]


def commands(stage: Stage) -> list[str]:
    """The shell commands of a stage's RUN instructions, in order."""
    return [
        command.strip()
        for keyword, rest in stage.instructions
        if keyword == "RUN"
        for command in rest.split("&&")
    ]


def uninstalled(command: str) -> tuple[str, set[str]] | None:
    """(the python, the packages) of a `python -m pip uninstall --yes ...` command."""
    found = re.fullmatch(r"(\S*python\S*) -m pip uninstall --yes ([\w\- ]+)", command)
    return (found[1], set(found[2].split())) if found else None


INSTALLERS = {"pip", "setuptools", "wheel"}


def test_the_runtime_image_holds_no_installer() -> None:
    # The relay's environment is copied from the build stage: its pip goes after its
    # last use there; the base image's own pip (and ensurepip) in the final image.
    (build,) = [s for s in stages((ROOT / "Dockerfile").read_text()) if s.name == "build"]
    venv = [c for c in commands(build) if "/opt/scm-relay/" in c]
    assert uninstalled(venv[-1]) == ("/opt/scm-relay/bin/python", INSTALLERS)
    final = [c for stage in image_of("runtime") for c in commands(stage)]
    assert ("python", INSTALLERS) in [uninstalled(c) for c in final]
    assert any(re.fullmatch(r"rm -rf /usr/local/lib/python\S*/ensurepip", c) for c in final)
    assert not [c for c in final if re.search(r"pip3? install|ensurepip", c) and "rm " not in c]


def test_the_installer_check_reads_an_uninstall() -> None:
    assert uninstalled("python -m pip uninstall --yes pip wheel") == ("python", {"pip", "wheel"})
    assert uninstalled("python -m pip install pip") is None
