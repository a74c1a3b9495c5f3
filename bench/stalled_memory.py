"""How much web-worker memory a stalled client can cost: RSS growth per stalled client.

    .venv/bin/python -m bench.stalled_memory [--clients 40] [--mib 24]

Connects N raw Socket.IO clients that subscribe and then never read (small
receive buffers), publishes a flood on their topic, samples the gunicorn
worker's RSS every 20 ms until every client has been cut, and prints the
peak growth over the connected-and-idle baseline, per stalled client, next
to the configured bound (TIDINGS_CLIENT_QUEUE_BYTES).
"""

from __future__ import annotations

import argparse
import json
import socket
import tempfile
import threading
import time
from pathlib import Path

import psutil
import websocket

from tests.support import RedisServer, Stack, wait_for


def stalled(stack: Stack, topic: str) -> websocket.WebSocket:
    ws = websocket.WebSocket(sockopt=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)])
    ws.connect(stack.url.replace("http", "ws") + "/socket.io/?EIO=4&transport=websocket")
    ws.recv()
    ws.send("40")
    ws.recv()
    ws.send("420" + json.dumps(["subscribe", {"topic": topic}]))
    ws.recv()
    return ws


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=40)
    parser.add_argument("--mib", type=int, default=24, help="MiB published in all")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="tidings-stalled-"))
    server = RedisServer(directory / "redis")
    server.start()
    stack = Stack(server, directory)
    try:
        stack.start_worker()
        stack.start_web()
        stack.wait_ready()
        assert stack.web is not None
        [worker] = psutil.Process(stack.web.pid).children()
        sockets = [stalled(stack, "public.flood") for _ in range(args.clients)]
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
        count = args.mib * 1024 * 1024 // 8000
        for start in range(0, count, 50):
            stack.publish_many(
                [("public.flood", {"n": n, "b": blob}) for n in range(start, start + 50)]
            )
        wait_for(lambda: stack.web.log().count("slow client cut") >= args.clients, timeout=120)
        done.set()
        sampler.join()
        bound = stack.settings.client_queue_bytes
        per_client = (peak - baseline) / args.clients
        print(
            f"{args.clients} stalled clients, {args.mib} MiB published: worker RSS peak "
            f"+{(peak - baseline) / 2**20:.1f} MiB over baseline, {per_client / 2**10:.0f} KiB "
            f"per stalled client (bound TIDINGS_CLIENT_QUEUE_BYTES = {bound // 1024} KiB)"
        )
        for ws in sockets:
            ws.close()
    finally:
        stack.stop()
        server.stop()


if __name__ == "__main__":
    main()
