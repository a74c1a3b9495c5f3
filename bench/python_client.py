"""CPU per delivery of the Python client (`tidings.client`), UTF-8 check off and on.

    .venv/bin/python -m bench.python_client [--clients 5] [--publications 3000] [--reps 3]

Connects N `TidingsClient`s to one topic, publishes 1 KB publications in
batches of 10, and counts the CPU time of the client's threads (engine.io's
read and write threads; the main thread, which publishes, is left out) until
every client has every publication. The peer in the same run is the same
client with websocket-client's pure-Python UTF-8 check turned back on
(`skip_utf8_validation=False`); the two alternate, rep by rep. The result
goes to bench/RESULTS.md's "Separate measurements" (`--no-record`: printed only).
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from pathlib import Path

from bench.report import separate_result
from bench.systems import small_stack
from tests.support import Stack, wait_for
from tidings.client import TidingsClient

TOPIC = "public.bench.client"
BLOB = "x" * 1000
TICK = os.sysconf("SC_CLK_TCK")


def other_threads_cpu() -> float:
    """Seconds of CPU used so far by this process's threads except the main one."""
    main = threading.main_thread().native_id
    total = 0
    for tid in os.listdir("/proc/self/task"):
        if int(tid) == main:
            continue
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # a thread that just ended
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / TICK


def measure(stack: Stack, clients: int, publications: int, check: bool, start: int) -> float:
    """Return the client threads' CPU microseconds per delivery."""
    got = [0]
    lock = threading.Lock()

    def count(pub: dict) -> None:
        with lock:
            got[0] += 1

    connected = []
    for _ in range(clients):
        client = TidingsClient(
            stack.url,
            on_publication=count,
            websocket_extra_options={"skip_utf8_validation": not check},
        )
        client.connect()
        assert client.subscribe(TOPIC)["ok"]
        connected.append(client)
    before = other_threads_cpu()
    for first in range(start, start + publications, 10):
        stack.publish_many([(TOPIC, {"n": n, "blob": BLOB}) for n in range(first, first + 10)])
        time.sleep(0.005)  # a steady stream, not one burst: pacing, not a sync
    wait_for(lambda: got[0] >= clients * publications, timeout=300)
    spent = other_threads_cpu() - before
    for client in connected:
        client.disconnect()
    return spent / (clients * publications) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--publications", type=int, default=3000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-record", action="store_true", help="do not write RESULTS.md")
    args = parser.parse_args()
    runs: dict[bool, list[float]] = {False: [], True: []}
    with small_stack("tidings-client-cpu-") as stack:
        start = 0
        for _ in range(args.reps):
            for check in (False, True):
                runs[check].append(measure(stack, args.clients, args.publications, check, start))
                start += args.publications
    off, on = statistics.median(runs[False]), statistics.median(runs[True])
    if not off:
        raise SystemExit("too little CPU to measure (clock ticks of 10 ms): publish more")
    result = (
        f"{args.clients} clients x {args.publications} publications of 1 KB, {args.reps} reps:"
        f" client CPU per delivery, median, {off:.1f} us as shipped (UTF-8 check off),"
        f" {on:.1f} us with websocket-client's check on: **{on / off:.1f}x**"
        f" (runs: off {[round(x, 1) for x in runs[False]]}, on {[round(x, 1) for x in runs[True]]})"
    )
    separate_result("python_client", result, record=not args.no_record)


if __name__ == "__main__":
    main()
