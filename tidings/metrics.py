"""Prometheus metrics of the web tier, and the calls the web code makes to move them.

These are prometheus_client metrics of the process that imports this module:
under gunicorn, `gunicorn.conf.py` sets PROMETHEUS_MULTIPROC_DIR before any
worker starts, so every worker writes its own files and `/metrics`
(webapp/metrics.py) sums them, whichever worker answers. The listener's
metrics do not live here: it runs in a Celery worker and shares them through
Redis (tidings/stats.py); `/metrics` renders those beside these.

Label values are bounded: subscriptions are labelled with the
TIDINGS_PUBLIC_TOPICS pattern a topic matches, or "other", never the topic.

Cheap on the hot path: a queue message costs a few increments, whatever the
number of clients it reaches (never one per client).
"""

from __future__ import annotations

import logging
import re
import time
from bisect import bisect_left
from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram

from tidings.logs import RateLimited
from tidings.stats import LATENCY_BUCKETS
from tidings.topics import matches_any

_limit_log = RateLimited(logging.getLogger("tidings.limits"), interval=10.0)
_proxy_log = RateLimited(logging.getLogger("tidings.addresses"), interval=10.0)

CONNECTED_CLIENTS = Gauge(
    "tidings_connected_clients",
    "Socket.IO connections served (all web workers).",
    multiprocess_mode="livesum",
)
SUBSCRIPTIONS = Gauge(
    "tidings_subscriptions",
    "Topic subscriptions held by connections, by the public pattern the topic matches.",
    ["pattern"],
    multiprocess_mode="livesum",
)
QUEUE_SUBSCRIBED = Gauge(
    "tidings_queue_subscribed_workers",
    "Web workers subscribed to the tidings:socketio message queue right now.",
    multiprocess_mode="livesum",
)
MESSAGES_SENT = Counter(
    "tidings_messages_sent",
    "`publications` events handed to clients (one per client per event).",
)
BYTES_SENT = Counter(
    "tidings_bytes_sent",
    "Bytes of `publications` events handed to clients (Socket.IO packet text).",
)
PUBLISH_TO_SEND = Histogram(
    "tidings_publish_to_send_seconds",
    "Publish time to the moment a web worker hands the publication to its clients.",
    ["path"],
    buckets=LATENCY_BUCKETS,
)
SLOW_CLIENT_CUTS = Counter(
    "tidings_slow_client_disconnects",
    "Connections cut because their outgoing queue went over its bound.",
)
LIMIT_HITS = Counter(
    "tidings_limit_hits",
    "Requests refused by a limit, by kind.",
    ["kind"],
)
SUBSCRIPTION_CHANGES = Counter(
    "tidings_subscription_changes",
    "Subscribe and unsubscribe events, by public pattern and change.",
    ["pattern", "change"],
)
QUEUE_MESSAGES = Counter(
    "tidings_queue_messages",
    "Messages received from the tidings:socketio message queue.",
)
QUEUE_RECONNECTS = Counter(
    "tidings_web_redis_reconnects",
    "Times a web worker lost its message-queue subscription and reconnected.",
)
QUEUE_REPLAYED = Counter(
    "tidings_queue_replayed",
    "Publications replayed from history after a message-queue outage.",
)
UNTRUSTED_FORWARDED = Counter(
    "tidings_untrusted_forwarded",
    "Socket.IO connections whose X-Forwarded-For was ignored: their peer is not in "
    "TIDINGS_TRUSTED_PROXIES.",
)
QUEUE_CHANNELS = Gauge(
    "tidings_queue_channels",
    "Per-topic message-queue channels this web worker is subscribed to (interest routing).",
    multiprocess_mode="liveall",
)
ROUTED = Gauge(
    "tidings_routed_publications",
    "Publications this web worker received on its topic channels since it started, and how "
    "many of them it delivered (had a client for).",
    ["outcome"],
    multiprocess_mode="liveall",
)
HUB_BLOCKED = Counter(
    "tidings_gevent_hub_blocked",
    "Times gevent's monitor saw a web worker's event loop blocked longer than "
    "GEVENT_MAX_BLOCKING_TIME.",
)

# The Socket.IO packet around a publications list: `42["publications",` + `]`.
PACKET_OVERHEAD = len('42["publications",]')
OTHER = "other"
_KIND = re.compile(r"[a-z][a-z0-9_]{0,31}")
_MAX_CACHED = 10_000

_public: tuple[str, ...] = ("public.*",)
_labels: dict[str, str] = {}
# Plain per-process totals for the operator view (prometheus values are
# per-file in multiprocess mode; these are cheap to read).
totals: dict[str, int] = {
    "messages_sent": 0,
    "bytes_sent": 0,
    "slow_cuts": 0,
    "limit_hits": 0,
    "untrusted_forwarded": 0,
}
# The peers whose X-Forwarded-For was ignored, newest last, with when (ms):
# what the doctor names. A few: an operator needs the proxy's address, and
# a spoofing client must not grow it.
RECENT_UNTRUSTED_PEERS = 8
untrusted_peers: dict[str, int] = {}


def configure(public_topics: Iterable[str]) -> None:
    """Set the patterns subscription labels are drawn from (TIDINGS_PUBLIC_TOPICS)."""
    global _public
    _public = tuple(public_topics)
    _labels.clear()


def public_patterns() -> tuple[str, ...]:
    """Return the configured label patterns."""
    return _public


def pattern_label(topic: str) -> str:
    """Return the first public pattern `topic` matches, or "other"."""
    label = _labels.get(topic)
    if label is None:
        label = next((p for p in _public if matches_any(topic, (p,))), OTHER)
        if len(_labels) >= _MAX_CACHED:
            _labels.clear()
        _labels[topic] = label
    return label


