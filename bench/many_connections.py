"""50,000 idle websockets on this machine, held, then one publication to every one (issue 16).

    .venv/bin/python -m bench.many_connections [--clients 50000] [--workers 4] [--hold 60]

One Tidings (`gunicorn -c gunicorn.conf.py` with WEB_CONCURRENCY web
workers, one Celery worker) on a Redis of its own. The clients are
`bench/peers/loadgen.js` processes, spread over several loopback source
addresses (about 28,000 ephemeral ports per source and destination pair)
and several processes (20,000 open files per process); each client
subscribes to one shared topic. A worker holds at most
TIDINGS_WORKER_CONNECTIONS = `--per-worker` connections (under the open-files
limit): a worker whose pool is full stops accepting and the others take
the rest, as the kernel spreads connections unevenly. Measured: the time to
connect and subscribe them all, the web workers' RSS growth and CPU per
connection, that all are still open after the hold, and one publication's
delivery to every client (lost and duplicated must be 0).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import psutil

from bench.load import Generators, Publisher
from bench.measure import cpu_seconds
from bench.report import separate_result
from bench.systems import ensure_node_modules
from tests.support import RedisServer, Stack, wait_for

TOPIC = "public.bench.many"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50_000)
    parser.add_argument("--workers", type=int, default=4, help="WEB_CONCURRENCY")
    parser.add_argument("--per-worker", type=int, default=19_000, help="worker_connections")
    parser.add_argument("--addresses", type=int, default=4, help="loopback source addresses")
    parser.add_argument("--processes", type=int, default=2, help="generators per address")
    parser.add_argument("--hold", type=float, default=60, help="seconds held before publishing")
    parser.add_argument("--no-record", action="store_true", help="do not write RESULTS.md")
    args = parser.parse_args()
    ensure_node_modules()
    directory = Path(tempfile.mkdtemp(prefix="tidings-many-"))
    server = RedisServer(directory / "redis")
    server.start()
    stack = Stack(
        server,
        directory,
        WEB_CONCURRENCY=str(args.workers),
        TIDINGS_WORKER_CONNECTIONS=str(args.per_worker),
        TIDINGS_MAX_CONNECTIONS_PER_IP="1000000",
    )
    groups: list[Generators] = []
    try:
        stack.start_worker()
        stack.start_web()
        stack.wait_ready()
        assert stack.web is not None
        master = psutil.Process(stack.web.pid)
        workers = wait_for(
            lambda: (found := master.children()) and len(found) == args.workers and found,
            timeout=30,
        )
        time.sleep(2)  # every worker subscribed and idle: a measurement, not a sync
        rss_before = sum(w.memory_info().rss for w in workers)
        cpu_before = cpu_seconds([w.pid for w in workers])
        share, extra = divmod(args.clients, args.addresses)
        started = time.monotonic()
        for index in range(args.addresses):
            groups.append(
                Generators(
                    stack.url,
                    share + (1 if index < extra else 0),
                    processes=args.processes,
                    topics=[TOPIC],
                    local_address=f"127.0.1.{10 + index}",
                    workdir=directory / f"gens{index}",
                )
            )
        failed, errors = 0, []
        for group in groups:
            _, lost, found_errors = group.wait_ready()
            failed += lost
            errors += found_errors
        connect_s = time.monotonic() - started
        cpu = cpu_seconds([w.pid for w in workers]) - cpu_before
        rss_peak = sum(w.memory_info().rss for w in workers)
        per_worker = [round((w.memory_info().rss) / 2**20) for w in workers]
        held_since = time.monotonic()
        while time.monotonic() - held_since < args.hold:
            time.sleep(1)
            rss_peak = max(rss_peak, sum(w.memory_info().rss for w in workers))
        still_open = sum(int(group.stat()["open"]) for group in groups)
        publisher = Publisher(stack.settings.redis_url)
        try:
            publisher.send([TOPIC])
            deadline = time.monotonic() + 120
            for group in groups:
                group.wait_received(group.clients, idle=10, deadline=deadline)
            reports = [group.report(publisher.expected()) for group in groups]
        finally:
            publisher.close()
        delivered = sum(r.delivered for r in reports)
        lost = sum(r.lost for r in reports)
        duplicated = sum(r.duplicated for r in reports)
        latencies = sorted(x for r in reports for x in r.latencies)
        p99 = latencies[int(len(latencies) * 0.99)] if latencies else float("nan")
        kb = (rss_peak - rss_before) / args.clients / 1024
        verdict = (
            "met"
            if (failed, lost, duplicated, still_open)
            == (
                0,
                0,
                0,
                args.clients,
            )
            else "**missed**"
        )
        result = (
            f"{args.clients:,} idle websockets on {args.workers} web workers (worker_connections "
            f"{args.per_worker:,}), clients from {len(groups) * args.processes} loadgen.js "
            f"processes on {args.addresses} loopback source addresses: connected and subscribed "
            f"in {connect_s:.1f} s ({failed} failed), web workers {kb:.1f} KB and "
            f"{cpu / args.clients * 1e3:.2f} ms of CPU per connection (RSS now "
            f"{per_worker} MB per worker), held {args.hold:.0f} s: {still_open:,} open; one "
            f"publication: **delivered {delivered:,}, lost {lost}, duplicated {duplicated}**, "
            f"p99 {p99:.0f} ms; target (50,000 held 60 s, nothing lost) {verdict}"
        )
        if errors:
            result += f"; errors: {errors[:2]}"
        separate_result("many_connections", result, record=not args.no_record)
    finally:
        for group in groups:
            group.close()
        stack.stop()
        server.stop()


if __name__ == "__main__":
    main()
