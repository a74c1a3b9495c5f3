"""The naive design (a listener thread in the web app) is wrong under gunicorn; Tidings is not.

`examples/naive_thread/app.py` is the tutorial pattern: importing the app
starts a thread that forwards `PSUBSCRIBE tidings:topic:*` to Socket.IO rooms
through a message queue. Under gunicorn with two gevent workers, measured here:

- without `--preload`: one listener per worker, every client gets every
  publication twice;
- with `--preload`: one listener, in the master, but the queue manager's
  `host_id` is shared by the forked workers, which drop the master's emits as
  their own: every publication is lost;
- in a Redis outage, even a short one, the listener thread dies and never
  comes back: everything published afterwards is lost;
- with a loop that never yields (`NAIVE_LOOP=busy`): the gevent hub starves
  and gunicorn kills the worker for a timeout, again and again.

The same load against Tidings (two web workers) reaches every client exactly
once. Counts are printed (`pytest -s`) so the run log shows them.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import socketio

from tests.support import VENV_BIN, Proc, RedisServer, Stack, free_port, wait_for
from tidings.client import TidingsClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOPIC = "public.naive"
PROBE = "public.probe"
COUNT = 50
CLIENTS = 6
WORKERS = 2
NAIVE_QUEUE = "naive:socketio"
WORKER_CLASS = "geventwebsocket.gunicorn.workers.GeventWebSocketWorker"


# -- counting ------------------------------------------------------------------


class Tally:
    """What one client received on the wire: publications of TOPIC by number, probes."""

    def __init__(self, run: str) -> None:
        self.run = run
        self.lock = threading.Lock()
        self.seen: Counter[int] = Counter()
        self.probes = 0

    def record(self, publications: Any) -> None:
        """Count a `publications` event (a list of {"topic", "offset", "data"})."""
        with self.lock:
            for pub in publications if isinstance(publications, list) else []:
                data = pub.get("data") if isinstance(pub, dict) else None
                if not isinstance(data, dict) or data.get("run") != self.run:
                    continue
                if pub.get("topic") == PROBE:
                    self.probes += 1
                elif pub.get("topic") == TOPIC:
                    self.seen[data["n"]] += 1

    def received(self) -> int:
        with self.lock:
            return sum(self.seen.values())

    def distinct(self) -> int:
        with self.lock:
            return len(self.seen)


def summary(name: str, tallies: list[Tally]) -> dict[str, int]:
    """Print and return delivered / duplicated / lost, summed over clients."""
    received = [t.received() for t in tallies]
    distinct = [t.distinct() for t in tallies]
    result = {
        "expected": COUNT * len(tallies),
        "received": sum(received),
        "delivered": sum(distinct),
        "duplicated": sum(received) - sum(distinct),
        "lost": COUNT * len(tallies) - sum(distinct),
        "max_per_client": max(received),
    }
    print(
        f"\n[{name}] {len(tallies)} clients x {COUNT} publications: "
        f"expected={result['expected']} received={result['received']} "
        f"delivered={result['delivered']} duplicated={result['duplicated']} "
        f"lost={result['lost']} per-client received={received}"
    )
    return result


def settle(tallies: list[Tally], *, quiet: float = 0.5, patience: float = 3.0) -> None:
    """Wait until the received counts stop increasing.

    Once every client has every publication, `quiet` seconds without change
    end the wait (late duplicates still get counted); short of that, the wait
    ends after `patience` seconds without change (the rest is lost).
    """
    state: dict[str, Any] = {"value": None, "since": time.monotonic()}

    def settled() -> bool:
        value = [t.received() for t in tallies]
        now = time.monotonic()
        if value != state["value"]:
            state.update(value=value, since=now)
            return False
        complete = all(t.distinct() == COUNT for t in tallies)
        return now - state["since"] >= (quiet if complete else patience)

    wait_for(settled, timeout=30)


def load(run: str) -> list[tuple[str, dict[str, Any]]]:
    return [(TOPIC, {"run": run, "n": n}) for n in range(COUNT)]


# -- the naive app under gunicorn ------------------------------------------------


def start_naive(tmp_path: Path, server: RedisServer, *extra: str, **env: str) -> tuple[Proc, str]:
    """Start the naive app under gunicorn with gevent-websocket workers."""
    port = free_port()
    args = [
        str(VENV_BIN / "gunicorn"),
        "-k",
        WORKER_CLASS,
        "--no-control-socket",
        "-b",
        f"127.0.0.1:{port}",
        "--graceful-timeout",
        "2",
        *extra,
        "examples.naive_thread.app:app",
    ]
    print(f"\n$ NAIVE_REDIS_URL={server.url(0)} gunicorn", " ".join(args[1:]))
    proc = Proc(
        "naive",
        args,
        {**os.environ, "NAIVE_REDIS_URL": server.url(0), "PYTHONUNBUFFERED": "1", **env},
        tmp_path / f"naive-{port}.log",
    )
    return proc, f"http://127.0.0.1:{port}"


def serves(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            return requests.get(url + "/healthz", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    return check


@pytest.fixture
def naive_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis server of its own: pub/sub channels are global to a server."""
    server = RedisServer(tmp_path / "naive-redis")
    server.start()
    yield server
    server.stop()


