"""The results table (terminal and Markdown), the machine, and the targets of issue 7."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.workloads import Row, Sizes

COLUMNS = [
    ("workload", "workload"),
    ("system", "system"),
    ("clients", "clients"),
    ("pubs", "publications"),
    ("delivered", "delivered"),
    ("lost", "lost"),
    ("dup", "duplicated"),
    ("deliv/s", "deliveries_per_s"),
    ("p50 ms", "p50_ms"),
    ("p99 ms", "p99_ms"),
    ("max ms", "max_ms"),
    ("peak RSS MB", "peak_rss_mb"),
    ("CPU us/deliv", "cpu_us_per_delivery"),
    ("gen us/deliv", "generator_us_per_delivery"),
    ("connect s", "connect_s"),
    ("KB/conn", "kb_per_connection"),
]


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "-"
    if key == "deliveries_per_s":
        return f"{value:,.0f}"
    if isinstance(value, float):
        if key.endswith("_ms"):
            return (
                f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 1000 else f"{value:.0f}"
            )
        return f"{value:.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def cells(row: Row) -> list[str]:
    """The row's values, formatted."""
    return [_fmt(key, getattr(row, key)) for _, key in COLUMNS]


def text_table(rows: list[Row]) -> str:
    """A fixed-width table for the terminal."""
    header = [title for title, _ in COLUMNS]
    body = [cells(row) for row in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(
            h.ljust(w) if i < 2 else h.rjust(w)
            for i, (h, w) in enumerate(zip(header, widths, strict=True))
        )
    ]
    lines.append("  ".join("-" * w for w in widths))
    for line in body:
        lines.append(
            "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w)
                for i, (c, w) in enumerate(zip(line, widths, strict=True))
            )
        )
    return "\n".join(lines)


def markdown_table(rows: list[Row]) -> str:
    """The same table in Markdown, with the notes as a last column."""
    header = [title for title, _ in COLUMNS] + ["notes"]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 3) + ["---"]) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join([*cells(row), "; ".join(row.notes)]) + " |")
    return "\n".join(lines)


# -- the machine ----------------------------------------------------------------------------


def _command(args: list[str]) -> str:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=10, check=False)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "not found"


