"""RESULTS.md's separate measurements: written by their own commands, kept by `make bench`."""

from __future__ import annotations

from pathlib import Path

from bench.report import SEPARATE, record_separate, separate_section


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
