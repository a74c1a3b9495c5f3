"""RESULTS.md: the separate measurements (kept by `make bench`), the SSE section, result lines."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.presence import churn_result
from bench.report import SEPARATE, _sse_section, record_separate, separate_section
from bench.workloads import Row


def test_a_separate_result_replaces_its_own_previous_one_only(tmp_path: Path) -> None:
    out = tmp_path / "RESULTS.md"
    out.write_text("# Benchmark results\n\ngenerated table\n")
    record_separate(out, "one", "python -m bench.one", "1 us")
    record_separate(out, "two", "python -m bench.two", "2 us")
    record_separate(out, "one", "python -m bench.one", "3 us")
    text = out.read_text()
    assert text.startswith("# Benchmark results\n\ngenerated table\n\n" + SEPARATE)
    entries = [line for line in text.splitlines() if line.startswith("- **")]
    assert len(entries) == 2
    assert entries[0].startswith("- **one** (`python -m bench.one`") and entries[0].endswith("3 us")
    assert entries[1].endswith("2 us")


def test_the_section_is_everything_from_its_heading(tmp_path: Path) -> None:
    assert separate_section("# Benchmark results\n\ntable\n") == ""
    out = tmp_path / "RESULTS.md"
    record_separate(out, "one", "python -m bench.one", "1 us")
    section = separate_section("# Benchmark results\n\nnew table\n\n" + out.read_text())
    assert section.startswith(SEPARATE) and section.rstrip().endswith("1 us")


def test_the_sse_section_sets_each_sse_row_against_its_websocket_row() -> None:
    rows = [
        Row("sustained", "tidings-1w", 1000, deliveries_per_s=20000.0, cpu_us_per_delivery=10.0),
        Row("sustained", "node", 1000, cpu_us_per_delivery=1.0),
        Row(
            "sustained (sse)",
            "tidings-1w",
            1000,
            deliveries_per_s=19000.0,
            cpu_us_per_delivery=30.0,
        ),
        Row("connections (sse)", "tidings-1w", 10000, kb_per_connection=30.0, lost=2),
    ]
    lines = _sse_section(rows)
    assert lines[0] == "## Server-Sent Events"
    assert "| sustained: deliveries/s | 20,000 | 19,000 | 0.95x |" in lines
    assert "| sustained: CPU us/deliv | 10.0 | 30.0 | 3.00x |" in lines
    assert "| sustained: lost / duplicated | 0 / 0 | 0 / 0 | |" in lines
    # No websocket row to set it against: the SSE figures alone.
    assert "| connections: KB/conn | - | 30.0 | - |" in lines
    assert "| connections: lost / duplicated | - | 2 / 0 | |" in lines
    assert _sse_section(rows[:2]) == []


def test_the_presence_line_survives_a_run_too_short_to_measure_cpu() -> None:
    # At the smoke test's sizes the web worker can use less than a clock tick.
    args = argparse.Namespace(clients=8, rate=10, seconds=0.5, rounds=1, baseline=None)
    line = churn_result({"off": [0.0], "on": [1.0], "joins": [2.0]}, args)
    assert "presence off 0.0%" in line and "n/a, presence off measured 0%" in line
    line = churn_result({"off": [2.0], "on": [1.0], "joins": [3.0]}, args)
    assert "(**0.50x**)" in line and "(1.50x)" in line