def limit_hit(kind: str) -> None:
    """Count a request refused by a limit; `kind` is a short fixed name (e.g. "subscriptions").

    Also logs it, at most once per kind every 10 seconds (with the count held back).
    """
    label = kind if _KIND.fullmatch(kind or "") else OTHER
    LIMIT_HITS.labels(label).inc()
    totals["limit_hits"] += 1
    _limit_log.warning(label, "limit hit: %s", label)


def untrusted_forwarded(peer: str) -> None:
    """Count a request whose X-Forwarded-For was ignored, remembering its peer; log it (limited)."""
    UNTRUSTED_FORWARDED.inc()
    totals["untrusted_forwarded"] += 1
    untrusted_peers.pop(peer, None)
    untrusted_peers[peer] = int(time.time() * 1000)
    if len(untrusted_peers) > RECENT_UNTRUSTED_PEERS:
        del untrusted_peers[next(iter(untrusted_peers))]
    _proxy_log.warning(
        "untrusted_forwarded",
        "ignored X-Forwarded-For from %s: that peer is not in TIDINGS_TRUSTED_PROXIES",
        peer,
    )


def subscription_changed(topic: str, delta: int) -> None:
    """Count a subscribe (delta > 0) or unsubscribe (delta < 0) of `topic`.

    The subscriptions gauge itself is sampled from the Socket.IO rooms once a
    second (so a disconnect, which leaves every room at once, needs no call);
    this counts the churn.
    """
    if delta:
        change = "subscribe" if delta > 0 else "unsubscribe"
        SUBSCRIPTION_CHANGES.labels(pattern_label(topic), change).inc(abs(delta))


def slow_client_cut() -> None:
    """Count a connection cut for being too slow."""
    SLOW_CLIENT_CUTS.inc()
    totals["slow_cuts"] += 1


def sent(recipients: int, packet_bytes: int) -> None:
    """Count one event handed to `recipients` clients."""
    if recipients:
        MESSAGES_SENT.inc(recipients)
        BYTES_SENT.inc(recipients * packet_bytes)
        totals["messages_sent"] += recipients
        totals["bytes_sent"] += recipients * packet_bytes


def observe_latencies(path: str, entered_ms: Iterable[object], now_ms: int) -> None:
    """Observe publish-to-send latencies of one queue message's publications.

    One increment per touched bucket instead of one `observe` per
    publication: a batch of a thousand costs a handful of file writes.
    """
    bounds = _BOUNDS_MS
    counts = [0] * (len(bounds) + 1)
    total_ms = 0
    for entered in entered_ms:
        if not isinstance(entered, int):
            continue
        latency = max(now_ms - entered, 0)
        counts[bisect_left(bounds, latency)] += 1
        total_ms += latency
    _observe_counts(path, counts, total_ms)


def _observe_counts(path: str, counts: list[int], total_ms: float) -> None:
    """Add per-bucket latency counts (ms bounds of LATENCY_BUCKETS) to the histogram."""
    if not any(counts):
        return
    bounds = _BOUNDS_MS
    child = PUBLISH_TO_SEND.labels(path if path in ("pubsub", "ingest") else OTHER)
    buckets = getattr(child, "_buckets", None)
    total = getattr(child, "_sum", None)
    if buckets is None or total is None or len(buckets) != len(counts):
        # Not the prometheus_client this was written for: the slow, public way.
        for index, count in enumerate(counts):
            value = (bounds[index] if index < len(bounds) else bounds[-1] * 2) / 1000
            for _ in range(count):
                child.observe(value)
        return
    for index, count in enumerate(counts):
        if count:
            buckets[index].inc(count)
    total.inc(total_ms / 1000)


_BOUNDS_MS = tuple(bound * 1000 for bound in LATENCY_BUCKETS)


class Batch:
    """The counts of a batch of queue messages, written to the metrics once per batch.

    In multiprocess mode every increment is a write to a memory-mapped file
    with a pid check: several per message were most of a routed message's
    cost. The queue loop counts here and flushes after each read.
    """

    __slots__ = ("_latency", "bytes", "messages", "recipients")

    def __init__(self) -> None:
        self.messages = 0
        self.recipients = 0
        self.bytes = 0
        # path -> ([count per bucket], sum in ms)
        self._latency: dict[str, tuple[list[int], list[float]]] = {}

    def sent(self, recipients: int, packet_bytes: int) -> None:
        """Count one event handed to `recipients` clients."""
        self.recipients += recipients
        self.bytes += recipients * packet_bytes

    def latencies(self, path: str, entered_ms: Iterable[object], now_ms: int) -> None:
        """Count the publish-to-send latencies of one message's publications."""
        entry = self._latency.get(path)
        if entry is None:
            entry = self._latency[path] = ([0] * (len(_BOUNDS_MS) + 1), [0.0])
        counts, total = entry
        bounds = _BOUNDS_MS
        for entered in entered_ms:
            if type(entered) is int:
                latency = now_ms - entered if now_ms > entered else 0
                counts[bisect_left(bounds, latency)] += 1
                total[0] += latency

    def flush(self) -> None:
        """Write what was counted since the last flush."""
        if self.messages:
            QUEUE_MESSAGES.inc(self.messages)
            self.messages = 0
        if self.recipients:
            MESSAGES_SENT.inc(self.recipients)
            BYTES_SENT.inc(self.bytes)
            totals["messages_sent"] += self.recipients
            totals["bytes_sent"] += self.bytes
            self.recipients = self.bytes = 0
        for path, (counts, total) in self._latency.items():
            _observe_counts(path, counts, total[0])
        self._latency.clear()
