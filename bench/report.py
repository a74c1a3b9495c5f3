"""The results table (terminal and Markdown), the machine, the targets of issues 7, 13, 16."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from bench.routed import ceiling, own_rows, past_ceiling
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


def verdict(ok: bool | None) -> str:
    """A target's verdict cell."""
    return "n/a" if ok is None else "met" if ok else "**missed**"


def _cpu_target(
    target: str, mine: Row | None, other: Row | None, limit: float = 1.0
) -> list[tuple[str, str, str]]:
    """CPU per delivery of `mine` at most `limit` times `other`'s; nothing if one is missing."""
    if not (mine and other and mine.cpu_us_per_delivery and other.cpu_us_per_delivery):
        return []
    ratio = mine.cpu_us_per_delivery / other.cpu_us_per_delivery
    measured = (
        f"{mine.cpu_us_per_delivery:.1f} us vs {other.cpu_us_per_delivery:.1f} us: {ratio:.2f}x"
    )
    return [(target, measured, verdict(ratio <= limit))]


def targets(rows: list[Row]) -> list[tuple[str, str, str]]:
    """Issues 7, 13 and 16's targets: (target, measured, verdict) for each Tidings configuration."""
    return issue7_targets(rows) + issue13_targets(rows) + issue16_targets(rows)


