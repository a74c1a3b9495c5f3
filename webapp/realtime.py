"""Socket.IO events of the contract: connect, subscribe, unsubscribe, refresh.

Every handler answers bad input with one of the contract's errors and never
raises: a handler exception would only be logged by python-socketio, but the
client would wait for an ack that never comes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import redis
from flask import Flask, current_app, request
from flask_socketio import ConnectionRefusedError, join_room, leave_room

from tidings import metrics
from tidings.history import recover
from tidings.keys import room
from tidings.settings import Settings
from tidings.topics import is_valid_topic
from webapp.extensions import socketio
from webapp.grants import Grant, InvalidToken, decode_token, grant_for

log = logging.getLogger("tidings.realtime")

SWEEP_SECONDS = 1.0
# How long a `subscribe` waits for this worker's message-queue subscription
# before answering `unavailable` (clients retry): under the clients' ack timeouts.
SUBSCRIBED_WAIT_SECONDS = 3.0


@dataclass
class Connection:
    """What this worker knows of one Socket.IO connection."""

    grant: Grant
    ip: str
    # Token bucket for `subscribe` calls: refilled at TIDINGS_SUBSCRIBE_RATE per second.
    allowance: float
    checked_at: float = field(default_factory=time.monotonic)

    def take(self, rate: int) -> bool:
        """Spend one `subscribe` call; False when over the rate."""
        now = time.monotonic()
        self.allowance = min(float(rate), self.allowance + (now - self.checked_at) * rate)
        self.checked_at = now
        if self.allowance < 1:
            return False
        self.allowance -= 1
        return True


@dataclass
class Connections:
    """The connections this worker serves, by Socket.IO sid, and per client IP."""

    by_sid: dict[str, Connection] = field(default_factory=dict)
    per_ip: Counter[str] = field(default_factory=Counter)
    sweeper_lock: threading.Lock = field(default_factory=threading.Lock)
    sweeping: bool = False


def _connections() -> Connections:
    return current_app.extensions["tidings.connections"]


def _error(error: str) -> dict[str, Any]:
    return {"ok": False, "error": error}


def _settings() -> Settings:
    return current_app.extensions["tidings.settings"]


def on_connect(auth: Any = None) -> None:
    """Accept a connection, with a token's grant when one is given."""
    settings = _settings()
    connections = _connections()
    ip = request.remote_addr or "?"
    if connections.per_ip[ip] >= settings.max_connections_per_ip:
        log.warning("refused a connection: %s has %d already", ip, connections.per_ip[ip])
        metrics.limit_hit("connections_per_ip")
        raise ConnectionRefusedError("limit")
    grant = Grant()
    if isinstance(auth, dict) and auth.get("token") is not None:
        try:
            grant = grant_for(decode_token(auth["token"], settings))
        except InvalidToken as exc:
            log.info("refused a connection: invalid token (%s)", exc)
            raise ConnectionRefusedError("invalid_token") from None
    connections.by_sid[request.sid] = Connection(
        grant, ip, allowance=float(settings.subscribe_rate)
    )
    connections.per_ip[ip] += 1
    _start_sweeper(current_app._get_current_object(), connections)  # type: ignore[attr-defined]


def on_disconnect(*_: Any) -> None:
    """Forget a connection's state."""
    connections = _connections()
    connection = connections.by_sid.pop(request.sid, None)
    if connection is not None:
        for topic in connection.grant.topics:
            metrics.subscription_changed(topic, -1)
        connections.per_ip[connection.ip] -= 1
        if connections.per_ip[connection.ip] <= 0:
            del connections.per_ip[connection.ip]


