"""Web workers killed or reloaded under traffic: clients reconnect and lose nothing."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import psutil
import pytest

from tests.support import Stack, wait_for
from tidings.client import TidingsClient

pytestmark = pytest.mark.integration

TOPIC = "public.restarts"
CLIENTS = 6


def web_workers(stack: Stack) -> list[psutil.Process]:
    assert stack.web is not None
    return psutil.Process(stack.web.pid).children()


def clients_of(worker: psutil.Process, port: int) -> int:
    """Count the client connections a web worker holds."""
    return sum(
        1
        for conn in worker.net_connections(kind="tcp")
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_ESTABLISHED
    )


class Publisher(threading.Thread):
    """Publishes durable publications at a steady pace until stopped."""

    def __init__(self, stack: Stack) -> None:
        super().__init__(daemon=True)
        self.stack = stack
        self.sent = 0
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            self.stack.publish_many([(TOPIC, {"n": self.sent + i}) for i in range(10)])
            self.sent += 10
            self.stopping.wait(0.05)  # pacing, not synchronisation


@pytest.mark.parametrize("fault", ["sigkill-worker", "sighup-master"])
def test_clients_recover_everything_across_a_web_restart(make_stack, fault: str) -> None:
    stack = make_stack(WEB_CONCURRENCY="2")
    stack.start_worker()
    stack.start_web()
    stack.wait_ready()
    received: list[list[dict[str, Any]]] = [[] for _ in range(CLIENTS)]
    clients = [TidingsClient(stack.url, on_publication=received[i].append) for i in range(CLIENTS)]
    for client in clients:
        client.connect()
        client.subscribe(TOPIC)
    before = {p.pid for p in web_workers(stack)}
    publisher = Publisher(stack)
    publisher.start()
    wait_for(lambda: publisher.sent >= 200, timeout=20)
    if fault == "sigkill-worker":
        busiest = max(web_workers(stack), key=lambda w: clients_of(w, stack.port))
        assert clients_of(busiest, stack.port) > 0
        victims = {busiest.pid}
        os.kill(busiest.pid, signal.SIGKILL)
    else:
        victims = before
        assert stack.web is not None
        stack.web.signal(signal.SIGHUP)  # new workers start, old ones stop gracefully

    def victims_gone_and_replaced() -> bool:
        now = {p.pid for p in web_workers(stack)}
        return not (now & victims) and len(now) == 2

    wait_for(victims_gone_and_replaced, timeout=30)
    # Clients of the stopped workers reconnect; publishing goes on meanwhile.
    wait_for(lambda: sum(c.connects - 1 for c in clients) >= 1, timeout=30)
    sent_after = publisher.sent
    wait_for(lambda: publisher.sent >= sent_after + 100, timeout=20)
    publisher.stopping.set()
    publisher.join()
    total = publisher.sent

    def everyone_has_everything() -> bool:
        return all(len(r) == total for r in received)

    wait_for(everyone_has_everything, timeout=60)
    for index, got in enumerate(received):
        assert [p["data"]["n"] for p in got] == list(range(total)), f"client {index}"
    reconnects = sum(c.connects - 1 for c in clients)
    recovered = sum(c.recovered for c in clients)
    print(f"\n[{fault}] {total} sent, {reconnects} reconnects, {recovered} recovered")
    for client in clients:
        client.disconnect()
