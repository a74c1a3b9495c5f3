"""Watch a Tidings deployment deliver: clients through a URL, a steady durable publisher.

    .venv/bin/python -m deploy.watch http://127.0.0.1:8080 --clients 4 --rate 20

Connects websocket clients (tidings.client: they reconnect and recover with
`since`) to one topic, publishes {"n": 0, 1, ...} durably at a steady rate
through TIDINGS_REDIS_URL, and prints once a second what each client has
received and what is missing (published over a second ago, not yet
delivered). Stop a web node or a worker meanwhile: the
clients move, and "missing" goes back to 0. Ctrl-C (or --seconds) ends it
with a summary; the exit status is 1 if anything published was not
delivered to every client.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import threading
import time

from tidings import publish
from tidings.client import TidingsClient


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="where clients connect, e.g. http://127.0.0.1:8080 (nginx)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rate", type=float, default=20, help="publications per second")
    parser.add_argument("--seconds", type=float, default=0, help="stop after this long (0: Ctrl-C)")
    parser.add_argument("--topic", default=f"public.watch.{secrets.token_hex(3)}")
    options = parser.parse_args()

    received: list[set[int]] = [set() for _ in range(options.clients)]
    lock = threading.Lock()

    def recorder(index: int):
        def record(publication: dict) -> None:
            with lock:
                received[index].add(publication["data"]["n"])

        return record

    clients = [
        TidingsClient(options.url, on_publication=recorder(i)) for i in range(options.clients)
    ]
    for client in clients:
        client.connect()
        client.subscribe(options.topic)
    print(f"{options.clients} clients on {options.url}, topic {options.topic}", flush=True)

    sent = 0
    sent_at: list[float] = []
    started = next_report = time.monotonic()
    try:
        while not options.seconds or time.monotonic() - started < options.seconds:
            try:
                publish(options.topic, {"n": sent})
                sent += 1
                sent_at.append(time.monotonic())
            except Exception as exc:  # Redis down: say so and keep going
                print(f"publish failed: {exc}", flush=True)
            now = time.monotonic()
            if now >= next_report:
                settled = sum(1 for t in sent_at if t < now - 1)  # older than a second
                report(sent, settled, received, clients, lock)
                next_report = now + 1
            time.sleep(1 / options.rate)
    except KeyboardInterrupt:
        pass
    deadline = time.monotonic() + 10  # let the last publications arrive
    while time.monotonic() < deadline and any(len(r) < sent for r in received):
        time.sleep(0.1)
    missing = report(sent, sent, received, clients, lock)
    for client in clients:
        client.disconnect()
    print("all delivered" if not missing else f"{missing} deliveries missing", flush=True)
    return 1 if missing else 0


def report(
    sent: int, settled: int, received: list[set[int]], clients: list[TidingsClient], lock
) -> int:
    """Print one line; return the deliveries missing among the first `settled` publications."""
    with lock:
        counts = [len(r) for r in received]
        missing = sum(len(set(range(settled)) - r) for r in received)
    connected = sum(1 for c in clients if c.sio.connected)
    reconnects = [c.connects - 1 for c in clients]
    print(
        f"published {sent:5}  connected {connected}/{len(clients)}  received {counts}"
        f"  missing {missing}  reconnects {reconnects}",
        flush=True,
    )
    return missing


if __name__ == "__main__":
    sys.exit(main())
