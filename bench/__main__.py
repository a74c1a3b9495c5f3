"""`python -m bench [--quick] [--systems ...] [--workloads ...] [--out FILE]`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from bench import report, routed, systems, workloads
from bench.workloads import FULL, QUICK, Context, Row, interleaved
from tests.support import ROOT

WORKLOADS = (
    "burst",
    "sustained",
    "sustained-sse",
    "light",
    "many-topics",
    "connections",
    "connections-sse",
    "own-topics",
    "fast-burst",
    "scale-out",
)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small sizes (under a minute)")
    parser.add_argument("--systems", default=",".join(systems.ALL), help="comma-separated")
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated")
    parser.add_argument("--no-ingest", action="store_true", help="skip the durable burst row")
    parser.add_argument(
        "--out", type=Path, help="Markdown file (default bench/RESULTS.md, quick: none)"
    )
    parser.add_argument("--workdir", type=Path, help="logs and raw results")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KNOB=VALUE",
        help="override a size, e.g. --set burst_reps=5",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse(sys.argv[1:] if argv is None else argv)
    sizes = QUICK if args.quick else FULL
    # By the declared type: a float knob's default may be written as an int (`= 5`).
    kinds = {
        f.name: {"int": int, "float": float, "str": str}[str(f.type)]
        for f in dataclasses.fields(sizes)
    }
    for item in args.set:
        knob, _, value = item.partition("=")
        if knob not in kinds:
            raise SystemExit(f"unknown knob {knob!r}; see bench/workloads.py:Sizes")
        sizes = dataclasses.replace(sizes, **{knob: kinds[knob](value)})
    names = [n for n in args.systems.split(",") if n]
    chosen = [w for w in args.workloads.split(",") if w]
    for workload in chosen:
        if workload not in WORKLOADS:
            raise SystemExit(f"unknown workload {workload!r}; choose from {', '.join(WORKLOADS)}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    workdir = args.workdir or ROOT / "bench" / "results" / stamp
    workdir.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - began:6.1f}s] {message}", file=sys.stderr, flush=True)

    systems.ensure_node_modules()
    info = report.machine()
    ctx = Context(sizes, workdir, log)
    running = [systems.make(name, workdir) for name in names]
    rows: list[Row] = []
    try:
        for system in running:
            system.start()
        for system in running:
            system.wait_ready()
        log("all systems ready: " + ", ".join(s.name for s in running))
        rows = run_workloads(ctx, running, chosen, ingest=not args.no_ingest)
    finally:
        systems.stop_all(running)
    seconds = time.monotonic() - began
    table = report.text_table(rows)
    print(table)
    for target, measured, verdict in report.targets(rows):
        print(f"{verdict.strip('*'):>7}  {target}: {measured}")
    (workdir / "results.json").write_text(
        json.dumps({"machine": info, "rows": [r.as_dict() for r in rows]}, indent=1)
    )
    out = args.out or (None if args.quick else report.RESULTS)
    # The chart goes beside the Markdown that links it (quick: with the raw results).
    chart = (out.parent if out is not None else workdir) / "scale-out.png"
    drawn = report.scale_chart(rows, chart)
    if drawn:
        log(f"wrote {chart}")
    if out is not None:
        kept = report.separate_section(out.read_text()) if out.exists() else ""
        out.write_text(
            report.markdown(
                rows,
                sizes=sizes,
                quick=args.quick,
                descriptions={s.name: s.description for s in running},
                info=info,
                seconds=seconds,
                load_after=" ".join(f"{x:.2f}" for x in os.getloadavg()),
                chart=chart.name if drawn else None,
            )
            + (f"\n{kept}" if kept else "")
        )
        log(f"wrote {out}")
    log(f"done in {seconds:.0f}s; logs and raw results in {workdir}")
    return rows


def run_workloads(
    ctx: Context, running: list[systems.System], chosen: list[str], *, ingest: bool
) -> list[Row]:
    """Run the chosen workloads on every system, each workload on all systems in turn."""
    sizes = ctx.sizes
    # The sharded Node peer runs only issue 13's own-topics workload.
    classic = [s for s in running if not s.routing_peer]
    plain = [(s, False) for s in classic]
    durable = [s for s in classic if s.durable][:1]
    rows: list[Row] = []
    if "burst" in chosen:
        variants = plain + ([(s, True) for s in durable] if ingest else [])
        rows += interleaved(
            ctx, "burst", variants, workloads.burst_once, sizes.burst_reps, sizes.burst_clients
        )
    # The SSE rows: Tidings with one web worker, its clients on `GET /sse` streams,
    # each beside the websocket row of the same workload.
    one_worker = [(s, False) for s in classic if s.name == "tidings-1w"]
    sustained = []
    if "sustained" in chosen:
        sustained += workloads.variants_of(
            "sustained", plain, workloads.sustained_once, sizes.sustained_clients
        )
    if "sustained-sse" in chosen and not one_worker:
        ctx.log("sustained-sse skipped: it runs on tidings-1w, which is not among the systems")
    if "sustained-sse" in chosen:
        sustained += workloads.variants_of(
            "sustained (sse)",
            one_worker,
            workloads.sustained_sse_once,
            sizes.sse_sustained_clients,
        )
    # One rotation: the SSE runs interleaved with the websocket ones.
    rows += workloads.rotated(ctx, sustained, sizes.sustained_reps)
    if "light" in chosen:
        rows += interleaved(
            ctx, "light", plain, workloads.light_once, sizes.light_reps, sizes.light_clients
        )
    if "many-topics" in chosen:
        many = interleaved(
            ctx,
            "many-topics",
            plain,
            workloads.many_topics_once,
            sizes.many_reps,
            sizes.many_clients,
        )
        for row in many:
            row.notes.insert(
                0,
                f"{sizes.many_shared_rate:g}/s shared + {sizes.many_own_rate:g}/s "
                f"over {sizes.many_clients} own topics",
            )
        rows += many
    if "connections" in chosen or "connections-sse" in chosen:
        # Against one web worker: tidings-2w is left out. The SSE streams get a
        # Tidings of their own, held beside the others.
        single = [s for s in classic if s.name != "tidings-2w"] if "connections" in chosen else []
        rows += workloads.connections(ctx, single, sse="connections-sse" in chosen)
    if "own-topics" in chosen:
        # Tidings on its durable path with one web worker; the Node peer has pub/sub only.
        # Every one-worker Tidings (a commit's code too, to compare in one run).
        peers = [(s, False) for s in running if s.routing_peer]
        one_worker = [s for s in classic if isinstance(s, systems.Tidings) and s.workers == 1]
        rows += routed.own_topics(ctx, [(s, True) for s in one_worker] + peers)
    if "fast-burst" in chosen:
        # The listener's loss is the question: one Tidings and the Node peer answer it,
        # the naive app would take minutes (8,000 deliveries/s).
        rows += routed.fast_bursts(ctx, [s for s in classic if s in durable or s.name == "node"])
    if "scale-out" in chosen:
        rows += routed.scale_out(ctx)
    return rows


if __name__ == "__main__":
    main()