@pytest.mark.parametrize("preload", [False, True], ids=["workers", "preload"])
def test_naive_thread_is_wrong_under_gunicorn(
    tmp_path: Path, naive_redis: RedisServer, preload: bool
) -> None:
    mode = "naive --preload" if preload else "naive"
    run = uuid.uuid4().hex
    publisher = naive_redis.client()
    queue = naive_redis.client().pubsub()
    proc, url = start_naive(tmp_path, naive_redis, "-w", str(WORKERS), *(["--preload"] * preload))
    clients: list[socketio.Client] = []
    tallies: list[Tally] = []
    try:
        # Watch the queue to see how many copies the listeners put in it.
        queue.subscribe(NAIVE_QUEUE)
        wait_for(serves(url), timeout=30)
        for _ in range(CLIENTS):
            tally = Tally(run)
            sio = socketio.Client(reconnection=False)
            sio.on("publications", tally.record)
            sio.connect(url, transports=["websocket"], wait_timeout=10)
            clients.append(sio)
            tallies.append(tally)
            for topic in (TOPIC, PROBE):
                assert sio.call("subscribe", {"topic": topic}, timeout=10) == {"ok": True}

        # Ready when every client's worker consumes the message queue: a probe
        # emitted on the queue from outside (python-socketio's documented
        # external emitter) reaches every client. This path does not go
        # through the naive listener, so it says nothing about it.
        external = socketio.RedisManager(naive_redis.url(0), channel=NAIVE_QUEUE, write_only=True)

        def probed() -> bool:
            external.emit(
                "publications",
                [{"topic": PROBE, "offset": None, "data": {"run": run}}],
                room="t:" + PROBE,
                namespace="/",
            )
            return all(t.probes for t in tallies)

        wait_for(probed, timeout=20, interval=0.2)

        pipe = publisher.pipeline(transaction=False)
        for topic, data in load(run):
            pipe.publish("tidings:topic:" + topic, json.dumps(data))
        receivers = pipe.execute()  # PUBLISH answers how many listeners got it
        settle(tallies)

        copies: Counter[str] = Counter()
        while (message := queue.get_message(timeout=0.5)) is not None:
            if message["type"] != "message":
                continue
            body = json.loads(message["data"])
            item = body["data"][0][0]
            if item["topic"] == TOPIC and item["data"].get("run") == run:
                copies[body["host_id"]] += 1

        result = summary(mode, tallies)
        print(
            f"[{mode}] listeners per PUBLISH={sorted(set(receivers))}, "
            f"copies put on the queue={sum(copies.values())} "
            f"from {len(copies)} host_id(s): {dict(copies)}"
        )
        print(
            f"[{mode}] gunicorn master pid {proc.pid}; "
            + "; ".join(line for line in proc.log().splitlines() if "naive listener" in line)
        )
        # Measured, not assumed: the naive design duplicates or loses.
        assert result["duplicated"] > 0 or result["lost"] > 0, result
    finally:
        for sio in clients:
            sio.disconnect()
        queue.close()
        publisher.close()
        proc.stop()


