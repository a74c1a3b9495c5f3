"""The benchmark harness runs end to end: `python -m bench --quick`, Tidings only, tiny sizes.

A smoke test of `bench/` (issue 7), not a benchmark: it asserts that every
workload completes and that every client got every publication once, never
how fast. It needs Node.js for the load generator (`bench/peers/`).
"""

from __future__ import annotations

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
    assert workloads == {"burst", "sustained", "light", "many-topics", "connections"}
    assert {row["system"] for row in rows} == {"tidings-1w", "tidings-1w (ingest)"}
    for row in rows:
        assert row["expected"] > 0, row
        assert row["lost"] == 0, row
        assert row["duplicated"] == 0, row
        assert row["delivered"] == row["expected"], row
    # The table was printed and the Markdown written, targets included.
    assert "deliv/s" in done.stdout
    written = out.read_text()
    assert "## Targets (issue 7)" in written
    # A separate benchmark's result survives the rewrite, after the generated part.
    assert written.index("## Targets (issue 7)") < written.index("- **by_hand**")
