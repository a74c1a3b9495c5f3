"""Metrics of the core: the listener's shared counters, the backlog, the web-side helpers."""

from __future__ import annotations

import json
import time

import pytest
import redis
from prometheus_client import REGISTRY

from tests.support import wait_for
from tests.unit.test_listener import Running
from tidings import metrics, stats
from tidings.forwarder import Forwarder, Publication, now_ms
from tidings.keys import (
    INGEST_GROUP,
    INGEST_STREAM,
    STATS_DROPS_KEY,
    STATS_LISTENER_KEY,
    queue_channel,
)
from tidings.settings import Settings
from webapp.queue import split_message


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


# -- the listener's counters in Redis -----------------------------------------------


def test_flush_adds_increments_and_a_successor_continues_the_counters(
    redis_client: redis.Redis,
) -> None:
    first = stats.ListenerStats()
    first.counts["starts"] += 1
    first.counts["received_ingest"] += 3
    first.forwarded("ingest", [now_ms() - 3, now_ms() - 40, None], now_ms())
    first.dropped("too_large", "pubsub", "a.b")
    first.flush(redis_client, "h:1")
    first.flush(redis_client, "h:1")  # nothing new: nothing added twice
    snap = stats.read_listener(redis_client)
    assert snap.received == {"ingest": 3} and snap.forwarded == {"ingest": 3}
    assert snap.dropped == {("too_large", "pubsub"): 1}
    assert snap.starts == 1 and snap.restarts == 0 and snap.holder == "h:1"
    buckets, total = snap.latency["ingest"]
    assert sum(buckets) == 2  # the publication without an entry time is not observed
    assert buckets[stats.bucket_index(3)] >= 1 and 0.04 <= total < 0.1
    # A listener that takes over adds to the same counters.
    second = stats.ListenerStats()
    second.counts["starts"] += 1
    second.counts["received_ingest"] += 2
    second.flush(redis_client, "h:2")
    snap = stats.read_listener(redis_client)
    assert snap.received == {"ingest": 5} and snap.restarts == 1 and snap.holder == "h:2"
    drops = stats.recent_drops(redis_client)
    assert [(d["reason"], d["path"], d["topic"]) for d in drops] == [("too_large", "pubsub", "a.b")]


def test_a_failed_flush_is_retried_without_losing_or_doubling(
    redis_client: redis.Redis, redis_server
) -> None:
    counts = stats.ListenerStats()
    counts.counts["received_pubsub"] += 5
    counts.dropped("invalid_utf8", "pubsub", "t")
    dead = redis.Redis(port=1, socket_connect_timeout=0.1)
    with pytest.raises(redis.ConnectionError):
        counts.flush(dead, "h:1")
    counts.counts["received_pubsub"] += 1
    counts.flush(redis_client, "h:1")
    snap = stats.read_listener(redis_client)
    assert snap.received == {"pubsub": 6}
    assert len(stats.recent_drops(redis_client)) == 1


def test_recent_drops_are_capped(redis_client: redis.Redis) -> None:
    counts = stats.ListenerStats()
    for i in range(stats.RECENT_DROPS + 10):
        counts.dropped("invalid_topic", "ingest", f"t{i}")
    counts.flush(redis_client, "h:1")
    assert redis_client.llen(STATS_DROPS_KEY) == stats.RECENT_DROPS
    assert stats.recent_drops(redis_client, 1)[0]["topic"] == f"t{stats.RECENT_DROPS + 9}"


def test_parse_skips_hand_edited_fields(redis_client: redis.Redis) -> None:
    redis_client.hset(
        STATS_LISTENER_KEY,
        mapping={"received:pubsub": "x", "forwarded:pubsub": "4", "latency:pubsub:99": "2"},
    )
    snap = stats.read_listener(redis_client)
    assert snap.received == {} and snap.forwarded == {"pubsub": 4}
    assert snap.latency["pubsub"][0][-1] == 2  # out-of-range bucket lands in +Inf


