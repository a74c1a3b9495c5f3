"""The server API over HTTP: topics, presence, history, disconnect, unsubscribe, revoke, info.

Every route needs `Authorization: Bearer $TIDINGS_API_KEY` (403 while it is
unset, 401 with another key) and answers bad input with a 4xx naming the
error, before anything changes. The work is done by tidings.server_api,
which application code and Celery tasks can call directly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import wraps
from typing import Any

import redis
from flask import Blueprint, Flask, current_app, request

from tidings import server_api
from tidings.server_api import ApiError
from webapp.apikey import refusal

log = logging.getLogger("tidings.server_api")

bp = Blueprint("server_api", __name__, url_prefix="/api")

Answer = tuple[dict[str, Any], int]


def _error(status: int, error: str, detail: str = "") -> Answer:
    body: dict[str, Any] = {"ok": False, "error": error}
    if detail:
        body["detail"] = detail
    return body, status


def operator_route(view: Callable[..., dict[str, Any]]) -> Callable[..., Answer]:
    """Check the key, pass the app's client and settings, map errors to their answers."""

    @wraps(view)
    def wrapper(**kwargs: Any) -> Answer:
        settings = current_app.extensions["tidings.settings"]
        refused = refusal(settings)
        if refused is not None:
            return refused
        client = current_app.extensions["tidings.redis"]
        try:
            return {"ok": True, **view(client=client, settings=settings, **kwargs)}, 200
        except ApiError as exc:
            return _error(exc.status, exc.error, exc.detail)
        except redis.RedisError as exc:
            log.warning("%s: Redis unavailable (%s)", request.path, exc)
            return _error(503, "unavailable")

    return wrapper


def _items(allowed: set[str], required: set[str]) -> list[dict[str, Any]]:
    """Return the body's objects (one, or a list of them), each with known keys only."""
    body = request.get_json(silent=True)
    items = body if isinstance(body, list) else [body]
    if not items or len(items) > server_api.MAX_ITEMS:
        raise ApiError(400, "invalid_batch", f"a batch holds 1 to {server_api.MAX_ITEMS} items")
    for index, item in enumerate(items):
        if not isinstance(item, dict) or not required <= set(item) or set(item) - allowed:
            keys = ", ".join(sorted(allowed))
            raise ApiError(400, "invalid_body", f"item {index}: expected an object with {keys}")
    return items


@bp.get("/topics")
@operator_route
def topics(**context: Any) -> dict[str, Any]:
    """List the topics with a subscriber, across nodes (`?pattern=` glob)."""
    return {"topics": server_api.topics(request.args.get("pattern"), **context)}


@bp.get("/presence/<path:topic>", merge_slashes=False)  # any text: 400, not a 404
@operator_route
def presence(topic: str, **context: Any) -> dict[str, Any]:
    """Answer who is subscribed to a presence topic."""
    return server_api.presence(topic, **context)


@bp.get("/presence/<path:topic>/stats", merge_slashes=False)
@operator_route
def presence_stats(topic: str, **context: Any) -> dict[str, Any]:
    """Answer how many connections and users a presence topic has."""
    return server_api.presence_stats(topic, **context)


@bp.get("/history/<path:topic>", merge_slashes=False)
@operator_route
def history(topic: str, **context: Any) -> dict[str, Any]:
    """Answer a topic's history (`?since=` offset, `&limit=`)."""
    raw = request.args.get("limit", "")
    try:
        limit = int(raw) if raw else server_api.DEFAULT_HISTORY_LIMIT
    except ValueError:
        raise ApiError(400, "invalid_limit", "limit is a whole number") from None
    return server_api.history(topic, request.args.get("since"), limit, **context)


@bp.post("/disconnect")
@operator_route
def disconnect(**context: Any) -> dict[str, Any]:
    """Close every connection of a user (`{"sub"}`, or a list), on every node."""
    items = _items({"sub"}, {"sub"})
    return server_api.disconnect([item["sub"] for item in items], **context)


@bp.post("/unsubscribe")
@operator_route
def unsubscribe(**context: Any) -> dict[str, Any]:
    """Unsubscribe a user's connections from a topic (`{"sub", "topic"}`, or a list)."""
    items = _items({"sub", "topic"}, {"sub", "topic"})
    return server_api.unsubscribe([(item["sub"], item["topic"]) for item in items], **context)


@bp.post("/revoke")
@operator_route
def revoke(**context: Any) -> dict[str, Any]:
    """Revoke tokens: `{"sub", "before"?}` or `{"jti"}` (or a list)."""
    items = _items({"sub", "before", "jti"}, set())
    return server_api.revoke(items, **context)


@bp.get("/info")
@operator_route
def info(**context: Any) -> dict[str, Any]:
    """Answer the live web nodes and the listener."""
    return server_api.info(**context)


@bp.errorhandler(413)
def too_large(_: Exception) -> Answer:
    """A body over TIDINGS_MAX_PUBLISH_BODY."""
    return _error(413, "too_large", "the body is over TIDINGS_MAX_PUBLISH_BODY bytes")


def init_app(app: Flask) -> None:
    """Register the server API."""
    app.register_blueprint(bp)
