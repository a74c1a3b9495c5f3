"""Webhook delivery as a Celery task, and the bootstep that sends it when events wait.

The task runs for at most BUDGET_SECONDS, on a queue of its own
(`tidings.webhooks`), then returns: it never holds a pool process the way
the never-ending listener does, and the listener's queue never waits behind
it. Every worker's `WebhookDispatcher` checks Redis twice a second and
sends one task when events wait, nobody delivers and no retry is backing
off (tidings.webhooks.should_dispatch); the delivery lease keeps it to one
deliverer at a time, so events go out in order.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import redis
from celery import bootsteps

from tasks import app
from tidings.connection import connect
from tidings.logs import configure
from tidings.settings import Settings, load_or_exit
from tidings.webhooks import DISPATCH_TTL_MS, Deliverer, should_dispatch

log = logging.getLogger("tidings.webhooks")

TASK_NAME = "tidings.webhooks.deliver"
QUEUE = "tidings.webhooks"
CHECK_EVERY_SECONDS = 0.5
# How long one task delivers before it gives its pool process back.
BUDGET_SECONDS = 5.0

_deliverer: Deliverer | None = None


def _process_deliverer(settings: Settings) -> Deliverer:
    """One Redis client and HTTP session per pool process, made on first use."""
    global _deliverer
    if _deliverer is None:
        _deliverer = Deliverer(connect(settings.redis_url, "webhooks"), settings)
    return _deliverer


@app.task(name=TASK_NAME, ignore_result=True, acks_late=False)
def deliver() -> str:
    """Deliver waiting webhook events for up to BUDGET_SECONDS; return how it ended."""
    settings = load_or_exit()
    configure("worker", settings.log_level, settings.log_format)
    if settings.webhook_url is None:
        return "off"
    return _process_deliverer(settings).run(BUDGET_SECONDS)


class WebhookDispatcher(bootsteps.StartStopStep):
    """Sends the delivery task when webhook events wait (TIDINGS_WEBHOOK_URL set)."""

    requires: ClassVar = {"celery.worker.components:Timer"}

    def __init__(self, worker, **kwargs) -> None:
        super().__init__(worker, **kwargs)
        self._tref = None
        self._redis: redis.Redis | None = None
        self._down = False

    def start(self, worker) -> None:
        settings = load_or_exit()
        if settings.webhook_url is None:
            return
        # Short timeouts: the check runs in the worker's event loop.
        self._redis = connect(
            settings.redis_url, "supervisor", socket_timeout=0.5, socket_connect_timeout=0.5
        )
        self._tref = worker.timer.call_repeatedly(CHECK_EVERY_SECONDS, self.check, priority=10)

    def check(self) -> None:
        """Send one delivery task if one is due."""
        assert self._redis is not None
        try:
            if should_dispatch(self._redis):
                deliver.apply_async(queue=QUEUE, expires=DISPATCH_TTL_MS / 1000, retry=False)
            self._down = False
        except Exception as exc:  # Redis or the broker down: try again next tick
            if not self._down:
                log.warning("cannot check or dispatch webhook delivery (%s); retrying", exc)
                self._down = True

    def stop(self, worker) -> None:
        if self._tref is not None:
            self._tref.cancel()
            self._tref = None
        if self._redis is not None:
            self._redis.close()
            self._redis = None

    def shutdown(self, worker) -> None:
        self.stop(worker)


app.steps["worker"].add(WebhookDispatcher)

__all__ = ["WebhookDispatcher", "deliver"]
