"""Which Redis reply parser each process gets: hiredis in the worker, Python in the web tier."""

from __future__ import annotations

import subprocess
import sys

from tests.support import ROOT

_PARSER = "import redis.connection; print(redis.connection.DefaultParser.__name__)"


def _parser_after(setup: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", f"{setup}\n{_PARSER}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip().splitlines()[-1]


def test_the_listeners_process_parses_with_hiredis() -> None:
    assert _parser_after("import tasks") == "_HiredisParser"


def test_the_web_tiers_config_keeps_hiredis_out_of_its_workers() -> None:
    # The master runs the config before it forks the workers that import redis.
    assert _parser_after("import runpy; runpy.run_path('gunicorn.conf.py')") != "_HiredisParser"
