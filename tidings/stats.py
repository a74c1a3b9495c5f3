"""Operational statistics shared through Redis: the listener's counters, web workers, backlog.

The listener runs in a Celery pool process that nobody scrapes, so it keeps
its counters in memory and adds the increments to one Redis hash
(`tidings:stats:listener`) about once a second; the web tier's `/metrics`
renders that hash, and operators scrape one endpoint. Increments (HINCRBY),
not absolute values: a listener that takes over continues the same counters,
so they only go down when Redis loses the hash (a restart without
persistence), which Prometheus treats as any counter reset.

Each web worker likewise refreshes a small hash with an expiry
(`tidings:stats:web:<host>:<pid>`) for the operator view, which needs one
line per worker. Nothing here is on the delivery path: a failed flush is
retried with the next one, and nothing is lost but the timing.

No Flask, Celery, gevent or prometheus_client here: the listener imports it.
"""

from __future__ import annotations

import json
import os
import socket
import time
from bisect import bisect_left
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import redis

from tidings.keys import (
    INGEST_GROUP,
    INGEST_STREAM,
    STATS_DROPS_KEY,
    STATS_LISTENER_KEY,
    STATS_WEB_INDEX,
    web_stats_key,
)

# Upper bounds (seconds) of the latency histograms, listener and web alike.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
_BOUNDS_MS = tuple(bound * 1000 for bound in LATENCY_BUCKETS)
PATHS = ("pubsub", "ingest")
RECENT_DROPS = 50
# A web worker's hash outlives its last refresh by this long.
WEB_STATS_TTL_MS = 5000
# Counting a lag without XINFO's `lag` (Redis < 7) reads at most this many ids.
LAG_COUNT_CAP = 10_000


def bucket_index(latency_ms: float) -> int:
    """Return the histogram bucket of a latency (len(LATENCY_BUCKETS) is +Inf)."""
    return bisect_left(_BOUNDS_MS, latency_ms)


def worker_name() -> str:
    """Return this process's `<host>:<pid>`, as in its Redis client names."""
    return f"{socket.gethostname().replace(' ', '_')}:{os.getpid()}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# -- the listener's side ---------------------------------------------------------


class ListenerStats:
    """The listener's counters in memory, flushed to Redis as increments.

    `counts` is written by the listener's loops (one thread per path, so
    each latency histogram has a single writer) and read by `flush`, which
    copies it first: copying a dict is atomic under the GIL.
    """

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._latency = {path: [0] * (len(LATENCY_BUCKETS) + 1) for path in PATHS}
        self._latency_sum_us = dict.fromkeys(PATHS, 0)
        self._drops: deque[str] = deque(maxlen=RECENT_DROPS)
        self._flushed: dict[str, int] = {}
        self._last_flush = time.monotonic()
        self._last_forwarded = 0

    def forwarded(self, path: str, entered_ms: Iterable[int | None], now_ms: int) -> None:
        """Count one forwarded batch and its publish-to-emit latencies."""
        buckets = self._latency[path]
        total_us = 0
        n = 0
        for entered in entered_ms:
            n += 1
            if entered is None:
                continue
            latency = max(now_ms - entered, 0)
            buckets[bisect_left(_BOUNDS_MS, latency)] += 1
            total_us += latency * 1000
        self._latency_sum_us[path] += total_us
        self.counts["forwarded_" + path] += n

    def dropped(self, reason: str, path: str, topic: str) -> None:
        """Count a dropped publication and keep it for the recent-drops list."""
        self.counts[f"drop:{reason}:{path}"] += 1
        entry = {"ts": int(time.time() * 1000), "reason": reason, "path": path}
        self._drops.append(json.dumps({**entry, "topic": topic[:140]}))

    def _fields(self) -> dict[str, int]:
        fields: dict[str, int] = {}
        for key, value in dict(self.counts).items():
            name = _hash_field(key)
            if name is not None:
                fields[name] = value
        for path in PATHS:
            for index, count in enumerate(list(self._latency[path])):
                if count:
                    fields[f"latency:{path}:{index}"] = count
            if self._latency_sum_us[path]:
                fields[f"latency_sum_us:{path}"] = self._latency_sum_us[path]
        return fields

    def flush(self, client: redis.Redis, holder: str) -> None:
        """Add what changed since the last flush to `tidings:stats:listener`.

        MULTI/EXEC: all increments land or none, so a failed flush is simply
        retried by the next one. Raises redis errors (callers ignore them).
        """
        fields = self._fields()
        deltas = {k: v - self._flushed.get(k, 0) for k, v in fields.items()}
        now = time.monotonic()
        forwarded = sum(v for k, v in fields.items() if k.startswith("forwarded:"))
        elapsed = max(now - self._last_flush, 1e-3)
        rate = (forwarded - self._last_forwarded) / elapsed
        drops = []
        while self._drops:
            try:
                drops.append(self._drops.popleft())
            except IndexError:
                break
        pipe = client.pipeline(transaction=True)
        for name, delta in deltas.items():
            if delta:
                pipe.hincrby(STATS_LISTENER_KEY, name, delta)
        pipe.hset(
            STATS_LISTENER_KEY,
            mapping={
                "updated_ms": int(time.time() * 1000),
                "holder": holder,
                "rate": f"{rate:.3f}",
            },
        )
        if drops:
            pipe.lpush(STATS_DROPS_KEY, *drops)
            pipe.ltrim(STATS_DROPS_KEY, 0, RECENT_DROPS - 1)
        try:
            pipe.execute()
        except redis.RedisError:
            # Put the drops back for the next try (newest stay if it overflows).
            self._drops.extendleft(reversed(drops))
            raise
        self._flushed = fields
        self._last_flush = now
        self._last_forwarded = forwarded