def issue7_targets(rows: list[Row]) -> list[tuple[str, str, str]]:
    """Issue 7's targets: (target, measured, verdict) for each Tidings configuration."""
    out: list[tuple[str, str, str]] = []

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
            out += _cpu_target(
                f"CPU/delivery <= node's, {workload} ({system})",
                _find(rows, workload, system),
                _find(rows, workload, "node"),
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


# -- issue 16: the connection layer ---------------------------------------------------------

# KB of web-worker memory per idle connection, and seconds to connect 10,000.
CONNECTION_KB = 12.0
CONNECT_SECONDS = 10.0
# "No worse than the code before": a ratio to a `tidings-1w@<commit>` row of
# the same run at most this. Runs of one system on this shared machine
# differ by up to ~10% (RESULTS.md's burst runs), so a band, said as such.
NO_WORSE = 1.1


def issue16_targets(rows: list[Row]) -> list[tuple[str, str, str]]:
    """Issue 16's targets for tidings-1w: idle memory and connect time; no worse than a baseline."""
    out: list[tuple[str, str, str]] = []
    mine = _find(rows, "connections", "tidings-1w")
    if mine is not None:
        node = _find(rows, "connections", "node")
        kb = mine.kb_per_connection
        secs = mine.connect_s
        versus = ""
        if node is not None and node.kb_per_connection and kb is not None:
            versus = f" (node {node.kb_per_connection:.1f} KB: {kb / node.kb_per_connection:.2f}x)"
        ok = (
            kb is not None
            and secs is not None
            and kb <= CONNECTION_KB
            and secs <= CONNECT_SECONDS
            and mine.delivered == mine.clients
        )
        out.append(
            (
                f"{mine.clients:,} idle websockets <= {CONNECTION_KB:g} KB each, connected <= "
                f"{CONNECT_SECONDS:g} s (tidings-1w)",
                ("-" if kb is None else f"{kb:.1f} KB") + versus + ", "
                f"{'-' if secs is None else f'{secs:.1f} s'}, {mine.delivered:,} reached",
                verdict(ok),
            )
        )
    baselines = sorted({r.system for r in rows if r.system.startswith("tidings-1w@")})
    for base in baselines:
        before = _find(rows, "connections", base)
        if (
            mine is not None
            and before is not None
            and before.connect_cpu_ms
            and mine.connect_cpu_ms is not None
        ):
            ratio = mine.connect_cpu_ms / before.connect_cpu_ms
            out.append(
                (
                    f"server CPU per connection at connect <= {base}'s "
                    f"(x{NO_WORSE:g}: the machine's noise)",
                    f"{mine.connect_cpu_ms:.2f} ms vs {before.connect_cpu_ms:.2f} ms: "
                    f"{ratio:.2f}x; KB/connection {before.kb_per_connection or 0:.1f} before",
                    verdict(ratio <= NO_WORSE),
                )
            )
        for workload in ("sustained", "light", "burst"):
            now, then = _find(rows, workload, "tidings-1w"), _find(rows, workload, base)
            if not (now and then):
                continue
            out += _cpu_target(
                f"CPU/delivery <= {base}'s x{NO_WORSE:g}, {workload} (tidings-1w)",
                now,
                then,
                NO_WORSE,
            )
            if workload == "burst" and now.deliveries_per_s and then.deliveries_per_s:
                ratio = now.deliveries_per_s / then.deliveries_per_s
                out.append(
                    (
                        f"burst deliveries/s >= {base}'s /{NO_WORSE:g} (tidings-1w)",
                        f"{now.deliveries_per_s:,.0f} vs {then.deliveries_per_s:,.0f}: "
                        f"{ratio:.2f}x",
                        verdict(ratio * NO_WORSE >= 1),
                    )
                )
            if now.p99_ms is not None and then.p99_ms:
                ratio = now.p99_ms / then.p99_ms
                out.append(
                    (
                        f"p99 <= {base}'s x{NO_WORSE:g}, {workload} (tidings-1w)",
                        f"{now.p99_ms:.1f} ms vs {then.p99_ms:.1f} ms: {ratio:.2f}x",
                        verdict(ratio <= NO_WORSE and now.lost == 0),
                    )
                )
    return out


def _issue16_section(rows: list[Row]) -> list[str]:
    """Issue 16's targets as a Markdown section (none without a tidings-1w connections row)."""
    found = issue16_targets(rows)
    if not found:
        return []
    return [
        "## Targets (issue 16: the connection layer)",
        "",
        "| target | measured | verdict |",
        "|---|---|---|",
        *[f"| {t} | {m} | {v} |" for t, m, v in found],
        "",
    ]


# -- issue 13: own topics, fast bursts, scale-out -------------------------------------------

OWN_PEER = "node-sharded"
# The ceiling's fixed points (durable publications/s, one web worker, one listener).
CEILING_POINTS = (10_000.0, 20_000.0)
# CPU per delivery with 4 web workers, at most this times that of one.
SCALE_RATIO = 1.2


def _ceiling_text(rows: list[Row], system: str) -> str:
    good, bad = ceiling(rows, system)
    text = f"{system} {'-' if good is None else f'{good:,.0f}/s'}"
    if bad is not None and bad.rate is not None:
        p99 = "-" if bad.p99_ms is None else f"{bad.p99_ms:.0f} ms"
        text += f" ({bad.rate:,.0f}/s: p99 {p99}, lost {bad.lost:,})"
    elif good is not None:
        text += " (highest rate tried)"
    return text


def workers_of(row: Row) -> int | None:
    """The number of web workers of a scale-out row (`tidings-<N>w ...`)."""
    name = row.system.split()[0].removeprefix("tidings-").removesuffix("w")
    return int(name) if name.isdigit() else None


def routed_exactly(row: Row) -> bool:
    """Tell whether every worker delivered all it received and the workers received it all once."""
    received = sum(w["received"] for w in row.workers)
    return (
        bool(row.workers)
        and all(w["received"] == w["delivered"] for w in row.workers)
        and received == row.publications
    )


def issue13_targets(rows: list[Row]) -> list[tuple[str, str, str]]:
    """Issue 13's targets: own topics on the durable path, fast bursts, scale-out."""
    out: list[tuple[str, str, str]] = []
    own = sorted({r.system for r in rows if r.workload.startswith("own-topics")} - {OWN_PEER})
    for system in own:
        mine, node = own_rows(rows, system), own_rows(rows, OWN_PEER)
        # The main paced row, not the ceiling's (whose rates may be lower).
        base = next((r for r in mine if r.workload.startswith("own-topics ")), None)
        peer = next((r for r in node if base and r.workload == base.workload), None)
        if base:
            out += _cpu_target(
                f"own-topics CPU/publication <= {OWN_PEER}'s, {base.rate:,.0f}/s ({system})",
                base,
                peer,
            )
        if base and peer and base.p99_ms is not None and peer.p99_ms is not None:
            out.append(
                (
                    f"own-topics p99 <= {OWN_PEER}'s, {base.rate:,.0f}/s ({system})",
                    f"{base.p99_ms:.1f} ms vs {peer.p99_ms:.1f} ms (p50 {base.p50_ms:.2f} vs "
                    f"{peer.p50_ms:.2f}); lost {base.lost}",
                    verdict(base.p99_ms <= peer.p99_ms and base.lost == 0),
                )
            )
        burst = _find(rows, "own-topics burst", system)
        if burst:
            peer_burst = _find(rows, "own-topics burst", OWN_PEER)
            against = (
                f" ({OWN_PEER} {peer_burst.deliveries_per_s:,.0f})"
                if peer_burst and peer_burst.deliveries_per_s
                else ""
            )
            out.append(
                (
                    f"own-topics burst: nothing lost or duplicated ({system})",
                    f"lost {burst.lost}, duplicated {burst.duplicated}; "
                    f"{burst.deliveries_per_s or 0:,.0f} deliveries/s{against}",
                    verdict(burst.lost == 0 and burst.duplicated == 0 and burst.expected > 0),
                )
            )
        points = [next((r for r in mine if r.rate == rate), None) for rate in CEILING_POINTS]
        measured = "; ".join(
            f"{rate:,.0f}/s: "
            + ("not run" if r is None else f"p99 {r.p99_ms or 0:.1f} ms, lost {r.lost:,}")
            for rate, r in zip(CEILING_POINTS, points, strict=True)
        )
        ceilings = [_ceiling_text(rows, system)]
        if node:
            ceilings.append(_ceiling_text(rows, OWN_PEER))
        ok = None if None in points else not any(past_ceiling(r) for r in points if r is not None)
        out.append(
            (
                f"own-topics p99 < 200 ms, nothing lost, at 10,000/s and 20,000/s ({system})",
                f"{measured}; ceiling {', '.join(ceilings)}",
                verdict(ok),
            )
        )
    for system in sorted({r.system for r in rows if r.workload.startswith("fast-burst")}):
        if not system.startswith("tidings"):
            continue
        mine_rows = [r for r in rows if r.system == system and r.workload.startswith("fast-burst")]
        lost = sum(r.lost for r in mine_rows)
        dup = sum(r.duplicated for r in mine_rows)
        out.append(
            (
                f"fast-path bursts: nothing lost or duplicated ({system})",
                "; ".join(
                    f"{r.workload}: lost {r.lost:,}, dup {r.duplicated:,}" for r in mine_rows
                ),
                verdict(lost == 0 and dup == 0 and all(r.expected for r in mine_rows)),
            )
        )
    durable = [
        r
        for r in rows
        if r.system.startswith("tidings")
        and (r.workload.startswith("own-topics") or r.workload == "scale-out")
    ]
    if durable:
        lost = sum(r.lost for r in durable)
        dup = sum(r.duplicated for r in durable)
        out.append(
            (
                "nothing lost or duplicated, own-topics and scale-out (durable path)",
                f"lost {lost:,}, duplicated {dup:,} over {len(durable)} rows",
                verdict(lost == 0 and dup == 0 and all(r.expected for r in durable)),
            )
        )
    scale = {workers_of(r): r for r in rows if r.workload == "scale-out"}
    out += _cpu_target(
        f"scale-out CPU/delivery, 4 web workers <= {SCALE_RATIO}x one",
        scale.get(4),
        scale.get(1),
        SCALE_RATIO,
    )
    if scale:
        out.append(
            (
                "scale-out: each worker received only its clients' topics "
                "(received == delivered per worker, sum == publications)",
                "; ".join(
                    f"{n}w: {sum(w['received'] for w in r.workers):,} received of "
                    f"{r.publications:,}" + ("" if routed_exactly(r) else " **mismatch**")
                    for n, r in sorted(scale.items(), key=lambda item: item[0] or 0)
                ),
                verdict(all(routed_exactly(r) for r in scale.values())),
            )
        )
    return out


SSE_SYSTEM = "tidings-1w"


def _sse_section(rows: list[Row]) -> list[str]:
    """RESULTS.md's Server-Sent Events section: each SSE row against its websocket row."""
    pairs = [
        (name, _find(rows, name, SSE_SYSTEM), _find(rows, f"{name} (sse)", SSE_SYSTEM))
        for name in ("sustained", "connections")
    ]
    pairs = [(name, ws, sse) for name, ws, sse in pairs if sse is not None]
    if not pairs:
        return []
    measures = {
        "sustained": [
            ("deliveries/s", "deliveries_per_s"),
            ("p50 ms", "p50_ms"),
            ("p99 ms", "p99_ms"),
            ("CPU us/deliv", "cpu_us_per_delivery"),
        ],
        "connections": [
            ("KB/conn", "kb_per_connection"),
            ("connect s", "connect_s"),
            ("p99 ms, the one publication", "p99_ms"),
        ],
    }
    lines = [
        "## Server-Sent Events",
        "",
        f"`{SSE_SYSTEM}` with its clients on `GET /sse` streams against the same "
        "workload on websockets, in this run.",
        "",
        "| workload: measure | websocket | SSE | SSE / websocket |",
        "|---|---:|---:|---:|",
    ]
    for name, ws, sse in pairs:
        for title, key in measures[name]:
            mine = getattr(sse, key)
            theirs = getattr(ws, key) if ws is not None else None
            ratio = f"{mine / theirs:.2f}x" if mine is not None and theirs else "-"
            lines.append(f"| {name}: {title} | {_fmt(key, theirs)} | {_fmt(key, mine)} | {ratio} |")
        lost = "-" if ws is None else f"{ws.lost:,} / {ws.duplicated:,}"
        lines.append(
            f"| {name}: lost / duplicated | {lost} | {sse.lost:,} / {sse.duplicated:,} | |"
        )
    return [*lines, ""]


def _scale_section(rows: list[Row], chart: str | None) -> list[str]:
    """RESULTS.md's scale-out section: the chart and each worker's share."""
    scale = [r for r in rows if r.workload == "scale-out"]
    if not scale:
        return []
    lines = ["## Scale-out", ""]
    if chart:
        lines += [f"![scale-out: CPU per delivery and publications per worker]({chart})", ""]
    lines += [
        "| workers | CPU us/deliv | vs one worker | publications | per worker, summed over "
        "the runs: clients / received / delivered |",
        "|---:|---:|---:|---:|---|",
    ]
    one = next((r for r in scale if workers_of(r) == 1), None)
    for row in sorted(scale, key=lambda r: workers_of(r) or 0):
        ratio = (
            f"{row.cpu_us_per_delivery / one.cpu_us_per_delivery:.2f}x"
            if one and one.cpu_us_per_delivery and row.cpu_us_per_delivery
            else "-"
        )
        shares = ", ".join(
            f"{w['clients']} / {w['received']:,} / {w['delivered']:,}"
            for w in sorted(row.workers, key=lambda w: -w["clients"])
        )
        lines.append(
            f"| {workers_of(row)} | {_fmt('cpu', row.cpu_us_per_delivery)} | {ratio} | "
            f"{row.publications:,} | {shares or '-'} |"
        )
    return [*lines, ""]


def scale_chart(rows: list[Row], path: Path) -> bool:
    """Draw scale-out's chart (CPU per delivery, publications per worker) into `path`."""
    scale = sorted(
        ((workers_of(r), r) for r in rows if r.workload == "scale-out" and workers_of(r)),
        key=lambda item: item[0] or 0,
    )
    if not scale:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = [n for n, _ in scale]
    figure, (cpu, share) = plt.subplots(1, 2, figsize=(11, 4.2))
    medians = [r.cpu_us_per_delivery for _, r in scale]
    cpu.plot(counts, medians, "o-", color="tab:blue", label="median")
    for n, row in scale:
        runs = [run["cpu_us_per_delivery"] for run in row.runs if run["cpu_us_per_delivery"]]
        cpu.plot([n] * len(runs), runs, ".", color="tab:blue", alpha=0.4)
    if scale[0][0] == 1 and medians[0]:
        cpu.axhline(
            SCALE_RATIO * medians[0],
            color="tab:red",
            linestyle="--",
            label=f"target: {SCALE_RATIO}x one worker",
        )
    cpu.set_ylabel("server CPU per delivery (us)")
    cpu.set_title("total server CPU per delivery")
    cpu.legend(loc="lower right")
    for n, row in scale:
        ordered = sorted(row.workers, key=lambda w: -w["received"])
        xs = [n * 2 ** ((k - (len(ordered) - 1) / 2) * 0.04) for k in range(len(ordered))]
        share.plot(xs, [w["received"] for w in ordered], "o", color="tab:green")
        share.plot(xs, [w["delivered"] for w in ordered], "x", color="black")
        share.plot([n / 1.15, n * 1.15], [row.publications / n] * 2, "-", color="tab:gray")
    share.plot([], [], "o", color="tab:green", label="received (routed)")
    share.plot([], [], "x", color="black", label="delivered")
    share.plot([], [], "-", color="tab:gray", label="publications / workers")
    share.set_ylabel("publications")
    share.set_title("publications per web worker")
    share.legend(loc="upper right")
    for axes in (cpu, share):
        axes.set_xscale("log", base=2)
        axes.set_xticks(counts, [str(n) for n in counts])
        axes.set_ylim(bottom=0)
        axes.set_xlabel("web workers (WEB_CONCURRENCY)")
    figure.suptitle(
        f"scale-out: {scale[0][1].clients} clients on disjoint topics, "
        f"{scale[0][1].rate or 0:,.0f} durable publications/s"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


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
    chart: str | None = None,
) -> str:
    """The whole RESULTS.md; `chart` names scale-out's PNG beside it, if one was drawn."""
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
        "publishes the same burst through the durable path (`XADD tidings:ingest`), "
        "as do all of issue 13's Tidings rows (own-topics, scale-out); the Node peers "
        "have no durable path and always get pub/sub.",
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
        "them all;",
        f"6. own-topics (issue 13): {sizes.own_clients:,} clients, each on a topic of its "
        "own (one recipient per publication), durable publications to Tidings (one web "
        f"worker, one listener), pub/sub to `{OWN_PEER}`; connected once, then: "
        f"{sizes.own_rate:,.0f}/s round robin over the topics for {sizes.own_seconds:g} s; "
        f"a burst of {sizes.own_burst:,} over the topics; then "
        + ", ".join(
            f"{float(rate):,.0f}/s" for rate in sizes.ceiling_rates.split(",") if rate.strip()
        )
        + f" for {sizes.ceiling_seconds:g} s each on every system, then "
        f"{sizes.ceiling_bisect} midpoint(s) between a system's highest rate with p99 "
        "< 200 ms and nothing lost and the first rate above it that was not (the ceiling);",
        f"7. fast-burst: {sizes.fast_burst:,} `PUBLISH` as fast as the publisher pipelines "
        f"them (100 per round trip), to one topic with {sizes.fast_burst_clients} clients, "
        f"and round robin over {sizes.fast_burst_topics:,} topics with one client each; "
        "Tidings with one web worker and the `node` peer only (the naive app needs "
        "minutes for it);",
        f"8. scale-out: Tidings with {sizes.scale_workers.replace(',', ', ')} web workers "
        f"(started for this workload), {sizes.scale_clients} clients on disjoint topics "
        "(the kernel spreads their connections over the workers), "
        f"{sizes.scale_rate:,.0f} durable publications/s over them for "
        f"{sizes.scale_seconds:g} s ({sizes.scale_reps} runs, interleaved); each worker's "
        "routed publications are read from its `tidings:stats:web:<host>:<pid>` hash "
        "(`routed_received`, `routed_delivered`) before and after;",
        f"9. sustained (sse): the sustained workload with {sizes.sse_sustained_clients:,} "
        "clients on `GET /sse?topic=<t>` streams instead of websockets, `tidings-1w`, "
        "its runs interleaved with the websocket ones;",
        f"10. connections (sse): {sizes.sse_connections:,} idle SSE streams, held and "
        "checked like the websocket connections and beside them, on one web worker of a "
        "Tidings started for it (a worker that held websockets would reuse their freed "
        f"memory), after {100 * sizes.connections_processes} streams on another topic.",
        "",
        *_scale_section(rows, chart),
        *_sse_section(rows),
        "## Targets (issues 7 and 13)",
        "",
        "| target | measured | verdict |",
        "|---|---|---|",
        *[f"| {t} | {m} | {v} |" for t, m, v in issue7_targets(rows) + issue13_targets(rows)],
        "",
        *_issue16_section(rows),
        "Where the time goes for each missed target, measured with py-spy, and the "
        "changes that would close the gap: [PROFILE.md](PROFILE.md) (written by hand; "
        "it names the revision it profiled).",
        "",
        f"Python {sys.version.split()[0]}; see bench/README.md for how to run and read this.",
        "",
    ]
    return "\n".join(lines)