def test_naive_busy_loop_starves_the_worker(tmp_path: Path, naive_redis: RedisServer) -> None:
    """A listener loop that never yields blocks the worker's hub until gunicorn kills it."""
    proc, url = start_naive(tmp_path, naive_redis, "-w", "1", "--timeout", "3", NAIVE_LOOP="busy")
    answers: list[bool] = []

    def killed_for_timeout() -> bool:
        answers.append(serves(url)())
        return "WORKER TIMEOUT" in proc.log() and len(answers) >= 5

    try:
        wait_for(lambda: "naive listener started" in proc.log(), timeout=30)
        wait_for(killed_for_timeout, timeout=30, interval=0.1)
        timeouts = proc.log().count("WORKER TIMEOUT")
        print(
            f"\n[naive busy loop] /healthz answered {sum(answers)} of {len(answers)} tries "
            f"(2 s timeout each); gunicorn logged WORKER TIMEOUT {timeouts} time(s)"
        )
        assert answers.count(False) > 0
    finally:
        proc.stop()


def test_naive_listener_dies_in_a_redis_outage(tmp_path: Path, naive_redis: RedisServer) -> None:
    """After an outage longer than redis-py's retry budget the thread is gone for good."""
    proc, url = start_naive(tmp_path, naive_redis, "-w", "1")
    probe_client = naive_redis.client()
    sio = socketio.Client(reconnection=True, reconnection_delay=0.2, reconnection_delay_max=1)
    run = uuid.uuid4().hex
    tally = Tally(run)
    sio.on("publications", tally.record)
    try:
        wait_for(serves(url), timeout=30)
        wait_for(lambda: probe_client.publish("tidings:topic:public.none", "{}") == 1, timeout=10)
        naive_redis.stop()
        began = time.monotonic()
        wait_for(lambda: "Exception in thread" in proc.log(), timeout=60, interval=0.1)
        died_after = time.monotonic() - began
        naive_redis.start()  # same port
        wait_for(serves(url), timeout=10)
        sio.connect(url, transports=["websocket"], wait_timeout=10)
        assert sio.call("subscribe", {"topic": TOPIC}, timeout=10) == {"ok": True}
        publisher = naive_redis.client()
        receivers = [
            publisher.publish("tidings:topic:" + topic, json.dumps(data))
            for topic, data in load(run)
        ]
        settle([tally], patience=2.0)
        publisher.close()
        print(
            f"\n[naive, Redis outage] the listener thread died {died_after:.1f} s into the "
            f"outage; after Redis came back, listeners per PUBLISH={sorted(set(receivers))}, "
            f"received {tally.received()} of {COUNT}"
        )
        assert set(receivers) == {0}
        assert tally.received() == 0
    finally:
        sio.disconnect()
        probe_client.close()
        proc.stop()


# -- Tidings under the same load ------------------------------------------------------


def test_tidings_delivers_exactly_once(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(WEB_CONCURRENCY=str(WORKERS))
    stack.start_worker()
    stack.start_web()
    stack.wait_ready()
    run = uuid.uuid4().hex
    clients: list[TidingsClient] = []
    wire: list[Tally] = []  # what arrived on the socket
    delivered: list[Tally] = []  # what the client handed to the application
    try:
        for _ in range(CLIENTS):
            on_wire, handed = Tally(run), Tally(run)
            client = TidingsClient(
                stack.url,
                on_publication=lambda pub, handed=handed: handed.record([pub]),
                transports=["websocket"],
            )
            inner = client.sio.handlers["/"]["publications"]

            def tap(pubs: Any, inner: Callable = inner, on_wire: Tally = on_wire) -> None:
                on_wire.record(pubs)
                inner(pubs)

            client.sio.on("publications", tap)
            client.connect()
            clients.append(client)
            wire.append(on_wire)
            delivered.append(handed)
            for topic in (TOPIC, PROBE):
                assert client.subscribe(topic)["ok"]

        def probed() -> bool:
            stack.publish(PROBE, {"run": run})
            return all(t.probes for t in wire)

        wait_for(probed, timeout=20, interval=0.2)

        receivers = stack.publish_many(load(run), durable=False)
        settle(wire)
        on_wire = summary(f"tidings WEB_CONCURRENCY={WORKERS}, on the wire", wire)
        handed = summary(f"tidings WEB_CONCURRENCY={WORKERS}, to the app", delivered)
        print(f"[tidings] listeners per PUBLISH={sorted(set(receivers))}")
        assert set(receivers) == {1}
        for result in (on_wire, handed):
            assert result["duplicated"] == 0, result
            assert result["lost"] == 0, result
    finally:
        for client in clients:
            client.disconnect()