def machine() -> dict[str, str]:
    """Describe the machine the numbers come from."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    from tests.support import redis_binary

    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": model,
        "cores": str(os.cpu_count()),
        "memory": memory,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "node": _command(["node", "--version"]),
        "redis": _command([redis_binary(), "--version"]),
        "load average": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "tidings revision": _revision(),
    }


def _revision() -> str:
    """The commit measured, and whether the code under test had uncommitted changes."""
    from tests.support import ROOT

    commit = _command(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    changed = subprocess.run(
        [
            "git",
            "-C",
            str(ROOT),
            "status",
            "--porcelain",
            "--",
            "tidings",
            "webapp",
            "tasks",
            "gunicorn.conf.py",
            "celeryconfig.py",
            "examples",
        ],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return commit + (" with uncommitted changes" if changed else "")


# -- the targets ---------------------------------------------------------------------------------


def _find(rows: Iterable[Row], workload: str, system: str) -> Row | None:
    return next((r for r in rows if r.workload == workload and r.system == system), None)


def targets(rows: list[Row]) -> list[tuple[str, str, str]]:
    """Issue 7's targets: (target, measured, verdict) for each Tidings configuration."""
    out: list[tuple[str, str, str]] = []

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else "met" if ok else "**missed**"

    tidings = [s for s in ("tidings-1w", "tidings-2w") if any(r.system == s for r in rows)]
    for system in tidings:
        node = _find(rows, "burst", "node")
        mine = _find(rows, "burst", system)
        if node and mine and node.deliveries_per_s and mine.deliveries_per_s is not None:
            ratio = mine.deliveries_per_s / node.deliveries_per_s
            out.append(
                (
                    f"burst deliveries/s >= 1.5x node ({system})",
                    f"{mine.deliveries_per_s:,.0f} vs {node.deliveries_per_s:,.0f}: {ratio:.2f}x",
                    verdict(ratio >= 1.5),
                )
            )
        node = _find(rows, "sustained", "node")
        mine = _find(rows, "sustained", system)
        if node and mine and node.p99_ms is not None and mine.p99_ms is not None:
            out.append(
                (
                    f"sustained p99 <= node's, nothing lost ({system})",
                    f"{mine.p99_ms:.1f} ms vs {node.p99_ms:.1f} ms; lost {mine.lost}",
                    verdict(mine.p99_ms <= node.p99_ms and mine.lost == 0),
                )
            )
        for workload in ("burst", "sustained", "light", "many-topics"):
            node = _find(rows, workload, "node")
            mine = _find(rows, workload, system)
            if node and mine and node.cpu_us_per_delivery and mine.cpu_us_per_delivery:
                ratio = mine.cpu_us_per_delivery / node.cpu_us_per_delivery
                out.append(
                    (
                        f"CPU/delivery <= node's, {workload} ({system})",
                        f"{mine.cpu_us_per_delivery:.1f} us vs {node.cpu_us_per_delivery:.1f} us: "
                        f"{ratio:.2f}x",
                        verdict(ratio <= 1.0),
                    )
                )
        mine = _find(rows, "light", system)
        if mine and mine.p50_ms is not None and mine.p99_ms is not None:
            out.append(
                (
                    f"light p50 <= 3 ms, p99 <= 10 ms ({system})",
                    f"p50 {mine.p50_ms:.2f} ms, p99 {mine.p99_ms:.2f} ms",
                    verdict(mine.p50_ms <= 3 and mine.p99_ms <= 10),
                )
            )
        mine = _find(rows, "connections", system)
        if mine:
            ok = (
                mine.kb_per_connection is not None
                and mine.connect_s is not None
                and mine.kb_per_connection < 20
                and mine.connect_s <= 15
                and mine.delivered == mine.clients
            )
            kb = "-" if mine.kb_per_connection is None else f"{mine.kb_per_connection:.1f} KB"
            secs = "-" if mine.connect_s is None else f"{mine.connect_s:.1f} s"
            out.append(
                (
                    f"{mine.clients:,} connections < 20 KB each, connected <= 15 s ({system})",
                    f"{kb}/connection, {secs}, {mine.delivered:,} reached",
                    verdict(ok),
                )
            )
        mine_rows = [r for r in rows if r.system == system]
        if mine_rows:
            lost = sum(r.lost for r in mine_rows)
            dup = sum(r.duplicated for r in mine_rows)
            out.append(
                (
                    f"nothing lost or duplicated, every workload ({system})",
                    f"lost {lost}, duplicated {dup}",
                    verdict(lost == 0 and dup == 0),
                )
            )
    return out


RESULTS = Path(__file__).parent / "RESULTS.md"
SEPARATE = "## Separate measurements"


def separate_section(text: str) -> str:
    """The hand-run measurements at the end of a RESULTS.md, kept when `make bench` rewrites it."""
    at = text.find(SEPARATE)
    return text[at:] if at >= 0 else ""


def record_separate(path: Path, name: str, command: str, result: str) -> None:
    """Write one separate benchmark's result into RESULTS.md, replacing its previous one."""
    text = path.read_text() if path.exists() else ""
    if SEPARATE not in text:
        text = text.rstrip("\n") + "\n\n" + SEPARATE + "\n\n"
        text += "Benchmarks outside `make bench`, each rerun by its own command.\n\n"
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    entry = f"- **{name}** (`{command}`, {stamp}, load average {load}): {result}"
    lines = text.rstrip("\n").split("\n")
    mine = [i for i, line in enumerate(lines) if line.startswith(f"- **{name}**")]
    if mine:
        lines[mine[0]] = entry
    else:
        lines += [entry] if lines[-1].startswith("- **") else ["", entry]
    path.write_text("\n".join(lines) + "\n")


