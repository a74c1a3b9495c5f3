"""Node.js for the tests of the JavaScript client (clients/js).

Without node and npm the tests skip on a developer machine and fail in CI.
The package's locked dev dependencies (TypeScript, eventsource) are
installed with `npm ci` when they are missing or stale.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from bench.systems import ensure_node_modules
from tests.support import IN_CI, ROOT

PACKAGE = ROOT / "clients" / "js"
MIN_NODE = 20


def run(args: list[str], timeout: float = 120, **kwargs) -> subprocess.CompletedProcess[str]:
    """Run a command in clients/js; its output, whatever the exit code."""
    return subprocess.run(
        args,
        cwd=kwargs.pop("cwd", PACKAGE),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kwargs,
    )


def _node_major(node: str) -> int:
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True)
    return int(version.stdout.strip().lstrip("v").split(".")[0])


@pytest.fixture(scope="session")
def node() -> str:
    """The node executable, with clients/js' dependencies installed."""
    found = shutil.which("node")
    message = ""
    if found is None or shutil.which("npm") is None:
        message = "no node/npm: the JavaScript client's tests need Node.js 20+ and npm"
    elif _node_major(found) < MIN_NODE:
        # The package runs on 18; its tests use node --test's newer options.
        message = f"the JavaScript client's tests need Node.js {MIN_NODE}+ (found {found})"
    if message:
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    ensure_node_modules(PACKAGE)
    return found


def node_bin(name: str) -> Path:
    """An executable of clients/js' dev dependencies."""
    return PACKAGE / "node_modules" / ".bin" / name
