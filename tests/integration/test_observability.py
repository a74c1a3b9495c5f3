"""See inside, on the real stack: each metric moves when its event happens, /readyz turns.

gunicorn runs with several workers (prometheus_client's multiprocess mode:
any worker's /metrics reports all of them), the listener runs in a Celery
pool process and shares its counters through Redis. Events are real:
publications, bad input, a killed listener process, killed Redis
connections, a client that stops reading, a Redis outage, a stopped worker.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests
import websocket
from prometheus_client.parser import text_string_to_metric_families

from tests.support import RecordingClient, Stack, named, pid_of, topic_listeners, wait_for
from tidings.keys import INGEST_STREAM
from tidings.lease import current_holder

pytestmark = pytest.mark.integration

API_KEY = "ops-key"
OPS = {"Authorization": f"Bearer {API_KEY}"}


def scrape(stack: Stack) -> dict[tuple[str, tuple], float]:
    """Return every sample of /metrics by (name, sorted labels)."""
    answer = stack.get("/metrics")
    assert answer.status_code == 200
    found = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def metric(stack: Stack, name: str, **labels: str) -> float:
    return scrape(stack).get((name, tuple(sorted(labels.items()))), 0.0)


def total(stack: Stack, name: str) -> float:
    """Sum a metric over all its label sets."""
    return sum(v for (n, _), v in scrape(stack).items() if n == name)


def ops(stack: Stack) -> dict[str, Any]:
    answer = stack.get("/api/ops", headers=OPS)
    assert answer.status_code == 200
    return answer.json()


def queue_connection(stack: Stack) -> dict:
    """The CLIENT LIST entry of the (one) web worker's message-queue subscription."""
    (entry,) = [c for c in named(stack, "web") if int(c.get("sub", 0)) > 0]
    return entry


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_every_worker_is_reported_and_delivery_metrics_move(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack(
        WEB_CONCURRENCY="2",
        TIDINGS_API_KEY=API_KEY,
        TIDINGS_LOG_FORMAT="json",
        # gevent's monitor looks every 5 ms (default 100 ms).
        GEVENT_MAX_BLOCKING_TIME="0.005",
    )
    stack.start_worker()
    stack.start_web()
    stack.wait_ready()
    topic = "public.observed"
    # Clients until both workers serve some (the kernel picks who accepts).
    clients: list[RecordingClient] = []

    def serving_workers() -> int:
        return sum(1 for w in ops(stack)["web"] if w["clients"] > 0)

    def spread() -> bool:
        if len(clients) >= 4 and serving_workers() == 2:
            return True
        assert len(clients) < 40, "every connection went to the same worker"
        client = RecordingClient(stack.url)
        client.connect()
        client.subscribe(topic)
        clients.append(client)
        return False

    wait_for(spread, timeout=60, interval=0.3)
    try:
        n = len(clients)

        def settled() -> list[int] | None:
            counts = [w["clients"] for w in ops(stack)["web"]]
            return counts if sum(counts) == n else None

        per_worker = wait_for(settled, timeout=5)
        print(f"\n[metrics] {n} clients over workers: {per_worker}")
        assert len(per_worker) == 2
        # Whichever worker answers, the gauges are the sum over both.
        for _ in range(6):
            assert metric(stack, "tidings_connected_clients") == n
        assert metric(stack, "tidings_subscriptions", pattern="public.*") == n
        assert metric(stack, "tidings_queue_subscribed_workers") == 2

        before = scrape(stack)
        stack.publish_many([(topic, {"n": i, "pad": "x" * 1000}) for i in range(1000)])
        stack.publish(topic, {"fast": True}, durable=False)
        redis = stack.redis()
        redis.xadd(INGEST_STREAM, {"topic": topic, "data": b"\xff\xfe"})
        redis.publish("tidings:topic:not a topic", "1")
        wait_for(lambda: all(len(c.delivered) == 1001 for c in clients), timeout=30)

        def moved(name: str, **labels: str) -> float:
            key = (name, tuple(sorted(labels.items())))
            return scrape(stack).get(key, 0.0) - before.get(key, 0.0)

        wait_for(lambda: moved("tidings_forwarded_total", path="ingest") == 1000, timeout=5)
        assert moved("tidings_forwarded_total", path="pubsub") == 1
        assert moved("tidings_received_total", path="ingest") == 1001
        assert moved("tidings_received_total", path="pubsub") == 2
        assert moved("tidings_dropped_total", reason="invalid_utf8", path="ingest") == 1
        assert moved("tidings_dropped_total", reason="invalid_topic", path="pubsub") == 1
        assert moved("tidings_publish_to_emit_seconds_count", path="ingest") == 1000
        assert moved("tidings_publish_to_emit_seconds_count", path="pubsub") == 1
        # Each worker observes what it hands to its clients: 1000 per worker.
        # Counted in batches that reach the metrics twice a second or so.
        wait_for(
            lambda: moved("tidings_publish_to_send_seconds_count", path="ingest") == 2000,
            timeout=5,
        )
        events = sum(len({id(p) for p in c.raw}) for c in clients)
        sent = moved("tidings_messages_sent_total")
        assert n <= sent <= events  # one event per batch per client
        assert moved("tidings_bytes_sent_total") >= n * 1000 * 200
        # A recovery of the whole history (1000 publications, 1 MB of JSON to
        # read, decode and encode) keeps a worker's loop busy for several
        # milliseconds: gevent's monitor sees it (drained once a second).
        assert metric(stack, "tidings_gevent_hub_blocked_total") >= 0
        since = clients[0].delivered[1]["offset"]  # the first was trimmed: 1001 > 1000
        for client in clients[:2]:
            ack = client.sio.call("subscribe", {"topic": topic, "since": since}, timeout=10)
            assert ack["recovered"] and len(ack["publications"]) == 999
        wait_for(lambda: metric(stack, "tidings_gevent_hub_blocked_total") > 0, timeout=5)
        view = ops(stack)
        assert view["lease"]["held"] and view["ingest"]["lag"] == 0
        assert {d["reason"] for d in view["recent_drops"]} == {"invalid_utf8", "invalid_topic"}
    finally:
        for client in clients:
            client.disconnect()
    wait_for(lambda: metric(stack, "tidings_connected_clients") == 0, timeout=5)

    # JSON logs, one object per line, from both processes.
    assert stack.web is not None
    web = json_lines(stack.web.log())
    assert any(
        e["role"] == "web" and e["message"] == "message queue: subscribed to tidings:socketio"
        for e in web
    )
    worker = json_lines(stack.workers[0].log())
    acquired = [e for e in worker if e["message"] == "acquired the listener lease; forwarding"]
    assert acquired and acquired[0]["role"] == "listener" and acquired[0]["pid"] > 0
    drops = [e for e in worker if e["message"].startswith("dropped a publication")]
    assert {e.get("topic") for e in drops} == {topic, "not a topic"}
    assert all(set(e) >= {"ts", "level", "role", "pid", "logger", "message"} for e in web + worker)


def test_restarts_and_reconnects_are_counted(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack()
    stack.start_worker()
    stack.start_web()
    stack.wait_ready()
    assert metric(stack, "tidings_listener_restarts_total") == 0
    # The listener's Redis connections are killed: its loops reconnect.
    redis = stack.redis()
    reconnects = metric(stack, "tidings_listener_redis_reconnects_total")
    for entry in topic_listeners(stack):
        redis.client_kill_filter(_id=entry["id"])
    wait_for(
        lambda: metric(stack, "tidings_listener_redis_reconnects_total") > reconnects, timeout=10
    )
    wait_for(lambda: len(topic_listeners(stack)) == 1, timeout=10)
    # The web worker's queue connection is killed: it reconnects.
    web_reconnects = metric(stack, "tidings_web_redis_reconnects_total")
    redis.client_kill_filter(_id=queue_connection(stack)["id"])
    wait_for(lambda: metric(stack, "tidings_web_redis_reconnects_total") > web_reconnects)
    # The listener's process is killed: another one takes the lease.
    holder = current_holder(redis)
    assert holder is not None
    old = metric(stack, "tidings_listener_lease_holder", host=holder.host, pid=str(holder.pid))
    assert old == 1
    os.kill(holder.pid, signal.SIGKILL)

    def new_holder() -> bool:
        now = current_holder(redis)
        return now is not None and now.pid != holder.pid

    wait_for(new_holder, timeout=15)
    wait_for(lambda: metric(stack, "tidings_listener_restarts_total") == 1, timeout=5)
    now = current_holder(redis)
    assert now is not None
    found = scrape(stack)
    assert found[("tidings_listener_lease_holder", (("host", now.host), ("pid", str(now.pid))))]
    assert found[("tidings_listener_lease_age_seconds", ())] < 15
    # Delivery still works, and is still counted.
    assert_delivers(stack, "public.after")


def assert_delivers(stack: Stack, topic: str) -> None:
    """A new client subscribed to `topic` gets a publication made after it subscribed."""
    client = RecordingClient(stack.url)
    client.connect()
    try:
        client.subscribe(topic)
        stack.publish(topic, 1)
        wait_for(lambda: client.delivered, timeout=10)
    finally:
        client.disconnect()


def stalled_client(stack: Stack, topic: str) -> websocket.WebSocket:
    """A raw Socket.IO client that subscribes, then never reads again."""
    ws = websocket.WebSocket(sockopt=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)])
    ws.connect(stack.url.replace("http", "ws") + "/socket.io/?EIO=4&transport=websocket")
    assert ws.recv().startswith("0")
    ws.send("40")
    assert ws.recv().startswith("40")
    ws.send("420" + json.dumps(["subscribe", {"topic": topic}]))
    assert json.loads(ws.recv()[3:])[0]["ok"]
    return ws


