"""Redis outages of 1 s, 10 s and 40 s: delivery stops, the processes do not.

Redis is killed and started again on the same port (empty: the test server
keeps no data). No process exits, the listener resubscribes, every web
worker's message-queue loop comes back (`/readyz` 200 again), and a durable
publication published right after Redis returns reaches every client within
5 seconds.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.support import RecordingClient, Stack, children_of, named, wait_for
from tidings.publishing import publish_many

pytestmark = pytest.mark.integration

TOPIC = "public.outage"
CLIENTS = 3
WEB_WORKERS = 2
RESUME_LIMIT = 5.0


class OutageClient(RecordingClient):
    """A recording client that can say what an outage's publisher got through."""

    def got(self, data: Any) -> bool:
        with self._raw_lock:
            return any(p.get("data") == data for _, p in self.raw)

    def first_arrival(self, tag: str) -> float | None:
        """Return when the first publication of an outage's publisher arrived."""
        with self._raw_lock:
            for arrived, pub in self.raw:
                data = pub.get("data")
                if isinstance(data, dict) and data.get("outage") == tag:
                    return arrived
        return None

    def numbers(self, tag: str) -> list[int]:
        """Return the numbers of an outage's publications received, raw, in arrival order."""
        with self._raw_lock:
            return [
                p["data"]["n"]
                for _, p in self.raw
                if isinstance(p.get("data"), dict) and p["data"].get("outage") == tag
            ]


class Publisher(threading.Thread):
    """Publishes {"outage": tag, "n": 0, 1, ...} durably, every 50 ms."""

    def __init__(self, stack: Stack, tag: str) -> None:
        super().__init__(daemon=True, name=f"publisher-{tag}")
        self.stack = stack
        self.tag = tag
        self.sent = 0
        self._halt = threading.Event()

    def run(self) -> None:
        client = self.stack.redis_server.client()
        try:
            while not self._halt.is_set():
                publish_many(
                    [(TOPIC, {"outage": self.tag, "n": self.sent})],
                    client=client,
                    settings=self.stack.settings,
                )
                self.sent += 1
                self._halt.wait(0.05)
        finally:
            client.close()

    def halt(self) -> int:
        self._halt.set()
        self.join(timeout=10)
        return self.sent


def eventually(condition: Callable[[], Any], timeout: float) -> bool:
    """Poll like wait_for, but answer False at the deadline instead of failing."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def processes(stack: Stack) -> dict[str, set[int]]:
    """Return every process of the stack: mains and their children."""
    procs = [stack.web, *stack.workers]
    return {p.name: {p.pid} | children_of(p.pid) for p in procs}


def listener_subscribed(stack: Stack) -> bool:
    """One listener pattern-subscribed, and a topic channel reaches exactly it."""
    subscribed = [c for c in named(stack, "listener") if int(c.get("psub", 0)) > 0]
    return len(subscribed) == 1 and stack.redis().publish("tidings:topic:outage-probe", "1") == 1


def queues_subscribed(stack: Stack) -> bool:
    """Every web worker's message-queue connection is subscribed again."""
    subscribed = {c["name"] for c in named(stack, "web") if int(c.get("sub", 0)) > 0}
    return len(subscribed) == WEB_WORKERS and (
        stack.redis().publish("tidings:socketio", '{"probe": "ignored: no method"}') == WEB_WORKERS
    )


@pytest.fixture
def outage_stack(make_stack: Callable[..., Stack]) -> Stack:
    # Append-only persistence, as `make run` and any production Redis have: a
    # restart keeps history, so the web tier catches up instead of resyncing.
    stack = make_stack(appendonly=True, WEB_CONCURRENCY=str(WEB_WORKERS))
    stack.start_worker()
    stack.start_worker()
    stack.start_web()
    stack.wait_ready(timeout=30)
    wait_for(lambda: listener_subscribed(stack), timeout=15)
    wait_for(lambda: queues_subscribed(stack), timeout=15)
    return stack


