"""Interest routing with real gunicorn, Celery, Redis and Socket.IO clients.

Each web worker hears only the queue channels of its own clients' topics.
Joins while publications flow, a worker's resubscribe after its queue
connection is killed, and Redis cutting a slow queue subscriber must neither
lose nor duplicate a publication for any client, on the wire.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis
import socketio

from tests.support import RecordingClient, Stack, SteadyPublisher, children_of, wait_for
from tidings.history import parse_offset
from tidings.keys import history_key, queue_channel

pytestmark = pytest.mark.integration


class Churner(threading.Thread):
    """One connection that subscribes to a random topic, stays a little, leaves, again and again.

    Every subscription's window (its ack, then every publication of that
    topic that arrived until the unsubscribe was answered) is kept for the
    checks; a publication of a topic the connection is not subscribed to is
    a stray.
    """

    def __init__(self, url: str, topics: list[str], until: float, seed: int) -> None:
        super().__init__(daemon=True, name=f"churner-{seed}")
        self.url = url
        self.topics = topics
        self.until = until
        self.rng = random.Random(seed)
        self.sio = socketio.Client(reconnection=False)
        self.sio.on("publications", self._on_publications)
        self.lock = threading.Lock()
        self.current: tuple[str, list[dict]] | None = None
        self.windows: list[tuple[str, dict, list[dict]]] = []
        self.strays: list[dict] = []
        self.error: BaseException | None = None

    def _on_publications(self, pubs: list[dict]) -> None:
        with self.lock:
            for pub in pubs:
                if self.current is not None and pub["topic"] == self.current[0]:
                    self.current[1].append(pub)
                else:
                    self.strays.append(pub)

    def run(self) -> None:
        try:
            self.sio.connect(self.url, transports=["websocket"], wait_timeout=10)
            while time.monotonic() < self.until:
                topic = self.rng.choice(self.topics)
                pubs: list[dict] = []
                with self.lock:
                    self.current = (topic, pubs)
                ack = self.sio.call("subscribe", {"topic": topic}, timeout=10)
                time.sleep(self.rng.uniform(0.02, 0.4))  # a subscription's life
                self.sio.call("unsubscribe", {"topic": topic}, timeout=10)
                with self.lock:
                    self.current = None
                    self.windows.append((topic, ack, list(pubs)))
        except BaseException as exc:  # reported by the test
            self.error = exc
        finally:
            self.sio.disconnect()


def window_problems(client: redis.Redis, windows: list[tuple[str, dict, list[dict]]]) -> list[str]:
    """Each window must be exactly the topic's history after the ack's offset, in order."""
    problems = []
    history = {
        topic: [entry_id.decode() for entry_id, _ in client.xrange(history_key(topic))]
        for topic in {topic for topic, _, _ in windows}
    }
    for n, (topic, ack, pubs) in enumerate(windows):
        if not ack.get("ok"):
            problems.append(f"window {n} on {topic}: subscribe refused {ack}")
            continue
        got = [p["offset"] for p in pubs]
        if not got:
            continue
        start = parse_offset(ack["offset"]) or (0, 0)
        expected = [o for o in history[topic] if start < parse_offset(o) <= parse_offset(got[-1])]
        if got != expected:
            missing = sorted(set(expected) - set(got))
            extra = sorted(set(got) - set(expected))
            copies = len(got) - len(set(got))
            problems.append(
                f"window {n} on {topic} after {ack['offset']}: {len(got)} received,"
                f" {len(expected)} in history; missing {missing[:5]}, unexpected {extra[:5]},"
                f" {copies} copies, in order: {got == sorted(got, key=parse_offset)}"
            )
    return problems


def test_join_churn_while_publishing_has_no_gap_copy_or_reordering(
    make_stack: Callable[..., Stack],
) -> None:
    """20 joins/s over topics whose channels come and go: every first join races the stream."""
    stack = make_stack(TIDINGS_QUEUE_LINGER_MS="0", TIDINGS_HISTORY_SIZE="100000")
    stack.start_worker()
    stack.start_web()
    stack.wait_ready()
    # More topics than connections: topics empty out often, and their
    # channels go; the next join is a first join while publications flow.
    topics = [f"public.churn.{n}" for n in range(12)]
    publishers = [SteadyPublisher(stack, topic, rate=40) for topic in topics]
    for publisher in publishers:
        publisher.start()
    stack.redis().config_resetstat()
    until = time.monotonic() + 10
    churners = [Churner(stack.url, topics, until, seed) for seed in range(10)]
    for churner in churners:
        churner.start()
    for churner in churners:
        churner.join(timeout=40)
    for publisher in publishers:
        publisher.halt()
    assert not [c.error for c in churners if c.error], [c.error for c in churners]
    windows = [w for c in churners for w in c.windows]
    received = sum(len(pubs) for _, _, pubs in windows)
    print(f"\n[churn] {len(windows)} joins, {received} publications received in windows")
    assert len(windows) >= 100  # about 20 joins/s for 10 s
    assert received > 1000
    assert window_problems(stack.redis(), windows) == []
    assert [p for c in churners for p in c.strays] == []
    # The channels did come and go (linger 0): many first joins raced the stream.
    subscribes = stack.redis().info("commandstats")["cmdstat_subscribe"]["calls"]
    print(f"[churn] the web worker sent SUBSCRIBE {subscribes} times")
    assert subscribes >= 20
    assert "Traceback" not in stack.web.log()


def worker_queue_connections(stack: Stack) -> list[dict]:
    """CLIENT LIST entries of the web workers' queue connections."""
    return [
        c
        for c in stack.redis().client_list()
        if c.get("name", "").startswith("tidings:web:") and int(c.get("sub", 0)) > 0
    ]