def test_a_slow_client_cut_is_counted(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(TIDINGS_CLIENT_QUEUE_BYTES="65536", TIDINGS_API_KEY=API_KEY)
    stack.start_worker()
    stack.start_web()
    stack.wait_ready()
    topic = "public.slow"
    ws = stalled_client(stack, topic)
    try:
        assert metric(stack, "tidings_slow_client_disconnects_total") == 0
        blob = "x" * 8000
        for start in range(0, 400, 50):
            stack.publish_many([(topic, {"n": n, "blob": blob}) for n in range(start, start + 50)])
        wait_for(lambda: metric(stack, "tidings_slow_client_disconnects_total") == 1, timeout=30)
        wait_for(lambda: ops(stack)["web"][0]["slow_cuts"] == 1, timeout=5)  # sampled each second
    finally:
        ws.close()


# -- /readyz --------------------------------------------------------------------------


class ReadyzPoller(threading.Thread):
    """Polls /readyz as fast as it answers, keeping every answer."""

    def __init__(self, stack: Stack) -> None:
        super().__init__(daemon=True)
        self.url = stack.url + "/readyz"
        self.answers: list[tuple[int, list[str]]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        with requests.Session() as session:
            while not self._halt.is_set():
                try:
                    answer = session.get(self.url, timeout=5)
                    self.answers.append((answer.status_code, answer.json()["failing"]))
                except requests.RequestException:
                    time.sleep(0.01)

    def saw(self, status: int, failing: list[str]) -> bool:
        return (status, failing) in self.answers

    def halt(self) -> None:
        self._halt.set()
        self.join(timeout=10)


def test_readyz_turns_unready_when_the_queue_connection_dies(stack: Stack) -> None:
    poller = ReadyzPoller(stack)
    poller.start()
    try:
        wait_for(lambda: poller.saw(200, []), timeout=5)
        killed = 0

        def unready_seen() -> bool:
            nonlocal killed
            if poller.saw(503, ["message_queue"]):
                return True
            # The worker resubscribes within ~0.1 s; kill it again until the
            # poller catches the gap (it usually does the first time).
            stack.redis().client_kill_filter(_id=queue_connection(stack)["id"])
            killed += 1
            return False

        wait_for(unready_seen, timeout=10, interval=0.5)
        poller.answers.clear()
        wait_for(lambda: poller.saw(200, []), timeout=5)
        print(f"\n[readyz] 503 message_queue seen after {killed} CLIENT KILL(s)")
    finally:
        poller.halt()
    assert stack.web is not None
    assert "message queue: Redis unavailable" in stack.web.log()
    # And the resubscribed worker delivers.
    assert_delivers(stack, "public.ready")


def test_readyz_turns_unready_without_redis_and_back(stack: Stack) -> None:
    stack.redis_server.stop()
    answer = wait_for(lambda: _unready(stack), timeout=10)
    assert "redis" in answer["failing"]
    assert answer["checks"]["redis"]["ok"] is False
    stack.redis_server.start()
    stack.wait_ready(timeout=30)


def test_readyz_turns_unready_without_a_listener_and_back(stack: Stack) -> None:
    stack.workers[0].stop()
    answer = wait_for(lambda: _unready(stack), timeout=10)
    assert answer["failing"] == ["listener"]
    assert answer["checks"]["listener"]["detail"] == "no listener holds the lease"
    stack.start_worker()
    stack.wait_ready(timeout=30)
    assert metric(stack, "tidings_listener_restarts_total") == 1


def _unready(stack: Stack) -> dict[str, Any] | None:
    try:
        answer = stack.get("/readyz")
    except requests.RequestException:
        return None
    return answer.json() if answer.status_code == 503 else None


def test_the_lease_holder_label_names_the_forwarding_process(stack: Stack) -> None:
    holder = current_holder(stack.redis())
    assert holder is not None
    # The lease is taken before the pattern subscription shows in CLIENT LIST.
    (listener,) = wait_for(lambda: topic_listeners(stack))
    assert pid_of(listener) == holder.pid
    found = scrape(stack)
    assert found[("tidings_listener_up", ())] == 1
    assert 0 <= found[("tidings_listener_stats_age_seconds", ())] < 3