def outage(stack: Stack, clients: list[OutageClient], seconds: float, problems: list[str]) -> float:
    """Stop Redis for `seconds`, start it again; return how long until delivery resumed."""
    tag = f"{seconds:g}s"
    before = processes(stack)
    stack.redis_server.stop()
    # The outage is seen: /readyz says Redis is down.
    wait_for(lambda: not stack.ready(), timeout=10)
    time.sleep(seconds)
    stack.redis_server.start()
    back = time.monotonic()
    # Durable publications from just after Redis returned (the ingest stream
    # is recreated on the empty server), one every 50 ms.
    publisher = Publisher(stack, tag)
    publisher.start()
    try:
        arrivals = wait_for(
            lambda: (
                [c.first_arrival(tag) for c in clients]
                if all(c.first_arrival(tag) for c in clients)
                else None
            ),
            timeout=30,
        )
        resumed = max(arrivals) - back
        wait_for(stack.ready, timeout=15)
        ready_after = time.monotonic() - back
        wait_for(lambda: listener_subscribed(stack), timeout=10)
        wait_for(lambda: queues_subscribed(stack), timeout=10)
        time.sleep(0.2)
    finally:
        total = publisher.halt()

    # Fast publications flow again too (the listener resubscribed).
    fast = {"outage-fast": tag}
    stack.publish(TOPIC, fast, durable=False)
    wait_for(lambda: all(c.got(fast) for c in clients), timeout=5)

    # Every durable publication from after Redis returned reaches every
    # client that stayed connected, once and in publish order.
    everything = list(range(total))
    eventually(lambda: all(sorted(c.numbers(tag)) == everything for c in clients), timeout=10)
    for index, client in enumerate(clients):
        got = client.numbers(tag)
        missing = sorted(set(everything) - set(got))
        if missing:
            problems.append(
                f"{tag} outage: client {index} never received {len(missing)} of {total} durable"
                f" publications published after Redis returned: n={missing[:20]}"
            )
        if len(got) != len(set(got)):
            problems.append(f"{tag} outage: client {index} received duplicates")
        if got != sorted(got):
            late = [(i, n) for i, n in enumerate(got) if i and n < max(got[:i])]
            problems.append(
                f"{tag} outage: client {index} out of publish order at (position, n): {late[:10]}"
            )

    after = processes(stack)
    print(
        f"\n[outage {tag}] delivery resumed {resumed:.3f}s after Redis returned (first"
        f" delivery to every client: {', '.join(f'{a - back:.3f}s' for a in arrivals)});"
        f" /readyz 200 after {ready_after:.3f}s"
    )
    assert stack.web.alive() and all(w.alive() for w in stack.workers), "a main process exited"
    assert after == before, f"processes changed across the outage: {before} -> {after}"
    for client in clients:
        assert client.sio.connected
    return resumed


def run_outages(stack: Stack, durations: list[float]) -> None:
    clients = [OutageClient(stack.url) for _ in range(CLIENTS)]
    problems: list[str] = []
    try:
        for client in clients:
            client.connect()
            assert client.subscribe(TOPIC)["ok"]
        stack.publish(TOPIC, {"before": True})
        wait_for(lambda: all(c.got({"before": True}) for c in clients), timeout=10)
        resumes = [outage(stack, clients, seconds, problems) for seconds in durations]
        print(
            "\n[outages] resume times: "
            + ", ".join(
                f"{d:g}s outage -> {r:.3f}s" for d, r in zip(durations, resumes, strict=True)
            )
        )
        for duration, resume in zip(durations, resumes, strict=True):
            assert resume < RESUME_LIMIT, (
                f"{duration}s outage: delivery resumed after {resume:.3f}s"
            )
        for index, client in enumerate(clients):
            offsets = [p["offset"] for _, p in client.raw]
            assert len(offsets) == len(set(offsets)), f"client {index} got duplicates"
        assert not problems, "\n".join(problems)
    finally:
        for client in clients:
            client.disconnect()


def test_short_outages(outage_stack: Stack) -> None:
    run_outages(outage_stack, [1, 10])


@pytest.mark.slow
def test_an_outage_longer_than_every_timeout(outage_stack: Stack) -> None:
    # Longer than gunicorn's worker timeout (30 s), the listener lease's TTL
    # and every reconnect backoff: nothing may wait for Redis to live.
    run_outages(outage_stack, [40])
