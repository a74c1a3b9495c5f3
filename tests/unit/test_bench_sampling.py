"""The soak's verdict on process growth (bench/sampling.py), on made-up samples."""

from __future__ import annotations

from pathlib import Path

from bench.sampling import LOAD, SYSTEM, Sample, chart, growth, named, table

MIB = 2**20


def series(
    group: str, pid: int, rss_mib: list[float], fds: list[int] | None = None
) -> list[Sample]:
    """One process sampled every 10 s."""
    fds = fds or [50] * len(rss_mib)
    return [
        Sample(10.0 * i, group, SYSTEM, pid, int(mib * MIB), n)
        for i, (mib, n) in enumerate(zip(rss_mib, fds, strict=True))
    ]


def by_name(samples: list[Sample], warmup: float = 20) -> dict:
    return {g.name: g for g in growth(samples, warmup)}


def test_growth_compares_medians_of_three_after_the_warm_up() -> None:
    # Warm-up growth (50 -> 100) does not count; one spike in each window does not either.
    rss = [50, 80, 100, 100, 140, 100, 101, 102, 103, 104, 200, 104, 105]
    g = by_name(series("web worker", 7, rss))["web worker"]
    assert g.rss_start == 100 * MIB and g.rss_end == 105 * MIB
    assert round(g.rss_growth, 3) == 0.05
    assert g.met(limit=0.10, fd_slack=0)
    assert g.rss_slope > 0


def test_a_process_that_keeps_growing_misses_the_target() -> None:
    g = by_name(series("web worker", 7, [100 + 2 * i for i in range(13)]))["web worker"]
    assert g.rss_growth > 0.10
    assert not g.met(limit=0.10, fd_slack=0)


def test_open_files_may_grow_by_ten_percent_or_the_slack_not_more() -> None:
    flat = [100.0] * 12
    grows = by_name(series("redis-server", 3, flat, [20] * 6 + [30] * 6))["redis-server"]
    assert grows.met(limit=0.10, fd_slack=10)
    assert not grows.met(limit=0.10, fd_slack=5)


def test_a_restarted_process_is_two_processes_and_neither_passes() -> None:
    samples = series("web worker", 7, [100.0] * 6) + [
        Sample(60.0 + 10 * i, "web worker", SYSTEM, 8, 100 * MIB, 50) for i in range(8)
    ]
    names = named(samples)
    assert set(names) == {"web worker 1", "web worker 2"}
    verdicts = by_name(samples)
    assert "gone" in verdicts["web worker 1"].problem
    assert "started during the run" in verdicts["web worker 2"].problem
    assert not verdicts["web worker 2"].met(limit=0.10, fd_slack=0)


def test_load_processes_are_shown_not_judged(tmp_path: Path) -> None:
    load = [Sample(10.0 * i, "loadgen", LOAD, 9, (50 + 10 * i) * MIB, 30) for i in range(10)]
    samples = series("celery main", 5, [60.0] * 10) + load
    text = table(growth(samples, 20), limit=0.10, fd_slack=0)
    assert "(load)" in text and "MISSED" not in text
    png = tmp_path / "soak.png"
    chart(samples, 20, png, "test")
    assert png.read_bytes().startswith(b"\x89PNG")
