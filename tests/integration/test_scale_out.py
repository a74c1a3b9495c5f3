"""Past one machine: real nginx in front of two gunicorn nodes, two Celery workers, one Redis.

nginx runs the shipped configuration (deploy/nginx/loopback.conf including
deploy/nginx/tidings.conf, with the ports of this test), twice: once in its
websocket-only variant (`least_conn`, no stickiness) that spreads the
websocket clients over both nodes, once as shipped (`ip_hash`) for a
long-polling client. Two more clients connect to each node directly.

Every client gets every durable publication exactly once. Then, under
load, one web node (its gunicorn master's whole process group) and the
Celery worker holding the listener lease are SIGKILLed: the clients of the
dead node reconnect through nginx to the other node and recover with
`since`, the other worker takes the listener over, and no durable
publication is lost for any client that still has a node to reach.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

from tests.support import Nginx, Stack, SteadyPublisher, nginx_binary, wait_for
from tidings.client import TidingsClient
from tidings.lease import current_holder

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOPIC = "public.scale"
RATE = 100  # durable publications per second
SPREAD_CLIENTS = 6  # websocket clients through the least_conn nginx
TAKEOVER_LIMIT = 5.0  # the contract: a listener that dies is replaced within 5 s


class Recorder(TidingsClient):
    """A TidingsClient that keeps what it delivers (once per offset) and counts raw arrivals."""

    def __init__(self, name: str, url: str, transports: list[str]) -> None:
        self.name = name
        self.delivered: list[tuple[float, int]] = []
        self.raw: Counter[int] = Counter()
        super().__init__(
            url,
            on_publication=lambda p: self.delivered.append((time.monotonic(), p["data"]["n"])),
            on_raw=lambda p: self.raw.update([p["data"]["n"]]),
            transports=transports,
        )

    def numbers(self) -> list[int]:
        with self._lock:
            return [n for _, n in self.delivered]

    def has_all(self, total: int) -> bool:
        return len(self.numbers()) >= total

    def first_after(self, moment: float, n_from: int) -> float | None:
        with self._lock:
            return next((t for t, n in self.delivered if t > moment and n >= n_from), None)


def node_clients(stack: Stack) -> int:
    """Count the established connections on a node's port held by its gunicorn workers."""
    assert stack.web is not None
    count = 0
    for worker in psutil.Process(stack.web.pid).children():
        count += sum(
            1
            for conn in worker.net_connections(kind="tcp")
            if conn.laddr
            and conn.laddr.port == stack.port
            and conn.status == psutil.CONN_ESTABLISHED
        )
    return count


def parent_of(pid: int) -> int:
    return psutil.Process(pid).ppid()


