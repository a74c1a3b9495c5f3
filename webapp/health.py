"""Liveness and readiness: `/healthz` and `/readyz`."""

from __future__ import annotations

import redis
from flask import Blueprint, current_app

from tidings.keys import LEASE_KEY

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz() -> tuple[dict, int]:
    """Answer 200 while the process serves."""
    return {"ok": True}, 200


@bp.get("/readyz")
def readyz() -> tuple[dict, int]:
    """Answer 200 only when Redis, this worker's queue subscription and the listener are fine."""
    checks: dict[str, dict] = {}
    client = current_app.extensions["tidings.redis"]
    try:
        client.ping()
        checks["redis"] = {"ok": True}
        lease_ttl = client.pttl(LEASE_KEY)
        checks["listener"] = (
            {"ok": True, "detail": f"lease heartbeat fresh ({lease_ttl} ms left)"}
            if lease_ttl > 0
            else {"ok": False, "detail": "no listener holds the lease"}
        )
    except redis.RedisError as exc:
        checks["redis"] = {"ok": False, "detail": f"Redis unavailable: {exc}"}
        checks["listener"] = {"ok": False, "detail": "unknown: Redis unavailable"}
    manager = current_app.extensions["tidings.queue"]
    ok, detail = manager.ready() if manager else (False, "message queue disabled")
    checks["message_queue"] = {"ok": ok, "detail": detail}
    failing = [name for name, check in checks.items() if not check["ok"]]
    body = {"ok": not failing, "failing": failing, "checks": checks}
    return body, 200 if not failing else 503


def init_app(app) -> None:
    """Register the health routes."""
    app.register_blueprint(bp)