def separate_result(name: str, result: str, *, record: bool) -> None:
    """Print a separate benchmark's result and, if `record`, keep it in bench/RESULTS.md."""
    print(result)
    if record:
        record_separate(RESULTS, name, f"python -m bench.{name}", result)


def markdown(
    rows: list[Row],
    *,
    sizes: Sizes,
    quick: bool,
    descriptions: dict[str, str],
    info: dict[str, str],
    seconds: float,
    load_after: str,
) -> str:
    """The whole RESULTS.md."""
    lines = [
        "# Benchmark results" + (" (quick sizes)" if quick else ""),
        "",
        "Generated by `python -m bench"
        + (" --quick" if quick else "")
        + "` (`make bench"
        + ("-quick" if quick else "")
        + "`); do not edit by hand.",
        "",
        "## Machine",
        "",
        *[f"- {key}: {value}" for key, value in info.items()],
        f"- load average after the run: {load_after}",
        f"- run time: {seconds:.0f} s",
        "",
        "The machine is shared with other work: compare systems within this run "
        "(they were measured interleaved, minutes apart at most), not across runs.",
        "",
        "## Systems",
        "",
        *[f"- `{name}`: {text}" for name, text in descriptions.items()],
        "",
        "Each system has a Redis server of its own. Publishers use the pub/sub "
        "path (`PUBLISH tidings:topic:<topic>`, pipelined); the `(ingest)` row "
        "publishes the same burst through the durable path (`XADD tidings:ingest`).",
        "",
        "## Results",
        "",
        markdown_table(rows),
        "",
        "Columns: `deliv/s` is publications received by all clients divided by the "
        "time from the first publish to the last receipt; latencies are from the "
        "publish timestamp in each publication to its receipt by the client; "
        "`peak RSS` sums every server process (Redis excluded) sampled every 100 ms; "
        "`CPU us/deliv` is user+system CPU of every server process (gunicorn master "
        "and workers, Celery main and pool for Tidings; server and bridge for node; "
        "Redis excluded) over the measured window, per delivery; `gen us/deliv` is "
        "the same for the load generator processes (it must stay well below the "
        "servers'); `connect s` is the time to connect and subscribe every client; "
        "`KB/conn` is the web process's RSS growth per idle connection. Burst rows "
        "are medians of the runs listed in their notes.",
        "",
        "## Workloads",
        "",
        f"1. burst: {sizes.burst_clients} clients on one topic, "
        f"{sizes.burst_publications} publications as fast as possible "
        f"({sizes.burst_reps} runs, interleaved across systems);",
        f"2. sustained: {sizes.sustained_clients} clients on one topic, "
        f"{sizes.sustained_rate:g} publications/s for {sizes.sustained_seconds:g} s;",
        f"3. light: {sizes.light_clients} clients on one topic, "
        f"{sizes.light_rate:g} publications/s for {sizes.light_seconds:g} s;",
        f"4. many-topics: {sizes.many_clients} clients, each on a topic of its own and "
        f"on one shared topic; {sizes.many_shared_rate:g}/s on the shared topic and "
        f"{sizes.many_own_rate:g}/s spread over the own topics, for {sizes.many_seconds:g} s;",
        f"5. connections: {sizes.connections:,} idle websocket clients (each subscribed "
        f"to one topic) on one web worker, from {sizes.connections_processes} generator "
        f"processes, held {sizes.connections_hold:g} s, then one publication must reach "
        "them all.",
        "",
        "## Targets (issue 7)",
        "",
        "| target | measured | verdict |",
        "|---|---|---|",
        *[f"| {t} | {m} | {v} |" for t, m, v in targets(rows)],
        "",
        "Where the time goes for each missed target, measured with py-spy, and the "
        "changes that would close the gap: [PROFILE.md](PROFILE.md) (written by hand; "
        "it names the revision it profiled).",
        "",
        f"Python {sys.version.split()[0]}; see bench/README.md for how to run and read this.",
        "",
    ]
    return "\n".join(lines)
