"""The soak runs end to end: `python -m bench.soak`, well under a minute, tiny sizes.

A smoke test of `bench/soak.py` (issue 12), not a soak: it asserts that the
run completes, samples every process, writes its chart and its verdict, and
that every durable publication reached every checking client once; never
whether anything grew (half a minute is all warm-up). It needs Node.js for
the load generator (`bench/peers/`).
"""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import IN_CI, ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY = {
    "minutes": 0.5,
    "warmup-minutes": 0.15,
    "sample-seconds": 1,
    "sustained-clients": 20,
    "own-topics": 10,
    "own-rate": 20,
    "churners": 2,
    "checkers": 2,
    "stall-every": 8,
    "history": 50,
    "generator-processes": 1,
}


@pytest.fixture
def node() -> None:
    if shutil.which("node") is None or shutil.which("npm") is None:
        if IN_CI:
            pytest.fail("the soak's load generator needs node and npm")
        pytest.skip("no node/npm: the soak's load generator needs them")


def test_tiny_soak_writes_its_chart_and_verdict_with_nothing_lost(
    node: None, tmp_path: Path
) -> None:
    png = tmp_path / "soak.png"
    command = [sys.executable, "-m", "bench.soak", "--no-record", "--workdir", str(tmp_path)]
    command += ["--out-png", str(png)]
    for option, value in TINY.items():
        command += [f"--{option}", str(value)]
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=150, check=False
    )
    # 1 is a missed target: growth within half a minute may well be warm-up still.
    assert done.returncode in (0, 1), done.stdout + done.stderr
    assert png.read_bytes().startswith(b"\x89PNG"), "no chart"
    verdict = json.loads((tmp_path / "verdict.json").read_text())
    assert verdict["met"] == (done.returncode == 0)
    judged = {row["name"] for row in verdict["growth"] if row["role"] == "system"}
    assert {"gunicorn master", "web worker 1", "web worker 2", "celery main"} <= judged
    assert "redis-server" in judged and any(name.startswith("celery pool") for name in judged)
    with open(tmp_path / "samples.csv") as samples:
        groups = {row["group"] for row in csv.DictReader(samples)}
    assert {"loadgen sustained", "soak harness"} <= groups
    # Nothing durable lost or duplicated, to the checking clients or the load's.
    durable = verdict["durable"]
    assert durable["expected"] > 0
    assert durable["delivered"] == durable["expected"], durable
    assert durable["lost_untold"] == durable["duplicated"] == durable["out_of_order"] == 0
    assert verdict["lost"] == [], verdict["lost"]
    assert verdict["loads"]["sustained"]["delivered"] == verdict["loads"]["sustained"]["expected"]
    # Every part of the load ran: churn, and a stall the server cut and the client came back from.
    assert verdict["churn"]["connections"] >= 2 and not verdict["churn"]["errors"]
    assert verdict["stalls"]["cut"] >= 1, verdict["stalls"]
    assert "process" in done.stdout and "web worker 1" in done.stdout  # the table
