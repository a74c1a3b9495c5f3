"""`POST /api/publish`: durable publishing over HTTP, behind a bearer key."""

from __future__ import annotations

import logging
from typing import Any

import redis
from flask import Blueprint, Flask, current_app, request

from tidings import metrics
from tidings.publishing import PublishError, PublishTimeout, await_receipts, send
from webapp.apikey import authorised

log = logging.getLogger("tidings.api")

bp = Blueprint("api", __name__, url_prefix="/api")

DEFAULT_WAIT_SECONDS = 10.0
MAX_WAIT_SECONDS = 30.0


def _error(status: int, error: str, detail: str = "") -> tuple[dict, int]:
    body: dict[str, Any] = {"ok": False, "error": error}
    if detail:
        body["detail"] = detail
    return body, status


@bp.post("/publish")
def publish_route() -> tuple[dict, int]:
    """Publish one `{"topic", "data"}` object, or a list, through the ingest stream.

    `?wait=1` answers once the listener has forwarded them, with their
    offsets (`&timeout=` seconds, default 10, at most 30), or 504.
    """
    settings = current_app.extensions["tidings.settings"]
    if settings.api_key is None:
        return _error(403, "disabled", "set TIDINGS_API_KEY to enable publishing over HTTP")
    if not authorised(settings.api_key):
        return _error(401, "unauthorized")
    body = request.get_json(silent=True)
    items = body if isinstance(body, list) else [body]
    if not items or len(items) > settings.max_publish_batch:
        if items:
            metrics.limit_hit("publish_batch")
        limit = settings.max_publish_batch
        return _error(400, "invalid_batch", f"a batch holds 1 to {limit} publications")
    pairs = []
    for index, item in enumerate(items):
        if not isinstance(item, dict) or "topic" not in item or "data" not in item:
            return _error(
                400, "invalid_body", f'item {index}: expected {{"topic": ..., "data": ...}}'
            )
        pairs.append((item["topic"], item["data"]))
    wait = request.args.get("wait", "") not in ("", "0", "false")
    client = current_app.extensions["tidings.redis"]
    try:
        ids = send(pairs, receipts=wait, client=client, settings=settings)
    except PublishError as exc:
        return _error(400, "invalid_publication", str(exc))
    except redis.RedisError as exc:
        log.warning("publish: Redis unavailable (%s)", exc)
        return _error(503, "unavailable")
    answer: dict[str, Any] = {"ok": True}
    if isinstance(body, list):
        answer["ids"] = ids
    else:
        answer["id"] = ids[0]
    if not wait:
        return answer, 202
    try:
        offsets = await_receipts([str(i) for i in ids], timeout=_wait_timeout(), client=client)
    except PublishTimeout:
        return {**answer, "ok": False, "error": "timeout"}, 504
    except PublishError as exc:
        return {**answer, "ok": False, "error": "dropped", "detail": str(exc)}, 422
    except redis.RedisError:
        return {**answer, "ok": False, "error": "unavailable"}, 503
    if isinstance(body, list):
        answer["offsets"] = offsets
    else:
        answer["offset"] = offsets[0]
    return answer, 200


def _wait_timeout() -> float:
    raw = request.args.get("timeout", "")
    try:
        return min(max(float(raw), 0.1), MAX_WAIT_SECONDS) if raw else DEFAULT_WAIT_SECONDS
    except ValueError:
        return DEFAULT_WAIT_SECONDS


@bp.errorhandler(413)
def too_large(_: Exception) -> tuple[dict, int]:
    """A body over TIDINGS_MAX_PUBLISH_BODY."""
    metrics.limit_hit("publish_body")
    return _error(413, "too_large", "the body is over TIDINGS_MAX_PUBLISH_BODY bytes")


def init_app(app: Flask) -> None:
    """Register the publish API."""
    app.register_blueprint(bp)
