"""`POST /api/publish`: durable publishing over HTTP, behind a bearer key."""

from __future__ import annotations

import hmac
import logging
from typing import Any

import redis
from flask import Blueprint, Flask, current_app, request

from tidings.publishing import PublishError, publish_many

log = logging.getLogger("tidings.api")

bp = Blueprint("api", __name__, url_prefix="/api")

MAX_BATCH = 1000


def _error(status: int, error: str, detail: str = "") -> tuple[dict, int]:
    body: dict[str, Any] = {"ok": False, "error": error}
    if detail:
        body["detail"] = detail
    return body, status


def _authorised(api_key: str) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, presented = header.partition(" ")
    # Constant-time: the comparison must not leak how much of the key matched.
    return scheme.lower() == "bearer" and hmac.compare_digest(
        presented.strip().encode(), api_key.encode()
    )


@bp.post("/publish")
def publish_route() -> tuple[dict, int]:
    """Publish one `{"topic", "data"}` object, or a list of them, through the ingest stream."""
    settings = current_app.extensions["tidings.settings"]
    if settings.api_key is None:
        return _error(403, "disabled", "set TIDINGS_API_KEY to enable publishing over HTTP")
    if not _authorised(settings.api_key):
        return _error(401, "unauthorized")
    body = request.get_json(silent=True)
    items = body if isinstance(body, list) else [body]
    if not items or len(items) > MAX_BATCH:
        return _error(400, "invalid_batch", f"a batch holds 1 to {MAX_BATCH} publications")
    pairs = []
    for index, item in enumerate(items):
        if not isinstance(item, dict) or "topic" not in item or "data" not in item:
            return _error(
                400, "invalid_body", f'item {index}: expected {{"topic": ..., "data": ...}}'
            )
        pairs.append((item["topic"], item["data"]))
    try:
        ids = publish_many(
            pairs,
            client=current_app.extensions["tidings.redis"],
            settings=settings,
        )
    except PublishError as exc:
        return _error(400, "invalid_publication", str(exc))
    except redis.RedisError as exc:
        log.warning("publish: Redis unavailable (%s)", exc)
        return _error(503, "unavailable")
    if isinstance(body, list):
        return {"ok": True, "ids": ids}, 202
    return {"ok": True, "id": ids[0]}, 202


def init_app(app: Flask) -> None:
    """Register the publish API."""
    app.register_blueprint(bp)