def test_two_web_workers_each_hear_only_their_own_clients_topics(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack(WEB_CONCURRENCY="2")
    stack.start_worker()
    stack.start_web()
    stack.wait_ready()
    wait_for(lambda: len(worker_queue_connections(stack)) == 2, timeout=30)
    clients = []
    try:
        for n in range(12):
            client = socketio.Client(reconnection=False)
            got: list[dict] = []
            client.on("publications", got.extend)
            client.connect(stack.url, transports=["websocket"], wait_timeout=10)
            assert client.call("subscribe", {"topic": f"public.own.{n}"})["ok"]
            clients.append((client, got))
        topics = [f"public.own.{n}" for n in range(12)]
        r = stack.redis()
        # Exactly one worker hears each topic: the one holding its client.
        assert [r.pubsub_numsub(queue_channel(t))[0][1] for t in topics] == [1] * 12
        # ...and a worker holds no channel but its clients' topics (plus the control one).
        assert sum(int(c["sub"]) for c in worker_queue_connections(stack)) == 12 + 2
        stack.publish_many([(t, n) for n, t in enumerate(topics)])
        wait_for(lambda: all(len(got) == 1 for _, got in clients), timeout=10)
        assert [got[0]["data"] for _, got in clients] == list(range(12))
        # Per worker, everything received on its channels was delivered.
        webs = stack.redis().zrange("tidings:stats:webs", 0, -1)

        def routed() -> list[tuple[int, int]]:
            rows = [stack.redis().hgetall(b"tidings:stats:web:" + w) for w in webs]
            return sorted((int(h[b"routed_received"]), int(h[b"routed_delivered"])) for h in rows)

        wait_for(lambda: sum(received for received, _ in routed()) == 12, timeout=5)
        assert all(received == delivered for received, delivered in routed())
        assert len(children_of(stack.web.pid)) == 2
    finally:
        for client, _ in clients:
            client.disconnect()


class Reader:
    """A websocket Socket.IO client on some topics that records every publication raw."""

    def __init__(self, url: str, topics: list[str]) -> None:
        self.raw: list[dict] = []
        self.lock = threading.Lock()
        self.sio = socketio.Client(reconnection=False)
        self.sio.on("publications", self._on)
        self.sio.connect(url, transports=["websocket"], wait_timeout=10)
        for topic in topics:
            ack = self.sio.call("subscribe", {"topic": topic})
            assert ack["ok"], ack

    def _on(self, pubs: list[dict]) -> None:
        with self.lock:
            self.raw += pubs

    def numbers(self, topic: str) -> list[int]:
        with self.lock:
            return [p["data"]["n"] for p in self.raw if p["topic"] == topic]


def assert_each_once(readers: list[Reader], topics: list[str], sent: dict[str, int]) -> None:
    for topic in topics:
        for reader in readers:
            wait_for(lambda r=reader, t=topic: len(r.numbers(t)) >= sent[t], timeout=20)
    time.sleep(0.3)  # anything sent twice would have arrived by now
    for topic in topics:
        for reader in readers:
            assert reader.numbers(topic) == list(range(sent[topic])), topic


def test_a_killed_queue_subscriber_catches_every_topic_up(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack()
    stack.start_worker()
    stack.start_web()
    stack.wait_ready()
    topics = [f"public.kill.{n}" for n in range(3)]
    readers = [Reader(stack.url, topics) for _ in range(2)]
    publishers = [SteadyPublisher(stack, topic, rate=150) for topic in topics]
    try:
        for publisher in publishers:
            publisher.start()
        wait_for(lambda: all(r.numbers(t) for r in readers for t in topics), timeout=10)
        for _ in range(3):
            time.sleep(0.3)
            killed = stack.redis().client_kill_filter(_type="pubsub")
            assert killed >= 1
        sent = {p.topic: p.halt() for p in publishers}
        assert_each_once(readers, topics, sent)
        assert "replayed" in stack.web.log()  # it did miss some, and caught them up
    finally:
        for publisher in publishers:
            publisher.halt()
        for reader in readers:
            reader.sio.disconnect()


def test_a_queue_subscriber_redis_cuts_for_its_output_buffer_catches_up(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack(TIDINGS_HISTORY_SIZE="100000")
    stack.start_worker()
    stack.start_web()
    stack.wait_ready()
    topic = "public.buffer"
    # Clients that reconnect and recover, as real ones do: a catch-up can be
    # large enough for the slow-client bound to cut one.
    clients = [RecordingClient(stack.url) for _ in range(2)]
    try:
        for client in clients:
            client.connect()
            client.subscribe(topic)
        r = stack.redis()
        # Any pub/sub client holding more than 64 KiB of unread output is cut.
        r.config_set("client-output-buffer-limit", "pubsub 65536 32768 1")
        pad = "x" * 2000
        sent = 0
        for _ in range(10):
            # Bursts the worker cannot read as fast as Redis writes them.
            stack.publish_many([(topic, {"n": sent + i, "pad": pad}) for i in range(300)])
            sent += 300
        wait_for(lambda: "message queue: Redis unavailable" in stack.web.log(), timeout=20)
        r.config_set("client-output-buffer-limit", "pubsub 33554432 8388608 60")

        def numbers(client: RecordingClient) -> list[int]:
            return [p["data"]["n"] for p in client.delivered]

        for client in clients:
            wait_for(lambda c=client: len(numbers(c)) >= sent, timeout=30)
        time.sleep(0.3)  # anything sent twice would have arrived by now
        for client in clients:
            assert numbers(client) == list(range(sent))
            offsets = [p["offset"] for p in client.raw_pubs()]
            assert len(offsets) == len(set(offsets)), "a publication came twice on the wire"
        assert "replayed" in stack.web.log()
    finally:
        for client in clients:
            client.disconnect()


def test_an_application_emit_through_the_write_only_queue_reaches_clients(
    stack: Stack,
) -> None:
    """An external-process emit (Flask-SocketIO, write-only) still reaches clients."""
    from flask_socketio import SocketIO

    reader = Reader(stack.url, ["public.app"])
    news: list[Any] = []
    reader.sio.on("news", news.append)
    try:
        external = SocketIO(message_queue=stack.redis_server.url(0), channel="tidings:socketio")
        external.emit("news", {"to": "room"}, to="t:public.app")
        external.emit("news", {"to": "sid"}, to=reader.sio.get_sid())
        external.emit("news", {"to": "everyone"})
        wait_for(lambda: len(news) == 3, timeout=10)
        assert news == [{"to": "room"}, {"to": "sid"}, {"to": "everyone"}]
    finally:
        reader.sio.disconnect()