def on_subscribe(payload: Any = None, *_: Any) -> dict[str, Any]:
    """Join a topic's room and answer with its offset and, with `since`, what was missed."""
    settings = _settings()
    connection = _connections().by_sid.get(request.sid)
    if connection is None or not isinstance(payload, dict):
        return _error("invalid_topic")
    if not connection.take(settings.subscribe_rate):
        metrics.limit_hit("subscribe_rate")
        return _error("limit")
    topic = payload.get("topic")
    if not is_valid_topic(topic):
        return _error("invalid_topic")
    grant = connection.grant
    expires: float | None = None
    if not grant.allows(topic, settings.public_topics):
        # A channel token: a grant for topics given after the connection was made.
        channel_token = payload.get("token")
        try:
            if channel_token is None:
                raise InvalidToken("no channel token")
            claims = decode_token(channel_token, settings)
        except InvalidToken:
            log.info("forbidden: sub=%s topic=%s", grant.sub, topic)
            return _error("forbidden")
        if not grant_for(claims).allows(topic, ()) or (grant.sub and grant.sub != claims.sub):
            log.info("forbidden: sub=%s topic=%s (channel token)", grant.sub, topic)
            return _error("forbidden")
        expires = claims.expires_at
    new = topic not in grant.topics
    if new and len(grant.topics) >= settings.max_subscriptions:
        metrics.limit_hit("subscriptions")
        return _error("limit")
    manager = current_app.extensions["tidings.queue"]
    if manager is not None and not manager.wait_subscribed(SUBSCRIBED_WAIT_SECONDS):
        # This worker is not hearing the queue (starting, or Redis is away):
        # history read now could miss what is forwarded before it hears again.
        log.warning("subscribe %s: this worker is not subscribed to the message queue", topic)
        return _error("unavailable")
    # Join before reading history: a publication in between then arrives
    # twice (live and recovered) and the client drops the copy by offset;
    # reading first could lose it.
    join_room(room(topic))
    grant.topics[topic] = expires
    try:
        recovery = recover(
            current_app.extensions["tidings.redis"],
            topic,
            payload.get("since"),
            history_size=settings.history_size,
        )
    except redis.RedisError as exc:
        leave_room(room(topic))
        grant.topics.pop(topic, None)
        log.warning("subscribe %s: Redis unavailable (%s)", topic, exc)
        return _error("unavailable")
    if manager is not None:
        manager.note_offset(topic, recovery.offset)
    if new:
        metrics.subscription_changed(topic, 1)
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
    connection = _connections().by_sid.get(request.sid)
    if connection is not None and topic in connection.grant.topics:
        connection.grant.topics.pop(topic)
        metrics.subscription_changed(topic, -1)
    return {"ok": True}


def on_refresh(payload: Any = None, *_: Any) -> dict[str, Any]:
    """Replace the connection's token with a fresh one for the same user."""
    connection = _connections().by_sid.get(request.sid)
    token = payload.get("token") if isinstance(payload, dict) else None
    if connection is None:
        return _error("invalid_token")
    try:
        claims = decode_token(token, _settings())
    except InvalidToken as exc:
        log.info("refresh refused: sub=%s (%s)", connection.grant.sub, exc)
        return _error("invalid_token")
    old = connection.grant
    if old.sub is not None and claims.sub != old.sub:
        log.warning("refresh refused: token for sub=%s on sub=%s", claims.sub, old.sub)
        return _error("invalid_token")
    fresh = grant_for(claims)
    fresh.topics = old.topics
    connection.grant = fresh
    return {"ok": True, "expires": int(claims.expires_at)}


def _sweep(app: Flask, connections: Connections) -> None:
    """Tell connections whose token expired, and cut them after the grace period."""
    settings = app.extensions["tidings.settings"]
    while True:
        socketio.sleep(SWEEP_SECONDS)
        try:
            _sweep_once(connections, settings, time.time())
        except Exception:  # never let one bad connection stop expiry for all
            log.exception("token expiry sweep failed; retrying")


def _sweep_once(connections: Connections, settings: Settings, now: float) -> None:
    for sid, connection in list(connections.by_sid.items()):
        grant = connection.grant
        for topic, expires in list(grant.topics.items()):
            if (
                expires is not None
                and expires <= now
                and not grant.allows(topic, settings.public_topics)
            ):
                # A channel token ran out: that subscription ends.
                grant.topics.pop(topic, None)
                metrics.subscription_changed(topic, -1)
                socketio.server.leave_room(sid, room(topic), namespace="/")
                socketio.emit("token_expired", {"topic": topic}, to=sid)
        if grant.expires_at is None or grant.expires_at > now:
            grant.expiry_notified_at = None
        elif grant.expiry_notified_at is None:
            grant.expiry_notified_at = now
            socketio.emit("token_expired", {"grace": settings.token_grace}, to=sid)
        elif now - grant.expiry_notified_at >= settings.token_grace:
            log.info("token expired: sub=%s cut after %ds grace", grant.sub, settings.token_grace)
            socketio.server.disconnect(sid, namespace="/")


def _start_sweeper(app: Flask, connections: Connections) -> None:
    with connections.sweeper_lock:
        if not connections.sweeping:
            connections.sweeping = True
            socketio.start_background_task(_sweep, app, connections)


def init_app(app: Flask) -> None:
    """Register the Socket.IO handlers."""
    app.extensions["tidings.connections"] = Connections()
    socketio.on_event("connect", on_connect)
    socketio.on_event("disconnect", on_disconnect)
    socketio.on_event("subscribe", on_subscribe)
    socketio.on_event("unsubscribe", on_unsubscribe)
    socketio.on_event("refresh", on_refresh)
