"""`GET /metrics`: every web worker's metrics, and the listener's, in one scrape.

Under gunicorn, prometheus_client runs in multiprocess mode (gunicorn.conf.py
gives each master start a fresh PROMETHEUS_MULTIPROC_DIR and marks dead
workers), so whichever worker answers sums all of them. The listener's
counters come from Redis (tidings/stats.py) and are read at scrape time,
with the lease holder and the ingest backlog.

A sampler in each serving worker runs once a second: it sets the gauges that
are cheaper to sample than to track (connections, subscriptions by pattern,
queue subscription), turns gevent's blocked-loop events into a counter, and
refreshes this worker's stats hash for the operator view.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections import Counter as Tally
from collections import deque
from collections.abc import Iterator
from typing import Any

import redis
from flask import Blueprint, Flask, Response, current_app
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.utils import floatToGoString

from tidings import metrics, stats
from tidings.lease import current_holder
from tidings.logs import RateLimited
from tidings.stats import LATENCY_BUCKETS, PATHS
from webapp.webhook_metrics import WebhookCollector

log = logging.getLogger("tidings.metrics")

bp = Blueprint("metrics", __name__)

SAMPLE_SECONDS = 1.0
DROP_REASONS = ("invalid_topic", "invalid_utf8", "malformed", "too_large")


class ListenerCollector:
    """Renders what lives in Redis: the listener's counters, its lease, the ingest backlog."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("tidings_redis_up", "1 when /metrics could read Redis.")
        try:
            snap = stats.read_listener(self._client)
            holder = current_holder(self._client)
            backlog = stats.ingest_backlog(self._client)
        except redis.RedisError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from _listener_families(snap)
        yield from _lease_families(holder)
        for name, value, doc in (
            ("tidings_ingest_length", backlog.length, "Entries in the tidings:ingest stream."),
            ("tidings_ingest_pending", backlog.pending, "Ingest entries read, not yet acked."),
            ("tidings_ingest_lag", backlog.lag, "Ingest entries not yet read by the listener."),
        ):
            if value is not None:
                yield GaugeMetricFamily(name, doc, value=value)


def _listener_families(snap: stats.ListenerSnapshot) -> Iterator[Metric]:
    received = CounterMetricFamily(
        "tidings_received", "Publications the listener read, by path.", labels=["path"]
    )
    forwarded = CounterMetricFamily(
        "tidings_forwarded",
        "Publications the listener forwarded (history + queue), by path.",
        labels=["path"],
    )
    for path in PATHS:
        received.add_metric([path], snap.received.get(path, 0))
        forwarded.add_metric([path], snap.forwarded.get(path, 0))
    yield received
    yield forwarded
    dropped = CounterMetricFamily(
        "tidings_dropped",
        "Publications dropped by the listener, by reason and path.",
        labels=["reason", "path"],
    )
    keys = {(reason, path) for reason in DROP_REASONS for path in PATHS} | set(snap.dropped)
    for reason, path in sorted(keys):
        dropped.add_metric([reason, path], snap.dropped.get((reason, path), 0))
    yield dropped
    latency = HistogramMetricFamily(
        "tidings_publish_to_emit_seconds",
        "Publish time (ingest `ts`, else entry id; pub/sub: the listener's receipt) to forward.",
        labels=["path"],
    )
    for path in PATHS:
        counts, total = snap.latency.get(path, ([0] * (len(LATENCY_BUCKETS) + 1), 0.0))
        cumulative, running = [], 0
        for bound, count in zip((*LATENCY_BUCKETS, float("inf")), counts, strict=True):
            running += count
            cumulative.append((floatToGoString(bound), running))
        latency.add_metric([path], cumulative, sum_value=total)
    yield latency
    yield CounterMetricFamily(
        "tidings_listener_restarts",
        "Listeners that took the lease over after the first one.",
        value=snap.restarts,
    )
    yield CounterMetricFamily(
        "tidings_listener_redis_reconnects",
        "Times a listener loop lost Redis and reconnected.",
        value=snap.reconnects,
    )
    if snap.updated_ms is not None:
        yield GaugeMetricFamily(
            "tidings_listener_stats_age_seconds",
            "Seconds since the listener last flushed these counters (about 1 while it runs).",
            value=max(time.time() - snap.updated_ms / 1000, 0.0),
        )


