"""Latency against CPU for the listener's batch wait (`TIDINGS_INGEST_BATCH_WAIT_US`).

    .venv/bin/python -m bench.batch_wait [--waits 0,250,500,1000,2000] [--reps 3]

One Tidings (one web worker, one listener) per wait and the sharded Node
peer, all started at once, each with 1,000 clients on topics of their own;
durable publications round robin over them at 2,000/s (pub/sub to the Node
peer), the own-topics workload of `make bench`. The systems take turns, rep
after rep, so a noisy moment of the machine lands on all of them. Per wait:
median p50, p99 and server CPU per publication (web workers and listener,
Redis aside, as in `make bench`), nothing lost; bench/batch_wait.png beside
RESULTS.md and a line in its "Separate measurements" (--no-record: printed
only).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

from bench import systems
from bench.report import RESULTS, separate_result
from bench.routed import Held
from bench.workloads import FULL, Context, Row, aggregate
from tests.support import ROOT

CHART = RESULTS.parent / "batch_wait.png"


def chart(waits: list[int], rows: list[Row], peer: Row, path: Path) -> None:
    """Draw p50, p99 and CPU per publication against the wait, the peer's as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (latency, cpu) = plt.subplots(1, 2, figsize=(11, 4.2))
    xs = [w / 1000 for w in waits]
    for field, style, label in (("p50_ms", "o-", "p50"), ("p99_ms", "s-", "p99")):
        values = [getattr(r, field) for r in rows]
        line = latency.plot(xs, values, style, label=f"Tidings {label}")[0]
        latency.axhline(
            getattr(peer, field),
            color=line.get_color(),
            linestyle="--",
            label=f"node-sharded {label}",
        )
    latency.set_ylabel("delivery latency (ms)")
    latency.set_title("latency, publisher to client")
    cpu.plot(xs, [r.cpu_us_per_delivery for r in rows], "o-", label="Tidings")
    cpu.axhline(peer.cpu_us_per_delivery, color="tab:red", linestyle="--", label="node-sharded")
    cpu.set_ylabel("server CPU per publication (us)")
    cpu.set_title("CPU per publication (Redis aside)")
    for axes in (latency, cpu):
        axes.set_xlabel("batch wait, ms (TIDINGS_INGEST_BATCH_WAIT_US / 1000)")
        axes.set_ylim(bottom=0)
        axes.legend(loc="best")
    clients, rate = rows[0].clients, rows[0].rate or 0
    figure.suptitle(f"own-topics: {clients:,} clients on topics of their own, {rate:,.0f}/s")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--waits", default="0,250,500,1000,2000", help="microseconds, commas")
    parser.add_argument("--reps", type=int, default=3, help="runs per system, in turns")
    parser.add_argument("--rate", type=float, default=FULL.own_rate, help="publications/s")
    parser.add_argument("--seconds", type=float, default=FULL.own_seconds, help="per run")
    parser.add_argument("--no-record", action="store_true", help="do not write RESULTS.md")
    args = parser.parse_args()
    waits = sorted({int(w) for w in args.waits.split(",") if w.strip()})
    workdir = ROOT / "bench" / "results" / f"batch-wait-{time.strftime('%Y%m%d-%H%M%S')}"
    workdir.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - began:6.1f}s] {message}", file=sys.stderr, flush=True)

    systems.ensure_node_modules()
    ctx = Context(dataclasses.replace(FULL, own_rate=args.rate), workdir, log)
    running: list[systems.System] = [
        systems.Tidings(workdir / f"wait-{wait}", env={"TIDINGS_INGEST_BATCH_WAIT_US": str(wait)})
        for wait in waits
    ]
    for system, wait in zip(running, waits, strict=True):
        system.name = f"tidings-1w wait {wait} us"
    running.append(systems.make("node-sharded", workdir))
    held: list[Held] = []
    runs: dict[str, list] = {}
    try:
        for system in running:
            system.start()
        for system in running:
            system.wait_ready()
        held = [Held(ctx, s, durable=not s.routing_peer) for s in running]
        for item in held:
            log(f"connecting {item.clients} clients to {item.name}")
            item.connect(ctx)
        for rep in range(args.reps):
            for item in held:
                log(f"rep {rep + 1}/{args.reps}: {item.name}")
                measured = item.measure(ctx, lambda it: it.paced(args.rate, args.seconds))
                runs.setdefault(item.name, []).append(measured)
    finally:
        for item in held:
            item.close()
        systems.stop_all(running)
    rows = [aggregate("own-topics", i.name, i.clients, runs[i.name], i.connect_s) for i in held]
    for row in rows:
        row.rate = args.rate
    *mine, peer = rows
    chart(waits, mine, peer, CHART)
    log(f"wrote {CHART}")
    lost = sum(r.lost + r.duplicated for r in rows)

    def cells(row: Row) -> str:
        ratio = row.cpu_us_per_delivery / peer.cpu_us_per_delivery
        return (
            f"p50 {row.p50_ms:.2f} / p99 {row.p99_ms:.2f} ms, {row.cpu_us_per_delivery:.0f} us"
            f" ({ratio:.2f}x)"
        )

    result = (
        f"own-topics, {held[0].clients:,} clients on topics of their own, {args.rate:,.0f}"
        f" durable publications/s, median of {args.reps} runs per system in turns; by"
        " `TIDINGS_INGEST_BATCH_WAIT_US`: "
        + "; ".join(f"{w} us: {cells(r)}" for w, r in zip(waits, mine, strict=True))
        + f"; node-sharded: p50 {peer.p50_ms:.2f} / p99 {peer.p99_ms:.2f} ms,"
        f" {peer.cpu_us_per_delivery:.0f} us per publication; lost or duplicated {lost}."
        " [Chart](batch_wait.png)"
    )
    separate_result("batch_wait", result, record=not args.no_record)


if __name__ == "__main__":
    main()
