"""Webhook delivery: batches of `tidings:webhooks` events POSTed, signed, in order, at least once.

Web nodes only append events to the stream (in their presence flush
script); whoever holds the delivery lease (`tidings:webhooks:lock`, a Celery
task of tasks/webhooks.py) reads the oldest BATCH_SIZE events, POSTs them as
`{"time": <ms>, "events": [{"id", "name", "topic", "sub"?}]}` with
`X-Tidings-Signature: sha256=<hex HMAC-SHA256 of the body>`, and deletes
them from the stream once the receiver answered 2xx. One deliverer at a
time, oldest first: events arrive in order. A batch whose answer was lost is
sent again: at least once (receivers de-duplicate by `id`).

A failed POST (no answer within TIDINGS_WEBHOOK_TIMEOUT, or any status but
2xx) is retried after 1, 2, 4, ... s (at most BACKOFF_MAX_SECONDS), the
retry state kept in Redis so that it survives the task; after
TIDINGS_WEBHOOK_MAX_ATTEMPTS attempts (10 by default: about four minutes)
the batch is dropped, counted and logged, and delivery goes on with the next.

No Flask, Celery or gevent here: the Celery task is a shim.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import redis
import requests

from tidings.keys import (
    STATS_WEBHOOKS_KEY,
    WEBHOOK_DISPATCH,
    WEBHOOK_LOCK,
    WEBHOOK_STATE,
    WEBHOOK_STREAM,
)
from tidings.lease import Lease
from tidings.settings import Settings

log = logging.getLogger("tidings.webhooks")

SIGNATURE_HEADER = "X-Tidings-Signature"
BATCH_SIZE = 100
BACKOFF_FIRST_SECONDS = 1.0
BACKOFF_MAX_SECONDS = 60.0
# Longer than any one POST (TIDINGS_WEBHOOK_TIMEOUT is at most 60 s): a live
# deliverer renews it before every batch.
LOCK_TTL_MS = 120_000
# A dispatched task not started within this long is forgotten (and expires).
DISPATCH_TTL_MS = 10_000


def sign(secret: str, body: bytes) -> str:
    """Return the signature header's value for a body: `sha256=<hex HMAC-SHA256>`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, signature: str) -> bool:
    """Tell whether `signature` is this body's (what a receiver checks, in constant time)."""
    return hmac.compare_digest(sign(secret, body), signature)


def backoff(attempt: int) -> float:
    """Return the wait in seconds after the `attempt`-th failure (1-based)."""
    return min(BACKOFF_FIRST_SECONDS * 2 ** (attempt - 1), BACKOFF_MAX_SECONDS)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _now_ms() -> int:
    return int(time.time() * 1000)


def should_dispatch(client: redis.Redis) -> bool:
    """Tell whether a delivery task should be sent now, and mark it sent (one at a time).

    Yes when events wait, nobody delivers, no task was sent that has not
    started, and no retry is waiting out its backoff.
    """
    pipe = client.pipeline(transaction=False)
    pipe.xlen(WEBHOOK_STREAM)
    pipe.exists(WEBHOOK_LOCK, WEBHOOK_DISPATCH)
    pipe.hget(WEBHOOK_STATE, "next_ms")
    waiting, busy, next_ms = pipe.execute()
    if not waiting or busy or (next_ms is not None and int(next_ms) > _now_ms()):
        return False
    return bool(client.set(WEBHOOK_DISPATCH, "1", nx=True, px=DISPATCH_TTL_MS))


@dataclass
class Outcome:
    """What one POST came to: delivered, or why not."""

    ok: bool
    kind: str  # "ok", "refused" (a non-2xx answer), "error" (no answer)
    detail: str


