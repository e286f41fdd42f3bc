"""The simulator is the oracle every API test is judged by: it shares no code with the
relay it judges. Its modules may import the standard library, aiohttp, pydantic,
structlog and devkit.simulator itself, and nothing else: not the relay, nor the rest of
the development kit, whose demo and generators use the relay (read from their source, so
an import inside a function counts too)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SIMULATOR = Path(__file__).resolve().parents[2] / "devkit" / "simulator"
PACKAGE = "devkit.simulator"
ALLOWED_THIRD_PARTY = frozenset({"aiohttp", "pydantic", "structlog"})


def imported_modules(source: str, package: str = PACKAGE) -> list[str]:
    """Every module a source imports, relative imports resolved against `package`;
    a dynamic import (`importlib.import_module`, `__import__`) is reported as such."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                base = node.module or ""
            else:
                parts = package.split(".")
                up = node.level - 1
                anchor = parts[: len(parts) - up] if up else parts
                base = ".".join([*anchor, node.module] if node.module else anchor)
            # `from service import core` imports service.core: name each imported name too.
            found.extend(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call):
            called = node.func
            name = called.attr if isinstance(called, ast.Attribute) else getattr(called, "id", "")
            if name in ("import_module", "__import__"):
                found.append(f"<dynamic import on line {node.lineno}>")
    return found


def forbidden(module: str) -> bool:
    """Whether the simulator may not import `module`."""
    root = module.split(".")[0]
    if module == PACKAGE or module.startswith(f"{PACKAGE}."):
        return False
    if root in {"service", "devkit"} or module.startswith("<"):
        return True
    return root not in sys.stdlib_module_names and root not in ALLOWED_THIRD_PARTY


def test_the_simulator_imports_nothing_of_the_relay() -> None:
    modules = sorted(SIMULATOR.glob("*.py"))
    assert {path.name for path in modules} >= {"app.py", "state.py", "seed.py"}
    offending = {
        path.name: bad
        for path in modules
        if (bad := [m for m in imported_modules(path.read_text()) if forbidden(m)])
    }
    assert offending == {}


@pytest.mark.parametrize(
    "source",
    [
        "from service.core.resilience import SlidingWindowLimiter",
        "import service.scantrust.client",
        "from service import relay",
        "from service.relay import reconcile",
        "from .. import core",
        "from ..core import resilience",
        "import aiokafka",
        "def f():\n    from service.core import contract\n",
        "import importlib\nimportlib.import_module('service.core.contract')",
        "__import__('service.core')",
        "from devkit import demo",
        "from devkit.schemas import schema_of",
        "from .. import settings_reference",
    ],
)
def test_the_check_catches_every_way_of_reaching_the_relay(source: str) -> None:
    assert any(forbidden(m) for m in imported_modules(source)), source


@pytest.mark.parametrize(
    "source",
    [
        "from __future__ import annotations",
        "import asyncio, math, unicodedata",
        "from collections import deque",
        "from aiohttp import web",
        "from pydantic import BaseModel",
        "import structlog",
        "from devkit.simulator.seed import Seed",
        "from .state import Account",
        "from . import seed",
    ],
)
def test_the_check_lets_the_allowed_imports_through(source: str) -> None:
    assert not any(forbidden(m) for m in imported_modules(source)), source


# The simulation's verdict (sim): the oracle and the workload's truth it judges by
# import the standard library and the simulation's own records, nothing of the relay.
SIMULATION = Path(__file__).resolve().parents[2] / "sim"
SIMULATION_JUDGES = ("oracle.py", "workload.py")
SIMULATION_RECORDS = frozenset({"sim.api.Applied", "sim.kafka.Record"})


def test_the_simulations_verdict_imports_nothing_of_the_relay() -> None:
    offending = {
        name: bad
        for name in SIMULATION_JUDGES
        if (
            bad := [
                module
                for module in imported_modules((SIMULATION / name).read_text(), "sim")
                if module.split(".")[0] not in sys.stdlib_module_names
                and module not in SIMULATION_RECORDS
                and not module.startswith("sim.workload.")
            ]
        )
    }
    assert offending == {}