def test_ingest_backlog_length_pending_and_lag(
    redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    none = stats.ingest_backlog(redis_client)
    assert (none.length, none.group, none.lag) == (0, False, None)
    redis_client.xgroup_create(INGEST_STREAM, INGEST_GROUP, id="0", mkstream=True)
    for i in range(5):
        redis_client.xadd(INGEST_STREAM, {"topic": "a", "data": str(i)})
    redis_client.xreadgroup(INGEST_GROUP, "c", {INGEST_STREAM: ">"}, count=2)
    backlog = stats.ingest_backlog(redis_client)
    assert (backlog.length, backlog.pending, backlog.lag, backlog.group) == (5, 2, 3, True)
    # Redis 6.2 has no `lag` in XINFO GROUPS: it is counted instead.
    real = redis_client.xinfo_groups

    def without_lag(name: str) -> list[dict]:
        return [{k: v for k, v in g.items() if k != "lag"} for g in real(name)]

    monkeypatch.setattr(redis_client, "xinfo_groups", without_lag)
    assert stats.ingest_backlog(redis_client).lag == 3
    monkeypatch.setattr(stats, "LAG_COUNT_CAP", 2)
    capped = stats.ingest_backlog(redis_client)
    assert capped.lag == 2 and capped.lag_capped


def test_web_worker_stats_expire_from_the_index(redis_client: redis.Redis) -> None:
    stats.write_web(redis_client, "h:1", {"clients": 3})
    stats.write_web(redis_client, "h:2", {"clients": 1})
    assert [(w["worker"], w["clients"]) for w in stats.read_webs(redis_client)] == [
        ("h:1", "3"),
        ("h:2", "1"),
    ]
    assert 0 < redis_client.pttl("tidings:stats:web:h:1") <= stats.WEB_STATS_TTL_MS
    redis_client.zadd("tidings:stats:webs", {"h:1": int(time.time() * 1000) - 60_000})
    assert [w["worker"] for w in stats.read_webs(redis_client)] == ["h:2"]


# -- the listener keeps them -----------------------------------------------------------


def test_the_running_listener_counts_by_path_and_reason(
    redis_client: redis.Redis, settings: Settings
) -> None:
    running = Running(settings, redis_client).start()
    try:
        redis_client.publish("tidings:topic:public.a", b"1")
        redis_client.publish("tidings:topic:public.a", b"\xff")
        redis_client.xadd(INGEST_STREAM, {"topic": "public.b", "data": "2", "ts": now_ms()})
        redis_client.xadd(INGEST_STREAM, {"topic": "public.b", "data": "3"})  # no ts
        redis_client.xadd(INGEST_STREAM, {"topic": "bad topic", "data": "4"})

        def flushed() -> stats.ListenerSnapshot | None:
            snap = stats.read_listener(redis_client)
            return snap if snap.forwarded == {"pubsub": 1, "ingest": 2} else None

        snap = wait_for(flushed, timeout=5)
        assert snap.received == {"pubsub": 2, "ingest": 3}
        assert snap.dropped == {("invalid_utf8", "pubsub"): 1, ("invalid_topic", "ingest"): 1}
        assert sum(snap.latency["ingest"][0]) == 2 and sum(snap.latency["pubsub"][0]) == 1
        assert snap.starts == 1
        drops = {(d["reason"], d["topic"]) for d in stats.recent_drops(redis_client)}
        assert drops == {("invalid_utf8", "public.a"), ("invalid_topic", "bad topic")}
    finally:
        running.stop()
    # A second listener after the first: one restart.
    again = Running(settings, redis_client).start()
    try:
        wait_for(lambda: stats.read_listener(redis_client).restarts == 1, timeout=5)
    finally:
        again.stop()


def test_queue_messages_carry_metrics_that_clients_never_see(
    redis_client: redis.Redis,
) -> None:
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(queue_channel("a"))
    forwarder = Forwarder(redis_client, history_size=10, history_ttl=100)
    forwarder.forward(
        [
            Publication("a", '{"n":1}', 5),
            Publication("a", "2", entered_ms=7),
            Publication("a", "3"),
        ],
        path="ingest",
    )
    message = wait_for(lambda: pubsub.get_message(timeout=0.1), timeout=5)
    decoded = json.loads(message["data"])
    assert decoded["tidings"]["path"] == "ingest"
    assert decoded["tidings"]["t"] == [5, 7, None]
    body = message["data"].decode()
    inner = body[body.index('"data":[[') + len('"data":[[') : -len("]]}")]
    assert decoded["tidings"]["n"] == len(inner.encode())
    offsets = [p["offset"] for p in decoded["data"][0]]
    assert (decoded["tidings"]["first"], decoded["tidings"]["last"]) == (offsets[0], offsets[-1])
    # The list comes last, so the web tier slices it out without decoding.
    listing, meta = split_message(message["data"])
    assert json.loads(listing) == decoded["data"][0] and meta == decoded["tidings"]
    # What clients get is the contract's list, nothing more.
    assert all(set(p) == {"topic", "offset", "data"} for p in decoded["data"][0])


# -- web-side helpers ------------------------------------------------------------------


def test_latencies_land_in_the_buckets_observe_would_use() -> None:
    base = {
        le: value("tidings_publish_to_send_seconds_bucket", path="ingest", le=le)
        for le in ("0.001", "0.01", "+Inf")
    }
    count = value("tidings_publish_to_send_seconds_count", path="ingest")
    total = value("tidings_publish_to_send_seconds_sum", path="ingest")
    now = 1_000_000
    metrics.observe_latencies("ingest", [now - 1, now - 8, now + 5, None, "x", now - 100_000], now)
    after = {
        le: value("tidings_publish_to_send_seconds_bucket", path="ingest", le=le) for le in base
    }
    # 1 ms and a clock-skewed future time (0) are <= 1 ms; 8 ms <= 10 ms; 100 s only +Inf.
    assert after["0.001"] - base["0.001"] == 2
    assert after["0.01"] - base["0.01"] == 3
    assert after["+Inf"] - base["+Inf"] == 4
    assert value("tidings_publish_to_send_seconds_count", path="ingest") - count == 4
    assert value("tidings_publish_to_send_seconds_sum", path="ingest") - total == pytest.approx(
        100.009
    )


def test_labels_are_bounded() -> None:
    metrics.configure(("public.*", "news.*"))
    try:
        assert metrics.pattern_label("public.a") == "public.*"
        assert metrics.pattern_label("news.eu") == "news.*"
        assert metrics.pattern_label("orders.eu.42") == "other"
        before = value("tidings_subscription_changes_total", pattern="other", change="subscribe")
        metrics.subscription_changed("orders.eu.42", 1)
        metrics.subscription_changed("orders.eu.42", -1)
        after = value("tidings_subscription_changes_total", pattern="other", change="subscribe")
        assert after - before == 1
        hits = value("tidings_limit_hits_total", kind="other")
        metrics.limit_hit("Not A Kind!")
        metrics.limit_hit("subscriptions")
        assert value("tidings_limit_hits_total", kind="other") - hits == 1
        assert value("tidings_limit_hits_total", kind="subscriptions") >= 1
    finally:
        metrics.configure(("public.*",))
