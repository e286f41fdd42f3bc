"""Running the `scm-relay` tools as a user does: a child process with SCM_RELAY_* settings."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from devkit.harness import Topics, relay_environment
from service.settings import Settings
from tests.pipeline_support import relay_settings


@dataclass
class ToolRun:
    """What one command printed and returned."""

    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


async def scm_relay(
    settings: Settings,
    *args: str,
    stdin: bytes | None = None,
    cwd: Path | None = None,
    timeout_s: float = 180,
    extra_env: dict[str, str] | None = None,
) -> ToolRun:
    """`python -m service ARGS` with `settings` in its environment."""
    env = {**relay_environment(settings), "COLUMNS": "200", **(extra_env or {})}
    done = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "service", *args],
        input=stdin,
        env=env,
        cwd=cwd,
        capture_output=True,
        timeout=timeout_s,
        check=False,
    )
    return ToolRun(done.returncode, done.stdout.decode(), done.stderr.decode())


def tool_settings(bootstrap: str, api_url: str, topics: Topics, **overrides: Any) -> Settings:
    """The relay's test settings, as the tools would read them."""
    return relay_settings(bootstrap, api_url, topics, **overrides)