def _hash_field(key: str) -> str | None:
    """Map a listener count to its hash field; None for counts not exported."""
    if key.startswith("received_"):
        return "received:" + key[len("received_") :]
    if key.startswith("forwarded_"):
        return "forwarded:" + key[len("forwarded_") :]
    if key.startswith("drop:"):
        return "dropped:" + key[len("drop:") :]
    if key == "redis_reconnects":
        return "reconnects"
    if key == "starts":
        return "starts"
    return None


# -- readers (web tier, doctor) ---------------------------------------------------


@dataclass
class ListenerSnapshot:
    """What `tidings:stats:listener` says, parsed."""

    received: dict[str, int] = field(default_factory=dict)
    forwarded: dict[str, int] = field(default_factory=dict)
    dropped: dict[tuple[str, str], int] = field(default_factory=dict)
    starts: int = 0
    reconnects: int = 0
    # path -> (per-bucket counts, the last one +Inf; sum in seconds)
    latency: dict[str, tuple[list[int], float]] = field(default_factory=dict)
    updated_ms: int | None = None
    holder: str | None = None
    rate: float = 0.0

    @property
    def restarts(self) -> int:
        """Lease acquisitions after the first: listeners that took over."""
        return max(self.starts - 1, 0)


def parse_listener(raw: dict) -> ListenerSnapshot:
    """Parse the HGETALL reply of `tidings:stats:listener`."""
    snap = ListenerSnapshot()
    sums: dict[str, float] = {}
    buckets: dict[str, list[int]] = {}
    for key, value in raw.items():
        name, text = _text(key), _text(value)
        kind, _, rest = name.partition(":")
        try:
            if kind == "received":
                snap.received[rest] = int(text)
            elif kind == "forwarded":
                snap.forwarded[rest] = int(text)
            elif kind == "dropped":
                reason, _, path = rest.partition(":")
                snap.dropped[(reason, path)] = int(text)
            elif kind == "latency":
                path, _, index = rest.partition(":")
                counts = buckets.setdefault(path, [0] * (len(LATENCY_BUCKETS) + 1))
                counts[min(int(index), len(LATENCY_BUCKETS))] += int(text)
            elif kind == "latency_sum_us":
                sums[rest] = int(text) / 1e6
            elif name == "starts":
                snap.starts = int(text)
            elif name == "reconnects":
                snap.reconnects = int(text)
            elif name == "updated_ms":
                snap.updated_ms = int(text)
            elif name == "holder":
                snap.holder = text
            elif name == "rate":
                snap.rate = float(text)
        except ValueError:
            continue  # a hand-edited field: skip it, keep the rest
    for path in set(buckets) | set(sums):
        snap.latency[path] = (
            buckets.get(path, [0] * (len(LATENCY_BUCKETS) + 1)),
            sums.get(path, 0.0),
        )
    return snap


