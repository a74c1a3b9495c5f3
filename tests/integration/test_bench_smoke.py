"""The benchmarks run end to end at tiny sizes: `python -m bench --quick`, `python -m bench.soak`.

Smoke tests of `bench/`, not benchmarks. The benchmark (issues 7 and 13):
every workload completes and every client got every publication once, never
how fast. The soak (issue 12), for half a minute: it samples every process and
writes its chart and verdict, and every durable publication reached every
checking client once; never whether anything grew (half a minute is all
warm-up). They need Node.js for the load generator (`bench/peers/`).
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.report import record_separate
from tests.support import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY = {
    "burst_clients": 5,
    "burst_publications": 50,
    "sustained_clients": 10,
    "sustained_seconds": 1,
    "light_clients": 5,
    "light_seconds": 1,
    "many_clients": 10,
    "many_own_rate": 20,
    "many_seconds": 1,
    "connections": 50,
    "connections_processes": 2,
    "sse_sustained_clients": 10,
    "sse_connections": 50,
    "own_clients": 10,
    "own_rate": 50,
    "own_seconds": 1,
    "own_burst": 100,
    "ceiling_rates": "100",
    "ceiling_bisect": 0,
    "ceiling_seconds": 1,
    "fast_burst": 200,
    "fast_burst_clients": 2,
    "fast_burst_topics": 10,
    "scale_workers": "1,2",
    "scale_clients": 10,
    "scale_rate": 40,
    "scale_seconds": 1,
}

SOAK_TINY = {
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


def test_quick_bench_of_tidings_completes_with_nothing_lost(node: None, tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    record_separate(out, "by_hand", "python -m bench.by_hand", "42 us")
    command = [
        sys.executable,
        "-m",
        "bench",
        "--quick",
        "--systems",
        "tidings-1w",
        "--workdir",
        str(tmp_path),
        "--out",
        str(out),
    ]
    for knob, value in TINY.items():
        command += ["--set", f"{knob}={value}"]
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=150, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    workloads = {row["workload"] for row in rows}
    assert workloads == {
        "burst",
        "sustained",
        "sustained (sse)",
        "light",
        "many-topics",
        "connections",
        "connections (sse)",
        "own-topics 50/s",
        "own-topics burst",
        "ceiling 100/s",
        "fast-burst 1 topic",
        "fast-burst 10 topics",
        "scale-out",
    }
    assert {row["system"] for row in rows} == {
        "tidings-1w",
        "tidings-1w (ingest)",
        "tidings-2w (ingest)",
    }
    for row in rows:
        assert row["expected"] > 0, row
        assert row["lost"] == 0, row
        assert row["duplicated"] == 0, row
        assert row["delivered"] == row["expected"], row
    # Interest routing: each web worker received only what it delivered, all of it once.
    for row in (row for row in rows if row["workload"] == "scale-out"):
        workers = row["workers"]
        assert len(workers) == int(row["system"][len("tidings-")]), row
        assert all(w["received"] == w["delivered"] for w in workers), row
        assert sum(w["received"] for w in workers) == row["publications"], row
    # The table was printed and the Markdown written, targets and the chart included.
    assert "deliv/s" in done.stdout
    written = out.read_text()
    assert "## Targets (issues 7 and 13)" in written
    assert "## Server-Sent Events" in written  # the SSE rows against the websocket ones
    assert "](scale-out.png)" in written
    assert (tmp_path / "scale-out.png").stat().st_size > 0
    # A separate benchmark's result survives the rewrite, after the generated part.
    assert written.index("## Targets (issues 7 and 13)") < written.index("- **by_hand**")


def test_presence_bench_runs_at_tiny_sizes(node: None) -> None:
    command = [
        sys.executable,
        "-m",
        "bench.presence",
        *("--clients", "8", "--rate", "10", "--seconds", "0.5", "--rounds", "1"),
        *("--members", "20", "--calls", "10", "--no-record"),
    ]
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=150, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "presence off" in done.stdout and "`presence_stats`" in done.stdout


def test_tiny_soak_writes_its_chart_and_verdict_with_nothing_lost(
    node: None, tmp_path: Path
) -> None:
    png = tmp_path / "soak.png"
    command = [sys.executable, "-m", "bench.soak", "--no-record", "--workdir", str(tmp_path)]
    command += ["--out-png", str(png)]
    for option, value in SOAK_TINY.items():
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