class Deliverer:
    """Delivers the stream's events for a while, holding the delivery lease."""

    def __init__(
        self, client: redis.Redis, settings: Settings, session: requests.Session | None = None
    ) -> None:
        if settings.webhook_url is None or settings.webhook_secret is None:
            raise ValueError("webhooks are off: TIDINGS_WEBHOOK_URL is not set")
        self.client = client
        self.url = settings.webhook_url
        self.secret = settings.webhook_secret
        self.max_attempts = settings.webhook_max_attempts
        self.timeout = settings.webhook_timeout
        self.session = session or requests.Session()

    def run(self, budget_seconds: float) -> str:
        """Deliver until the stream is empty, a POST fails or the budget is spent.

        Returns "busy" (another deliverer holds the lease), "idle", "waiting"
        (a retry's backoff is not over), "failed" or "budget".
        """
        lease = Lease(self.client, LOCK_TTL_MS, since_ms=_now_ms(), key=WEBHOOK_LOCK)
        if not lease.acquire():
            return "busy"
        self.client.delete(WEBHOOK_DISPATCH)
        try:
            deadline = time.monotonic() + budget_seconds
            while time.monotonic() < deadline:
                result = self.deliver_one()
                if result != "delivered":
                    return result
                if not lease.renew():
                    return "busy"
            return "budget"
        finally:
            lease.release()

    def deliver_one(self) -> str:
        """POST the oldest batch once; return "delivered", "idle", "waiting" or "failed"."""
        next_ms = self.client.hget(WEBHOOK_STATE, "next_ms")
        if next_ms is not None and int(next_ms) > _now_ms():
            return "waiting"
        entries = self.client.xrange(WEBHOOK_STREAM, count=BATCH_SIZE)
        if not entries:
            return "idle"
        ids = [entry_id for entry_id, _ in entries]
        events = []
        for entry_id, fields in entries:
            event = {"id": _text(entry_id)}
            event.update({_text(k): _text(v) for k, v in fields.items()})
            events.append(event)
        body = json.dumps({"time": _now_ms(), "events": events}, separators=(",", ":")).encode()
        outcome = self.post(body)
        if outcome.ok:
            self._delivered(ids)
            return "delivered"
        self._failed(ids, outcome)
        return "failed"

    def post(self, body: bytes) -> Outcome:
        """POST one signed body to the receiver."""
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(self.secret, body)}
        try:
            answer = self.session.post(
                self.url, data=body, headers=headers, timeout=self.timeout, allow_redirects=False
            )
        except requests.RequestException as exc:
            return Outcome(False, "error", type(exc).__name__)
        if 200 <= answer.status_code < 300:
            return Outcome(True, "ok", str(answer.status_code))
        return Outcome(False, "refused", f"HTTP {answer.status_code}")

    def _delivered(self, ids: list[bytes]) -> None:
        attempts = self.client.hget(WEBHOOK_STATE, "attempts")
        pipe = self.client.pipeline(transaction=True)
        pipe.xdel(WEBHOOK_STREAM, *ids)
        pipe.delete(WEBHOOK_STATE)
        pipe.hincrby(STATS_WEBHOOKS_KEY, "delivered", len(ids))
        pipe.hincrby(STATS_WEBHOOKS_KEY, "batches", 1)
        pipe.hset(STATS_WEBHOOKS_KEY, mapping={"updated_ms": _now_ms(), "last_status": "ok"})
        pipe.execute()
        if attempts is not None:
            log.info("webhooks: delivered again after %s failed attempts", _text(attempts))

    def _failed(self, ids: list[bytes], outcome: Outcome) -> None:
        attempts = int(self.client.hincrby(WEBHOOK_STATE, "attempts", 1))
        pipe = self.client.pipeline(transaction=True)
        pipe.hincrby(STATS_WEBHOOKS_KEY, f"failed:{outcome.kind}", 1)
        pipe.hset(
            STATS_WEBHOOKS_KEY, mapping={"updated_ms": _now_ms(), "last_status": outcome.detail}
        )
        if attempts >= self.max_attempts:
            pipe.xdel(WEBHOOK_STREAM, *ids)
            pipe.delete(WEBHOOK_STATE)
            pipe.hincrby(STATS_WEBHOOKS_KEY, "dropped", len(ids))
            pipe.execute()
            log.warning(
                "webhooks: gave up on %d events after %d attempts (last: %s)",
                len(ids),
                attempts,
                outcome.detail,
            )
            return
        wait = backoff(attempts)
        pipe.hset(WEBHOOK_STATE, "next_ms", _now_ms() + int(wait * 1000))
        pipe.execute()
        log.warning(
            "webhooks: POST failed (%s), attempt %d of %d; retrying in %.0f s",
            outcome.detail,
            attempts,
            self.max_attempts,
            wait,
        )


@dataclass
class WebhookStats:
    """What `tidings:stats:webhooks` and the stream say, for /metrics."""

    delivered: int = 0
    batches: int = 0
    refused: int = 0
    errors: int = 0
    dropped: int = 0
    backlog: int = 0


def read_stats(client: redis.Redis) -> WebhookStats:
    """Read the delivery counters and the number of events waiting."""
    pipe = client.pipeline(transaction=False)
    pipe.hgetall(STATS_WEBHOOKS_KEY)
    pipe.xlen(WEBHOOK_STREAM)
    raw, backlog = pipe.execute()
    fields = {_text(k): _text(v) for k, v in raw.items()}

    def number(name: str) -> int:
        try:
            return int(fields.get(name, 0))
        except ValueError:
            return 0

    return WebhookStats(
        delivered=number("delivered"),
        batches=number("batches"),
        refused=number("failed:refused"),
        errors=number("failed:error"),
        dropped=number("dropped"),
        backlog=int(backlog),
    )
