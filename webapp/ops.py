"""`GET /api/ops`: the operator view's data, behind the API key.

Lease holder, forwarding rate, ingest lag, connected clients per web worker
and recent drops, in one JSON document the dashboard polls. Same bearer key
as `POST /api/publish` (TIDINGS_API_KEY; unset: 403).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from flask import Blueprint, Flask, current_app

from tidings import stats
from tidings.lease import current_holder
from webapp.apikey import refusal

log = logging.getLogger("tidings.ops")

bp = Blueprint("ops", __name__, url_prefix="/api")

INT_FIELDS = (
    "clients",
    "subscriptions",
    "topics",
    "queue_ready",
    "queue_reconnects",
    "queue_channels",
    "routed_received",
    "routed_delivered",
    "hub_blocked",
    "messages_sent",
    "bytes_sent",
    "slow_cuts",
    "limit_hits",
    "updated_ms",
)


def _worker(raw: dict[str, str]) -> dict[str, Any]:
    worker: dict[str, Any] = {"worker": raw["worker"]}
    for name in INT_FIELDS:
        try:
            worker[name] = int(raw.get(name, 0))
        except ValueError:
            worker[name] = 0
    return worker


def snapshot(client: redis.Redis) -> dict[str, Any]:
    """Gather the operator view from Redis (raises redis errors)."""
    now = time.time()
    holder = current_holder(client)
    listener = stats.read_listener(client)
    backlog = stats.ingest_backlog(client)
    lease: dict[str, Any] = {"held": holder is not None}
    if holder is not None:
        lease.update(
            host=holder.host,
            pid=holder.pid,
            age_s=round(max(now - holder.since_ms / 1000, 0), 1) if holder.since_ms else None,
            ttl_ms=holder.ttl_ms,
        )
    return {
        "ok": True,
        "now_ms": int(now * 1000),
        "lease": lease,
        "listener": {
            # Fresh only while a listener flushes (about every second).
            "rate": listener.rate if holder is not None else 0.0,
            "received": listener.received,
            "forwarded": listener.forwarded,
            "dropped": {f"{r}:{p}": n for (r, p), n in sorted(listener.dropped.items())},
            "restarts": listener.restarts,
            "reconnects": listener.reconnects,
            "stats_age_s": (
                round(max(now - listener.updated_ms / 1000, 0), 1)
                if listener.updated_ms is not None
                else None
            ),
        },
        "ingest": {
            "length": backlog.length,
            "pending": backlog.pending,
            "lag": backlog.lag,
            "group": backlog.group,
        },
        "web": [_worker(w) for w in stats.read_webs(client)],
        "recent_drops": stats.recent_drops(client, 20),
    }


@bp.get("/ops")
def ops_route() -> tuple[dict, int]:
    """Answer the operator view (Bearer TIDINGS_API_KEY)."""
    refused = refusal(current_app.extensions["tidings.settings"])
    if refused is not None:
        return refused
    try:
        return snapshot(current_app.extensions["tidings.redis"]), 200
    except redis.RedisError as exc:
        log.warning("ops view: Redis unavailable (%s)", exc)
        return {"ok": False, "error": "unavailable"}, 503


def init_app(app: Flask) -> None:
    """Register the operator view."""
    app.register_blueprint(bp)
