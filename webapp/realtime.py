"""Socket.IO events of the contract: connect, subscribe, unsubscribe."""

from __future__ import annotations

import logging
from typing import Any

import redis
from flask import Flask, current_app, request
from flask_socketio import ConnectionRefusedError, join_room, leave_room

from tidings.history import recover
from tidings.keys import room
from tidings.topics import is_valid_topic
from webapp.extensions import socketio
from webapp.grants import Grant, InvalidToken, decode_token

log = logging.getLogger("tidings.realtime")

# Per-process state of the connections this worker serves, by Socket.IO sid.
_grants: dict[str, Grant] = {}


def _error(error: str) -> dict[str, Any]:
    return {"ok": False, "error": error}


def on_connect(auth: Any = None) -> None:
    """Accept a connection, with a token's grant when one is given."""
    settings = current_app.extensions["tidings.settings"]
    grant = Grant()
    if isinstance(auth, dict) and auth.get("token") is not None:
        try:
            grant = decode_token(auth["token"], settings.secret)
        except InvalidToken as exc:
            log.info("refused a connection: invalid token (%s)", exc)
            raise ConnectionRefusedError("invalid_token") from None
    _grants[request.sid] = grant


def on_disconnect(*_: Any) -> None:
    """Forget a connection's state."""
    _grants.pop(request.sid, None)


def on_subscribe(payload: Any = None, *_: Any) -> dict[str, Any]:
    """Join a topic's room and answer with its offset and, with `since`, what was missed."""
    settings = current_app.extensions["tidings.settings"]
    grant = _grants.get(request.sid)
    if grant is None or not isinstance(payload, dict):
        return _error("invalid_topic")
    topic = payload.get("topic")
    if not is_valid_topic(topic):
        return _error("invalid_topic")
    if not grant.allows(topic, settings.public_topics):
        log.info("forbidden: sub=%s topic=%s", grant.sub, topic)
        return _error("forbidden")
    if topic not in grant.topics and len(grant.topics) >= settings.max_subscriptions:
        return _error("limit")
    since = payload.get("since")
    # Join before reading history: a publication in between then arrives
    # twice (live and recovered) and the client drops the copy by offset;
    # reading first could lose it.
    join_room(room(topic))
    grant.topics.add(topic)
    try:
        recovery = recover(
            current_app.extensions["tidings.redis"],
            topic,
            since,
            history_size=settings.history_size,
        )
    except redis.RedisError as exc:
        leave_room(room(topic))
        grant.topics.discard(topic)
        log.warning("subscribe %s: Redis unavailable (%s)", topic, exc)
        return _error("unavailable")
    manager = current_app.extensions["tidings.queue"]
    if manager is not None:
        manager.note_offset(topic, recovery.offset)
    return {
        "ok": True,
        "topic": topic,
        "offset": recovery.offset,
        "recovered": recovery.recovered,
        "publications": recovery.publications,
    }


def on_unsubscribe(payload: Any = None, *_: Any) -> dict[str, Any]:
    """Leave a topic's room."""
    topic = payload.get("topic") if isinstance(payload, dict) else None
    if not is_valid_topic(topic):
        return _error("invalid_topic")
    leave_room(room(topic))
    grant = _grants.get(request.sid)
    if grant is not None:
        grant.topics.discard(topic)
    return {"ok": True}


def init_app(app: Flask) -> None:
    """Register the Socket.IO handlers."""
    socketio.on_event("connect", on_connect)
    socketio.on_event("disconnect", on_disconnect)
    socketio.on_event("subscribe", on_subscribe)
    socketio.on_event("unsubscribe", on_unsubscribe)
