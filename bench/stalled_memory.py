"""How much web-worker memory a stalled client can cost: RSS growth per stalled client.

    .venv/bin/python -m bench.stalled_memory [--clients 40] [--mib 24] [--reps 5]

Connects N raw Socket.IO clients that subscribe and then never read (small
receive buffers), publishes a flood on their topic, samples the gunicorn
worker's RSS every 20 ms until every client has been cut, and prints the
peak growth over the connected-and-idle baseline, per stalled client, next
to the configured bound (TIDINGS_CLIENT_QUEUE_BYTES). The peer, in the same
run: as many clients that read everything, through the same flood. Rounds
alternate on one worker, each with clients and a topic of its own; medians.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import statistics
import threading
import time

import psutil
import websocket

from bench.report import separate_result
from bench.systems import small_stack
from tests.support import Stack, wait_for


def subscribed(stack: Stack, topic: str, stall: bool) -> websocket.WebSocket:
    """A raw Socket.IO client on `topic`; a stalled one has a tiny receive buffer."""
    options = [(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)] if stall else []
    ws = websocket.WebSocket(sockopt=options, skip_utf8_validation=True)
    ws.connect(stack.url.replace("http", "ws") + "/socket.io/?EIO=4&transport=websocket")
    ws.recv()
    ws.send("40")
    ws.recv()
    ws.send("420" + json.dumps(["subscribe", {"topic": topic}]))
    ws.recv()
    return ws


def peak_growth(
    stack: Stack, worker: psutil.Process, clients: int, mib: int, topic: str, stall: bool
) -> int:
    """Flood `topic` (a fresh one) with `clients` on it, stalled or reading; return RSS growth."""
    assert stack.web is not None
    cut_before = stack.web.log().count("slow client cut")
    sockets = [subscribed(stack, topic, stall) for _ in range(clients)]
    count = mib * 1024 * 1024 // 8000
    received = [0] * clients

    def read(i: int) -> None:
        # Raw bytes, counted without parsing: readers in Python threads that
        # parsed frames fell behind the flood and were cut as slow.
        token, tail = b'"offset"', b""
        with contextlib.suppress(OSError):
            while received[i] < count and (chunk := sockets[i].sock.recv(1 << 20)):
                data = tail + chunk
                received[i] += data.count(token)
                tail = data[-(len(token) - 1) :]

    if not stall:
        for i in range(clients):
            threading.Thread(target=read, args=(i,), daemon=True).start()
    time.sleep(1)  # let the worker settle before the baseline: a measurement, not a sync
    baseline = worker.memory_info().rss
    peak = baseline
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, worker.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    blob = "x" * 8000
    for first in range(0, count, 50):
        stack.publish_many([(topic, {"n": n, "b": blob}) for n in range(first, first + 50)])
    if stall:
        cuts = cut_before + clients
        wait_for(lambda: stack.web.log().count("slow client cut") >= cuts, timeout=120)
    else:
        wait_for(lambda: min(received) >= count, timeout=120)
    done.set()
    sampler.join()
    for ws in sockets:
        ws.close()
    return peak - baseline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=40)
    parser.add_argument("--mib", type=int, default=24, help="MiB published in all")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-record", action="store_true", help="do not write RESULTS.md")
    args = parser.parse_args()
    stalled: list[int] = []
    reading: list[int] = []
    with small_stack("tidings-stalled-") as stack:
        assert stack.web is not None
        [worker] = psutil.Process(stack.web.pid).children()
        # A first flood grows the heap whoever reads: a warm-up round, not counted.
        peak_growth(stack, worker, args.clients, args.mib, "public.flood.warm-up", stall=False)
        for rep in range(args.reps):  # alternately: stalled, then reading clients
            for growths, stall in ((stalled, True), (reading, False)):
                topic = f"public.flood.{rep}.{'stalled' if stall else 'reading'}"
                growths.append(peak_growth(stack, worker, args.clients, args.mib, topic, stall))
        bound = stack.settings.client_queue_bytes

    def kib(growth: float) -> int:
        return round(growth / args.clients / 2**10)

    result = (
        f"{args.clients} clients, {args.mib} MiB published, {args.reps} reps each: worker RSS"
        f" peak over baseline per client, median, **{kib(statistics.median(stalled))} KiB"
        f" stalled** (runs {[kib(g) for g in stalled]}) vs {kib(statistics.median(reading))}"
        f" KiB reading (runs {[kib(g) for g in reading]});"
        f" bound TIDINGS_CLIENT_QUEUE_BYTES = {bound // 1024} KiB"
    )
    separate_result("stalled_memory", result, record=not args.no_record)


if __name__ == "__main__":
    main()