def _lease_families(holder: Any) -> Iterator[Metric]:
    held = GaugeMetricFamily("tidings_listener_up", "1 while a listener holds the lease.")
    held.add_metric([], 1 if holder is not None else 0)
    yield held
    if holder is None:
        return
    info = GaugeMetricFamily(
        "tidings_listener_lease_holder",
        "The listener holding the lease (value 1).",
        labels=["host", "pid"],
    )
    info.add_metric([holder.host, str(holder.pid)], 1)
    yield info
    if holder.since_ms:
        yield GaugeMetricFamily(
            "tidings_listener_lease_age_seconds",
            "How long the current listener has held the lease.",
            value=max(time.time() - holder.since_ms / 1000, 0.0),
        )
    yield GaugeMetricFamily(
        "tidings_listener_lease_ttl_seconds",
        "Time left before the lease expires unless renewed.",
        value=max(holder.ttl_ms, 0) / 1000,
    )


def _multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


@bp.get("/metrics")
def metrics_route() -> Response:
    """Serve the Prometheus text format: every web worker, the listener, the backlog."""
    if _multiprocess():
        local = CollectorRegistry()
        MultiProcessCollector(local)
    else:
        local = REGISTRY
    shared = CollectorRegistry(auto_describe=False)
    shared.register(ListenerCollector(current_app.extensions["tidings.redis"]))
    shared.register(WebhookCollector(current_app.extensions["tidings.redis"]))
    body = generate_latest(local) + generate_latest(shared)
    return Response(body, mimetype=CONTENT_TYPE_LATEST)


# -- gevent's blocked-loop monitor --------------------------------------------------

# Filled by gevent's monitor thread; drained by the sampler greenlet. A deque
# is safe across threads, and nothing else is done in the monitor thread (no
# locks, no logging: the loop it reports on may hold them).
_blocked: deque[str] = deque(maxlen=1000)
_subscribed_to_gevent = False
_counting_monitor: type | None = None


def _counting_monitor_class() -> type:
    """Return gevent's monitor thread class, made to report a blocked loop in one line."""
    global _counting_monitor
    if _counting_monitor is not None:
        return _counting_monitor
    from gevent import config
    from gevent._monitor import PeriodicMonitoringThread
    from gevent.events import EventLoopBlocked, notify

    class CountingMonitor(PeriodicMonitoringThread):
        """gevent's monitor thread, without the full report unless it is printed.

        gevent builds the report of every block (a tree of all greenlets from
        gc.get_objects(), formatted stacks) before it notifies EventLoopBlocked,
        printed or not; with thousands of connections that walk holds the GIL
        long enough to block the loop again. The counter needs only the event.
        """

        def monitor_blocking(self, hub: Any) -> Any:
            if config.print_blocking_reports:  # GEVENT_MONITOR_PRINT_BLOCKING_REPORTS=true
                return super().monitor_blocking(hub)
            did_block = self._greenlet_tracer.did_block_hub(hub)
            if not did_block:
                return None
            active = did_block[1]
            report = [f"Greenlet {active!s} blocked the event loop"]
            notify(EventLoopBlocked(active, config.max_blocking_time, report, hub=hub))
            return self._show_blocking_report(hub, report, active)

    _counting_monitor = CountingMonitor
    return CountingMonitor


def _count_blocks_without_reports() -> None:
    """Make this process's gevent monitor thread a CountingMonitor, now and for new hubs."""
    import gevent
    from gevent import _monitor

    counting = _counting_monitor_class()
    # A hub starts its monitor from this name (Hub.start_periodic_monitoring_thread).
    _monitor.PeriodicMonitoringThread = counting
    hub = gevent.get_hub()
    running = hub.periodic_monitoring_thread
    if running is not None and not isinstance(running, counting):
        # The hub ran before the app loaded: swap its monitor. Both calls
        # belong in the hub's own thread, which this is (the worker's main one).
        running.kill()
        hub.periodic_monitoring_thread = None
        hub.start_periodic_monitoring_thread()