def test_two_nodes_behind_nginx_lose_nothing(
    make_stack: Callable[..., Stack], tmp_path: Path
) -> None:
    nginx_binary()
    node_a = make_stack(TIDINGS_HISTORY_SIZE="100000")
    node_b_dir = tmp_path / "node-b"
    node_b_dir.mkdir()
    # A second gunicorn instance on the same Redis: its own port (TIDINGS_BIND).
    node_b = Stack(node_a.redis_server, node_b_dir, TIDINGS_HISTORY_SIZE="100000")
    proxies: list[Nginx] = []
    clients: list[Recorder] = []
    publisher: SteadyPublisher | None = None
    try:
        node_a.start_worker(concurrency=2)
        node_a.start_worker(concurrency=2)
        node_a.start_web()
        node_b.start_web()
        node_a.wait_ready(timeout=60)
        node_b.wait_ready(timeout=60)
        spread = Nginx(tmp_path / "nginx-spread", [node_a.port, node_b.port], sticky=False)
        # ip_hash sends every loopback client to one node: B, listed first here,
        # so that the long-polling client has to move when B dies.
        sticky = Nginx(tmp_path / "nginx-sticky", [node_b.port, node_a.port], sticky=True)
        proxies = [spread, sticky]
        for proxy in proxies:
            proxy.start()

        # The app's same-origin check sees the browser's origin through nginx.
        handshake = spread.url + "/socket.io/?EIO=4&transport=polling"
        ours = requests.get(handshake, headers={"Origin": spread.url}, timeout=5)
        theirs = requests.get(handshake, headers={"Origin": "http://evil.example"}, timeout=5)
        assert (ours.status_code, theirs.status_code) == (200, 400)

        # Connect one at a time, each subscribed before the next: least_conn
        # then alternates the nodes.
        plan = [(f"nginx-ws-{i}", spread.url, ["websocket"]) for i in range(SPREAD_CLIENTS)]
        plan += [
            ("direct-a", node_a.url, ["websocket"]),
            ("direct-b", node_b.url, ["websocket"]),
            ("nginx-polling", sticky.url, ["polling"]),
        ]
        for name, url, transports in plan:
            client = Recorder(name, url, transports)
            client.connect()
            assert client.subscribe(TOPIC)["ok"]
            clients.append(client)
        spread_counts = (node_clients(node_a), node_clients(node_b))
        # Each node holds its direct client and about half of the spread ones.
        assert min(spread_counts) >= 1 + SPREAD_CLIENTS // 2 - 1, spread_counts

        publisher = SteadyPublisher(node_a, TOPIC, RATE)
        publisher.start()
        wait_for(lambda: publisher.sent >= 3 * RATE, timeout=30)
        # Every client has every publication so far, exactly once (raw, before
        # the client's de-duplication: no fault has happened yet).
        first = publisher.sent
        wait_for(lambda: all(c.has_all(first) for c in clients), timeout=30)
        for client in clients:
            assert client.numbers()[:first] == list(range(first)), client.name
            assert all(client.raw[n] == 1 for n in range(first)), client.name

        # Faults, under load. First node B's gunicorn (master and workers):
        # its clients reconnect through nginx to node A and recover with
        # `since` what was forwarded meanwhile.
        assert node_b.web is not None
        killed_at = time.monotonic()
        marker = publisher.sent
        os.killpg(node_b.web.pid, signal.SIGKILL)
        # direct-b has no node left to reach: the others must all resume.
        survivors = [c for c in clients if c.name != "direct-b"]

        def resumed_after(moment: float, n_from: int) -> float:
            arrivals = wait_for(
                lambda: (
                    [c.first_after(moment, n_from) for c in survivors]
                    if all(c.first_after(moment, n_from) for c in survivors)
                    else None
                ),
                timeout=30,
            )
            return max(arrivals) - moment

        web_resume = resumed_after(killed_at, marker)
        # Then the worker holding the lease (its main process and its pool):
        # the other worker's supervisor starts a listener, which forwards
        # what the dead one left pending.
        holder = current_holder(node_a.redis())
        assert holder is not None
        [lease_worker] = [w for w in node_a.workers if w.pid == parent_of(holder.pid)]
        worker_killed_at = time.monotonic()
        worker_marker = publisher.sent
        os.killpg(lease_worker.pid, signal.SIGKILL)

        def new_holder() -> Any:
            now = current_holder(node_a.redis())
            return now if now is not None and now.pid != holder.pid else None

        replaced = wait_for(new_holder, timeout=15)
        takeover = time.monotonic() - worker_killed_at
        worker_resume = resumed_after(worker_killed_at, worker_marker)
        while time.monotonic() - killed_at < 5:  # steady load on the survivors
            time.sleep(0.1)
        total = publisher.halt()
        complete = False
        try:
            wait_for(lambda: all(c.has_all(total) for c in survivors), timeout=60)
            complete = True
        finally:
            after = node_clients(node_a)
            print(
                f"\n[scale-out] nginx spread the websocket clients: node A {spread_counts[0]},"
                f" node B {spread_counts[1]} established connections (direct client included)"
                f"\n[scale-out] node B (gunicorn pid {node_b.web.pid}) SIGKILLed: every surviving"
                f" client delivering again after {web_resume:.2f}s"
                f"\n[scale-out] lease holder's worker {lease_worker.name} (listener pid"
                f" {holder.pid}) SIGKILLed: new listener pid {replaced.pid} after {takeover:.2f}s;"
                f" every surviving client delivering again after {worker_resume:.2f}s;"
                f" node A now holds {after} connections"
                f"\n[scale-out] {total} durable publications ({marker} before the first kill)"
            )
            for client in clients:
                numbers = client.numbers()
                twice = sum(1 for k in Counter(numbers).values() if k > 1)
                raw_twice = sum(1 for k in client.raw.values() if k > 1)
                print(
                    f"  {client.name:14} delivered {len(numbers):5} (distinct {len(set(numbers))},"
                    f" twice {twice}); raw arrivals {sum(client.raw.values())} (same offset"
                    f" twice: {raw_twice}, dropped by the client); recovered {client.recovered};"
                    f" reconnects {client.connects - 1}; gaps {client.gaps}"
                )
        assert complete
        for client in survivors:
            assert client.numbers() == list(range(total)), f"{client.name}: lost or reordered"
            assert client.gaps == 0, client.name
        moved = [c for c in survivors if c.connects > 1]
        assert moved, "nobody was on node B?"
        assert takeover < TAKEOVER_LIMIT, f"listener takeover took {takeover:.2f}s"
        assert (
            len(
                [
                    c
                    for c in node_a.redis().client_list()
                    if c.get("name", "").startswith("tidings:listener:") and int(c.get("psub", 0))
                ]
            )
            == 1
        )
    finally:
        if publisher is not None and publisher.is_alive():
            publisher.halt()
        for client in clients:
            with contextlib.suppress(Exception):
                client.disconnect()
        for proxy in proxies:
            proxy.stop()
        node_b.stop()
