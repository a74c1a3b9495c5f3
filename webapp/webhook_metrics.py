"""Webhook delivery in /metrics: read from Redis at scrape time, as the listener's counters are.

The Celery task that delivers keeps its counters in `tidings:stats:webhooks`
(tidings/webhooks.py); nobody scrapes a Celery pool process.
"""

from __future__ import annotations

from collections.abc import Iterator

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from tidings.webhooks import read_stats


class WebhookCollector:
    """Renders the webhook counters and the backlog of events waiting."""

    def __init__(self, client: redis.Redis) -> None:
        self._client = client

    def collect(self) -> Iterator[Metric]:
        try:
            stats = read_stats(self._client)
        except redis.RedisError:
            return  # tidings_redis_up says so
        yield CounterMetricFamily(
            "tidings_webhook_delivered",
            "Webhook events the receiver accepted (2xx).",
            value=stats.delivered,
        )
        failures = CounterMetricFamily(
            "tidings_webhook_failures",
            "Webhook POSTs that failed, by kind: refused (a non-2xx answer) or error (none).",
            labels=["kind"],
        )
        failures.add_metric(["refused"], stats.refused)
        failures.add_metric(["error"], stats.errors)
        yield failures
        yield CounterMetricFamily(
            "tidings_webhook_dropped",
            "Webhook events given up on after TIDINGS_WEBHOOK_MAX_ATTEMPTS attempts.",
            value=stats.dropped,
        )
        yield GaugeMetricFamily(
            "tidings_webhook_backlog",
            "Webhook events waiting for delivery (tidings:webhooks).",
            value=stats.backlog,
        )
