"""The listener loop against a real Redis: both paths, bad input, lease, outages."""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.support import RedisServer, SlowPath, wait_for
from tidings.keys import INGEST_GROUP, INGEST_STREAM, LEASE_KEY, QUEUE_TOPIC_PREFIX
from tidings.lease import Lease
from tidings.listener import Listener
from tidings.settings import Settings


class Running:
    """A Listener on a thread, with the queue messages it emits collected."""

    def __init__(self, settings: Settings, client: redis.Redis) -> None:
        self.listener = Listener(settings)
        self.result: list[bool] = []
        self.thread = threading.Thread(target=lambda: self.result.append(self.listener.run()))
        self.client = client
        self.pubsub = client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.psubscribe(QUEUE_TOPIC_PREFIX + "*")
        self.received: list[dict] = []

    def start(self) -> Running:
        self.thread.start()
        wait_for(lambda: self.client.exists(LEASE_KEY), timeout=5)
        wait_for(lambda: int(self.client.pubsub_numpat()) >= 2, timeout=5)
        return self

    def publications(self) -> list[dict]:
        while (message := self.pubsub.get_message(timeout=0.01)) is not None:
            self.received += json.loads(message["data"])["data"][0]
        return self.received

    def stop(self) -> None:
        self.listener.stop()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()


@pytest.fixture
def running(redis_client: redis.Redis, settings: Settings) -> Iterator[Running]:
    listener = Running(settings, redis_client).start()
    yield listener
    listener.stop()


def test_forwards_both_paths_and_drops_bad_input_without_losing_the_rest(
    running: Running, redis_client: redis.Redis
) -> None:
    redis_client.publish("tidings:topic:public.a", b'{"n": 1}')
    redis_client.publish("tidings:topic:public.a", b"\xff not utf-8")
    redis_client.publish("tidings:topic:bad:topic", b"1")
    redis_client.publish("tidings:topic:public.a", b"x" * 70000)
    redis_client.publish("tidings:topic:public.a", b"plain")
    redis_client.xadd(INGEST_STREAM, {"topic": "public.b", "data": "[1]"})
    redis_client.xadd(INGEST_STREAM, {"topic": "public.b"})
    redis_client.xadd(INGEST_STREAM, {"nothing": "useful"})
    redis_client.xadd(INGEST_STREAM, {"topic": "public.b", "data": b"\xc3"})
    redis_client.xadd(INGEST_STREAM, {"topic": "public.b", "data": "2"})
    wait_for(lambda: len(running.publications()) >= 4, timeout=5)
    got = {(p["topic"], json.dumps(p["data"])) for p in running.publications()}
    assert got == {
        ("public.a", '{"n": 1}'),
        ("public.a", '"plain"'),
        ("public.b", "[1]"),
        ("public.b", "2"),
    }
    counts = running.listener.counts
    assert counts["dropped_invalid_utf8"] == 2
    assert counts["dropped_invalid_topic"] == 2  # bad:topic and the entry without a topic
    assert counts["dropped_too_large"] == 1 and counts["dropped_malformed"] == 1
    # Dropped ingest entries are acknowledged too: nothing stays pending.
    wait_for(lambda: redis_client.xpending(INGEST_STREAM, INGEST_GROUP)["pending"] == 0)


def test_a_second_listener_finds_the_lease_held_and_returns(
    running: Running, settings: Settings
) -> None:
    assert Listener(settings).run() is False


def test_acked_ingest_entries_are_trimmed(running: Running, redis_client: redis.Redis) -> None:
    for i in range(50):
        redis_client.xadd(INGEST_STREAM, {"topic": "public.t", "data": str(i)})
    wait_for(lambda: len(running.publications()) == 50, timeout=5)
    wait_for(lambda: redis_client.xlen(INGEST_STREAM) == 0, timeout=5)


def test_entries_left_pending_by_a_dead_listener_are_claimed(
    redis_client: redis.Redis, settings: Settings
) -> None:
    redis_client.xgroup_create(INGEST_STREAM, INGEST_GROUP, id="0", mkstream=True)
    for i in range(3):
        redis_client.xadd(INGEST_STREAM, {"topic": "public.o", "data": str(i)})
    redis_client.xreadgroup(INGEST_GROUP, "dead-listener", {INGEST_STREAM: ">"})
    running = Running(settings, redis_client)
    running.listener.claim_idle_ms = 0
    running.start()
    try:
        wait_for(lambda: len(running.publications()) == 3, timeout=5)
        assert [p["data"] for p in running.publications()] == [0, 1, 2]
    finally:
        running.stop()