def read_listener(client: redis.Redis) -> ListenerSnapshot:
    """Read the listener's counters."""
    return parse_listener(client.hgetall(STATS_LISTENER_KEY))


def recent_drops(client: redis.Redis, count: int = 20) -> list[dict[str, Any]]:
    """Return the newest drops, newest first."""
    drops = []
    for raw in client.lrange(STATS_DROPS_KEY, 0, count - 1):
        try:
            drops.append(json.loads(raw))
        except ValueError:
            continue
    return drops


@dataclass
class IngestBacklog:
    """The ingest stream: entries held, read but unacknowledged, not yet read."""

    length: int
    pending: int
    lag: int | None  # None: unknown (no group yet)
    group: bool
    lag_capped: bool = False


def ingest_backlog(client: redis.Redis) -> IngestBacklog:
    """Measure the ingest stream: XLEN, the group's pending count and lag.

    Redis 7 reports the lag in XINFO GROUPS; on 6.2, or when Redis cannot
    tell, it is counted from the group's last delivered id (up to a cap).
    """
    length = int(client.xlen(INGEST_STREAM))
    try:
        groups = client.xinfo_groups(INGEST_STREAM)
    except redis.ResponseError:  # no stream yet
        return IngestBacklog(length=length, pending=0, lag=None, group=False)
    for group in groups:
        if _text(group.get("name")) != INGEST_GROUP:
            continue
        pending = int(group.get("pending") or 0)
        lag = group.get("lag")
        if lag is not None:
            return IngestBacklog(length=length, pending=pending, lag=int(lag), group=True)
        last = _text(group.get("last-delivered-id") or "0-0")
        after = client.xrange(INGEST_STREAM, min="(" + last, max="+", count=LAG_COUNT_CAP + 1)
        return IngestBacklog(
            length=length,
            pending=pending,
            lag=min(len(after), LAG_COUNT_CAP),
            group=True,
            lag_capped=len(after) > LAG_COUNT_CAP,
        )
    return IngestBacklog(length=length, pending=0, lag=None, group=False)


def write_web(client: redis.Redis, worker: str, fields: dict[str, Any]) -> None:
    """Refresh a web worker's stats hash and its entry in the index."""
    now = int(time.time() * 1000)
    key = web_stats_key(worker)
    pipe = client.pipeline(transaction=False)
    pipe.hset(key, mapping={**fields, "updated_ms": now})
    pipe.pexpire(key, WEB_STATS_TTL_MS)
    pipe.zadd(STATS_WEB_INDEX, {worker: now})
    pipe.zremrangebyscore(STATS_WEB_INDEX, "-inf", now - 60_000)
    pipe.execute()


def read_webs(client: redis.Redis) -> list[dict[str, str]]:
    """Return the stats of every web worker that refreshed them recently."""
    now = int(time.time() * 1000)
    names = [
        _text(n) for n in client.zrangebyscore(STATS_WEB_INDEX, now - WEB_STATS_TTL_MS, "+inf")
    ]
    if not names:
        return []
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.hgetall(web_stats_key(name))
    workers = []
    for name, raw in zip(names, pipe.execute(), strict=True):
        if raw:
            workers.append({"worker": name, **{_text(k): _text(v) for k, v in raw.items()}})
    return sorted(workers, key=lambda w: w["worker"])