def _on_gevent_event(event: object) -> None:
    from gevent.events import EventLoopBlocked

    if isinstance(event, EventLoopBlocked):
        _blocked.append(repr(event.greenlet)[:200])


def _subscribe_to_gevent() -> None:
    global _subscribed_to_gevent
    if _subscribed_to_gevent:
        return
    from gevent import events

    events.subscribers.append(_on_gevent_event)
    _subscribed_to_gevent = True


# -- the sampler ------------------------------------------------------------------------


class Sampler:
    """Samples this worker's gauges once a second and refreshes its stats hash."""

    def __init__(self, app: Flask) -> None:
        self.manager = app.extensions["tidings.queue"]
        self.client: redis.Redis = app.extensions["tidings.redis"]
        self.worker = stats.worker_name()
        self.hub_blocked = 0
        self._patterns_seen: set[str] = set()
        self._log = RateLimited(log, interval=10.0)

    def run(self) -> None:
        """Sample until the queue manager closes (tests) or the process ends."""
        while not self.manager.closed:
            try:
                self.sample()
            except Exception:
                log.exception("metrics sampler failed; sampling again in a second")
            time.sleep(SAMPLE_SECONDS)  # gevent-patched in a serving worker

    def sample(self) -> dict[str, Any]:
        """Set the sampled gauges; return (and share) this worker's numbers."""
        namespace = self.manager.rooms.get("/", {})
        clients = len(namespace.get(None, ()))
        per_pattern: Tally[str] = Tally()
        topics = 0
        try:
            rooms = list(namespace.items())
        except RuntimeError:  # threading mode: changed while copied; next second
            rooms = []
        for name, members in rooms:
            if isinstance(name, str) and name.startswith("t:") and members:
                topics += 1
                per_pattern[metrics.pattern_label(name[2:])] += len(members)
        metrics.CONNECTED_CLIENTS.set(clients)
        self._patterns_seen |= set(per_pattern) | set(metrics.public_patterns())
        for pattern in self._patterns_seen:
            metrics.SUBSCRIPTIONS.labels(pattern).set(per_pattern.get(pattern, 0))
        ready, _ = self.manager.ready()
        metrics.QUEUE_SUBSCRIBED.set(1 if ready else 0)
        channels = self.manager.channels()
        metrics.QUEUE_CHANNELS.set(channels)
        metrics.ROUTED.labels("received").set(self.manager.received)
        metrics.ROUTED.labels("delivered").set(self.manager.delivered)
        blocked = []
        while _blocked:
            try:
                blocked.append(_blocked.popleft())
            except IndexError:
                break
        if blocked:
            self.hub_blocked += len(blocked)
            metrics.HUB_BLOCKED.inc(len(blocked))
            self._log.warning(
                "hub_blocked",
                "gevent event loop blocked %d times in the last second (last in %s)",
                len(blocked),
                blocked[-1],
            )
        numbers = {
            "clients": clients,
            "subscriptions": sum(per_pattern.values()),
            "topics": topics,
            "queue_ready": 1 if ready else 0,
            "queue_reconnects": self.manager.reconnects,
            "queue_channels": channels,
            "routed_received": self.manager.received,
            "routed_delivered": self.manager.delivered,
            "hub_blocked": self.hub_blocked,
            **metrics.totals,
        }
        if metrics.untrusted_peers:  # for the doctor: {peer: last seen, ms}
            numbers["untrusted_peers"] = json.dumps(metrics.untrusted_peers)
        # Redis down: /readyz and the queue loop report it; the next second retries.
        with contextlib.suppress(redis.RedisError):
            stats.write_web(self.client, self.worker, numbers)
        return numbers


def init_app(app: Flask) -> None:
    """Register /metrics; in a serving worker, start the sampler."""
    metrics.configure(app.extensions["tidings.settings"].public_topics)
    app.register_blueprint(bp)
    manager = app.extensions.get("tidings.queue")
    if manager is None or not app.config.get("SUBSCRIBE_QUEUE"):
        return
    from gevent import monkey

    if monkey.is_module_patched("threading"):
        _count_blocks_without_reports()
        _subscribe_to_gevent()
    sampler = Sampler(app)
    app.extensions["tidings.sampler"] = sampler
    from webapp.extensions import socketio

    socketio.start_background_task(sampler.run)