def test_stops_when_another_listener_takes_the_lease(
    running: Running, redis_client: redis.Redis, settings: Settings
) -> None:
    redis_client.set(LEASE_KEY, "another listener's token")
    wait_for(lambda: not running.thread.is_alive(), timeout=5)
    assert running.result == [True]
    assert redis_client.get(LEASE_KEY) == b"another listener's token"


def test_stop_releases_the_lease_at_once(redis_client: redis.Redis, settings: Settings) -> None:
    running = Running(settings, redis_client).start()
    running.stop()
    assert not redis_client.exists(LEASE_KEY)


def test_goes_on_after_a_redis_restart(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    settings = Settings.from_env({"TIDINGS_REDIS_URL": server.url()})
    client = server.client()
    running = Running(settings, client).start()
    try:
        client.publish("tidings:topic:public.r", b"1")
        wait_for(lambda: len(running.publications()) == 1, timeout=5)
        server.stop()
        server.start()
        running.pubsub = client.pubsub(ignore_subscribe_messages=True)
        running.pubsub.psubscribe(QUEUE_TOPIC_PREFIX + "*")

        def delivered_again() -> bool:
            client.publish("tidings:topic:public.r", b"2")
            return any(p["data"] == 2 for p in running.publications())

        wait_for(delivered_again, timeout=10, interval=0.2)
        # The ingest path too: its stream and group were lost with the data.
        client.xadd(INGEST_STREAM, {"topic": "public.r", "data": "3"})
        wait_for(lambda: any(p["data"] == 3 for p in running.publications()), timeout=10)
        # The lease came back with it (the restarted Redis had no data).
        assert Lease(client, 1000, since_ms=0).acquire() is False
    finally:
        running.stop()
        server.stop()


def test_waiting_publishers_get_the_offset_or_the_drop_reason(
    running: Running, redis_client: redis.Redis, settings: Settings
) -> None:
    from tidings.publishing import PublishError, publish, publish_many

    offset = publish("public.w", {"n": 1}, wait=True, client=redis_client, settings=settings)
    assert redis_client.xrange("tidings:history:public.w")[-1][0].decode() == offset
    offsets = publish_many(
        [("public.w", 2), ("public.v", 3)], wait=True, client=redis_client, settings=settings
    )
    assert len(offsets) == 2 and all(isinstance(o, str) for o in offsets)
    # A publication the listener drops (raw XADD of bad UTF-8) tells its waiter why.
    entry = redis_client.xadd(INGEST_STREAM, {"topic": "public.w", "data": b"\xff", "receipt": "1"})
    from tidings.publishing import await_receipts

    with pytest.raises(PublishError, match="invalid_utf8"):
        await_receipts([entry.decode()], timeout=5, client=redis_client)
    assert not redis_client.keys("tidings:receipt:*")


def test_waiting_without_a_listener_times_out(
    redis_client: redis.Redis, settings: Settings
) -> None:
    from tidings.publishing import PublishTimeout, publish

    with pytest.raises(PublishTimeout):
        publish("public.w", 1, wait=True, timeout=0.3, client=redis_client, settings=settings)


def test_fuzzed_input_never_stops_the_valid_publications(
    running: Running, redis_client: redis.Redis
) -> None:
    """Random bytes on both inputs, a fixed budget, valid publications interleaved."""
    import random

    rng = random.Random(20261128)
    expected = []
    pipe = redis_client.pipeline(transaction=False)
    for n in range(1500):
        junk = rng.randbytes(rng.randint(0, 300))
        channel = b"tidings:topic:" + rng.choice([b"public.f", rng.randbytes(rng.randint(0, 20))])
        pipe.publish(channel, junk)
        fields = {rng.randbytes(rng.randint(1, 8)): rng.randbytes(rng.randint(0, 50))}
        if rng.random() < 0.5:
            fields[b"topic"] = rng.choice([b"public.f", rng.randbytes(6)])
        pipe.xadd(INGEST_STREAM, fields)
        if n % 10 == 0:
            pipe.xadd(INGEST_STREAM, {"topic": "public.valid", "data": str(n)})
            expected.append(n)
    pipe.execute()

    def valid() -> list:
        return [p["data"] for p in running.publications() if p["topic"] == "public.valid"]

    wait_for(lambda: len(valid()) == len(expected), timeout=20)
    assert valid() == expected
    assert running.thread.is_alive()
    wait_for(lambda: redis_client.xpending(INGEST_STREAM, INGEST_GROUP)["pending"] == 0)


def test_entries_it_read_before_a_reconnect_are_forwarded_once(
    redis_client: redis.Redis, settings: Settings
) -> None:
    """Its own pending entries come back from both XREADGROUP 0 and XAUTOCLAIM."""
    listener = Listener(settings)
    redis_client.xgroup_create(INGEST_STREAM, INGEST_GROUP, id="0", mkstream=True)
    for i in range(3):
        redis_client.xadd(INGEST_STREAM, {"topic": "public.once", "data": str(i)})
    # As if this very listener had read them and lost its connection before forwarding.
    redis_client.xreadgroup(INGEST_GROUP, listener.consumer, {INGEST_STREAM: ">"})
    running = Running(settings, redis_client)
    running.listener = listener
    running.thread = threading.Thread(target=lambda: running.result.append(listener.run()))
    running.start()
    try:
        wait_for(lambda: len(running.publications()) >= 3, timeout=5)
        wait_for(lambda: redis_client.xpending(INGEST_STREAM, INGEST_GROUP)["pending"] == 0)
        assert redis_client.xlen("tidings:history:public.once") == 3
        assert [p["data"] for p in running.publications()] == [0, 1, 2]
    finally:
        running.stop()


def test_a_burst_whose_replies_arrive_in_pieces_is_forwarded_whole_without_a_reconnect(
    redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    """redis-py's get_message(timeout=0) took a half-arrived reply for an outage: 58 of 2,000."""
    path = SlowPath(redis_server.port)
    settings = Settings.from_env(
        {"TIDINGS_REDIS_URL": path.url(0), "TIDINGS_HISTORY_SIZE": "100000"}
    )
    running = Running(settings, redis_client).start()
    try:
        sent = 2000
        pipe = redis_client.pipeline(transaction=False)
        for n in range(sent):
            pipe.publish("tidings:topic:public.burst", json.dumps({"n": n, "pad": "x" * 100}))
            if n % 50 == 49:
                # Pipelined bursts, each flushed on its own: the listener
                # catches up with the stream mid-reply between them.
                pipe.execute()
        pipe.execute()
        history = "tidings:history:public.burst"
        wait_for(lambda: redis_client.xlen(history) >= sent, timeout=30)
        entries = redis_client.xrange(history)
        assert [json.loads(fields[b"d"])["n"] for _, fields in entries] == list(range(sent))
        assert running.listener.counts["redis_reconnects"] == 0
    finally:
        running.stop()
        path.close()


def _trickle_calls(redis_client: redis.Redis, sent: int) -> int:
    """Publish `sent` durable publications one at a time at ~2,000/s; the listener's calls."""
    import time

    redis_client.config_resetstat()
    start = time.monotonic()
    for n in range(sent):
        redis_client.xadd(INGEST_STREAM, {"topic": "public.trickle", "data": str(n)})
        time.sleep(max(0.0, start + (n + 1) / 2000 - time.monotonic()))
    wait_for(lambda: redis_client.xlen("tidings:history:public.trickle") == sent, timeout=10)
    stats = redis_client.info("commandstats")
    data = [json.loads(f[b"d"]) for _, f in redis_client.xrange("tidings:history:public.trickle")]
    assert data == list(range(sent))
    # Script calls and wake-up reads.
    return sum(stats.get(f"cmdstat_{c}", {}).get("calls", 0) for c in ("evalsha", "xread"))


def test_a_busy_trickle_of_durable_publications_is_forwarded_a_few_per_call(
    running: Running, redis_client: redis.Redis
) -> None:
    """At ~2,000/s, one arrival at a time, the listener must not make a call per publication."""
    calls = _trickle_calls(redis_client, 1000)
    assert calls < 1000, f"{calls} calls for 1000 publications"


def test_with_no_batch_wait_each_publication_goes_as_it_arrives(
    redis_client: redis.Redis, settings: Settings
) -> None:
    """TIDINGS_INGEST_BATCH_WAIT_US=0: a wake-up and a forward per publication, none held back."""
    listener = Running(dataclasses.replace(settings, ingest_batch_wait_us=0), redis_client)
    listener.start()
    try:
        calls = _trickle_calls(redis_client, 500)
    finally:
        listener.stop()
    assert calls >= 2 * 500 * 0.9, f"{calls} calls for 500 publications"
