"""Socket.IO events of the contract: connect, subscribe, unsubscribe, refresh.

Every handler answers bad input with one of the contract's errors and never
raises: a handler exception would only be logged by python-socketio, but the
client would wait for an ack that never comes.

The handlers are registered on python-socketio's server directly, with the
Flask app captured, not through Flask-SocketIO's `on_event`: its wrapper
pushes a request context (werkzeug URL matching, a session) for every event,
which was the largest single cost of a connect and a subscribe (bench/PROFILE.md,
finding 3). None of them needs Flask's request: python-socketio passes the sid,
and the WSGI environ to `connect`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import flask_socketio
import redis
import socketio
from flask import Flask

from tidings import metrics
from tidings.history import Recovery, recover
from tidings.keys import room
from tidings.settings import Settings
from tidings.topics import is_valid_topic
from webapp import extensions
from webapp.addresses import client_address
from webapp.grants import Grant, InvalidToken, decode_token, grant_for

if TYPE_CHECKING:
    from webapp.queue import QueueManager

log = logging.getLogger("tidings.realtime")

NAMESPACE = "/"
SWEEP_SECONDS = 1.0
# How long a `subscribe` waits for this worker's subscription to the topic's
# queue channel before answering `unavailable` (clients retry): under the
# clients' ack timeouts.
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
    # The sids whose token or a channel token can expire: all the sweeper
    # walks each second (walking every connection was 6% of a worker's CPU
    # with 5,000 anonymous ones, which never expire).
    expiring: set[str] = field(default_factory=set)
    sweeper_lock: threading.Lock = field(default_factory=threading.Lock)
    sweeping: bool = False

    def forget(self, sid: str) -> Connection | None:
        """Drop a gone connection (Socket.IO or SSE) from every count; return it if it was known."""
        connection = self.by_sid.pop(sid, None)
        self.expiring.discard(sid)
        if connection is not None:
            for topic in connection.grant.topics:
                metrics.subscription_changed(topic, -1)
            self.per_ip[connection.ip] -= 1
            if self.per_ip[connection.ip] <= 0:
                del self.per_ip[connection.ip]
        return connection


def _error(error: str) -> dict[str, Any]:
    return {"ok": False, "error": error}


def _ack(topic: str, recovery: Recovery) -> dict[str, Any]:
    return {
        "ok": True,
        "topic": topic,
        "offset": recovery.offset,
        "recovered": recovery.recovered,
        "publications": recovery.publications,
    }


# Per greenlet (thread, outside gevent): what to do once the ack is queued.
_replying = threading.local()


def after_reply(action: Callable[[], None]) -> None:
    """Run `action` right after python-socketio has queued this event's ack to the client."""
    actions = getattr(_replying, "actions", None)
    if actions is None:
        action()  # not inside an event (a direct call): nothing to wait for
    else:
        actions.append(action)


def _run_after_replies(server: socketio.Server) -> None:
    """Make the server run `after_reply` actions once each event's ack is queued.

    python-socketio sends a handler's return value as the ack after the
    handler returns, with no switch to another greenlet in between; an
    action run here is the first thing to reach the client after the ack.
    """
    handle = server._handle_event_internal

    def handle_then_act(*args: Any) -> None:
        _replying.actions = []
        try:
            handle(*args)
        finally:
            actions, _replying.actions = _replying.actions, None
            for action in actions:
                action()

    server._handle_event_internal = handle_then_act


class Handlers:
    """The Socket.IO event handlers of one app, called by python-socketio with the sid."""

    def __init__(self, app: Flask, server: socketio.Server) -> None:
        self.app = app
        self.server = server
        self.settings: Settings = app.extensions["tidings.settings"]
        self.connections: Connections = app.extensions["tidings.connections"]

    def connect(self, sid: str, environ: dict[str, Any], auth: Any = None) -> None:
        """Accept a connection, with a token's grant when one is given."""
        settings = self.settings
        connections = self.connections
        ip = client_address(environ, settings)
        if connections.per_ip[ip] >= settings.max_connections_per_ip:
            log.warning("refused a connection: %s has %d already", ip, connections.per_ip[ip])
            metrics.limit_hit("connections_per_ip")
            raise socketio.exceptions.ConnectionRefusedError("limit")
        grant = Grant()
        if isinstance(auth, dict) and auth.get("token") is not None:
            try:
                grant = grant_for(decode_token(auth["token"], settings))
            except InvalidToken as exc:
                log.info("refused a connection: invalid token (%s)", exc)
                raise socketio.exceptions.ConnectionRefusedError("invalid_token") from None
        # Presence hook (issue 14): revocations, the per-user cap; may refuse.
        self.app.extensions["tidings.presence"].admit(sid, grant)
        connections.by_sid[sid] = Connection(grant, ip, allowance=float(settings.subscribe_rate))
        connections.per_ip[ip] += 1
        if grant.expires_at is not None:
            connections.expiring.add(sid)
        _start_sweeper(self)

    def disconnect(self, sid: str, *_: Any) -> None:
        """Forget a connection's state."""
        self.connections.forget(sid)
        self.app.extensions["tidings.presence"].disconnected(sid)  # presence hook (issue 14)

    def subscribe(self, sid: str, payload: Any = None, *_: Any) -> dict[str, Any]:
        """Join a topic's room and answer with its offset and, with `since`, what was missed."""
        settings = self.settings
        connection = self.connections.by_sid.get(sid)
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
        # Looked up per call: tests swap the manager after the app is built.
        manager: QueueManager | None = self.app.extensions["tidings.queue"]
        if manager is None:  # no message queue (Flask-SocketIO's test client)
            return self._subscribe_here(sid, topic, payload.get("since"), grant, expires, new)
        if not new:
            # Again on the same connection: out of the room first, so that
            # the live stream and the recovery cannot overlap.
            self.server.leave_room(sid, room(topic), namespace=NAMESPACE)
        join = manager.begin_join(sid, topic)
        # Redis confirms the worker's subscription to the topic's channel
        # before history is read: whatever is forwarded after the read then
        # reaches this worker, and is held for the client until its ack.
        if not join.route.live.wait(SUBSCRIBED_WAIT_SECONDS):
            manager.cancel_join(join)
            self._forget(topic, grant, new)
            log.warning("subscribe %s: this worker is not subscribed to the message queue", topic)
            return _error("unavailable")
        join.generation = manager.generation
        if sid not in self.connections.by_sid:
            # Gone while it waited (a reconnect storm on a busy worker: its
            # client gave up): no history read for nobody.
            manager.cancel_join(join)
            return _error("unavailable")
        try:
            recovery = self._recover(topic, payload.get("since"))
        except redis.RedisError as exc:
            manager.cancel_join(join)
            self._forget(topic, grant, new)
            log.warning("subscribe %s: Redis unavailable (%s)", topic, exc)
            return _error("unavailable")
        if join.generation != manager.generation:
            # The queue connection dropped during the read: what was held may
            # have a hole that neither the read nor the room would fill.
            manager.cancel_join(join)
            self._forget(topic, grant, new)
            log.warning("subscribe %s: the message queue reconnected meanwhile", topic)
            return _error("unavailable")
        after_reply(lambda: manager.finish_join(join, recovery.offset))
        self._subscribed(sid, topic, grant, expires, new)
        return _ack(topic, recovery)

    def _subscribe_here(
        self, sid: str, topic: str, since: Any, grant: Grant, expires: float | None, new: bool
    ) -> dict[str, Any]:
        """Subscribe without a message queue: join the room, then read history."""
        self.server.enter_room(sid, room(topic), namespace=NAMESPACE)
        try:
            recovery = self._recover(topic, since)
        except redis.RedisError as exc:
            self.server.leave_room(sid, room(topic), namespace=NAMESPACE)
            self._forget(topic, grant, new)
            log.warning("subscribe %s: Redis unavailable (%s)", topic, exc)
            return _error("unavailable")
        self._subscribed(sid, topic, grant, expires, new)
        return _ack(topic, recovery)

    def _subscribed(
        self, sid: str, topic: str, grant: Grant, expires: float | None, new: bool
    ) -> None:
        grant.topics[topic] = expires
        if expires is not None:
            self.connections.expiring.add(sid)
        if new:
            metrics.subscription_changed(topic, 1)
        self.app.extensions["tidings.presence"].subscribed(sid, topic)  # presence hook (issue 14)

    def _recover(self, topic: str, since: Any) -> Recovery:
        return recover(
            self.app.extensions["tidings.redis"],
            topic,
            since,
            history_size=self.settings.history_size,
        )

    def _forget(self, topic: str, grant: Grant, new: bool) -> None:
        """After a failed subscribe: a resubscribe that failed leaves the topic unsubscribed."""
        if not new and topic in grant.topics:
            del grant.topics[topic]
            metrics.subscription_changed(topic, -1)

    def unsubscribe(self, sid: str, payload: Any = None, *_: Any) -> dict[str, Any]:
        """Leave a topic's room (or stop a join still under way)."""
        topic = payload.get("topic") if isinstance(payload, dict) else None
        if not is_valid_topic(topic):
            return _error("invalid_topic")
        manager: QueueManager | None = self.app.extensions["tidings.queue"]
        if manager is not None:
            manager.cancel_joins_of(sid, topic)
        self.server.leave_room(sid, room(topic), namespace=NAMESPACE)
        connection = self.connections.by_sid.get(sid)
        if connection is not None and topic in connection.grant.topics:
            connection.grant.topics.pop(topic)
            metrics.subscription_changed(topic, -1)
        self.app.extensions["tidings.presence"].unsubscribed(sid, topic)  # presence hook (issue 14)
        return {"ok": True}

    def refresh(self, sid: str, payload: Any = None, *_: Any) -> dict[str, Any]:
        """Replace the connection's token with a fresh one for the same user."""
        connection = self.connections.by_sid.get(sid)
        token = payload.get("token") if isinstance(payload, dict) else None
        if connection is None:
            return _error("invalid_token")
        try:
            claims = decode_token(token, self.settings)
        except InvalidToken as exc:
            log.info("refresh refused: sub=%s (%s)", connection.grant.sub, exc)
            return _error("invalid_token")
        old = connection.grant
        if old.sub is not None and claims.sub != old.sub:
            log.warning("refresh refused: token for sub=%s on sub=%s", claims.sub, old.sub)
            return _error("invalid_token")
        fresh = grant_for(claims)
        if not self.app.extensions["tidings.presence"].refreshed(sid, fresh):  # presence hook
            return _error("invalid_token")
        fresh.topics = old.topics
        connection.grant = fresh
        self.connections.expiring.add(sid)  # a token always has `exp`
        return {"ok": True, "expires": int(claims.expires_at)}


def _sweep(handlers: Handlers) -> None:
    """Tell connections whose token expired, and cut them after the grace period."""
    while True:
        handlers.server.sleep(SWEEP_SECONDS)
        try:
            _sweep_once(
                handlers.server,
                handlers.connections,
                handlers.settings,
                time.time(),
                handlers.app.extensions["tidings.presence"],
            )
        except Exception:  # never let one bad connection stop expiry for all
            log.exception("token expiry sweep failed; retrying")


def _sweep_once(
    server: socketio.Server,
    connections: Connections,
    settings: Settings,
    now: float,
    presence: Any,
) -> None:
    for sid in list(connections.expiring):
        connection = connections.by_sid.get(sid)
        if connection is None:  # gone between the copy and now
            connections.expiring.discard(sid)
            continue
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
                server.leave_room(sid, room(topic), namespace=NAMESPACE)
                presence.unsubscribed(sid, topic)  # presence hook (issue 14)
                server.emit("token_expired", {"topic": topic}, to=sid, namespace=NAMESPACE)
        if grant.expires_at is None and all(e is None for e in grant.topics.values()):
            connections.expiring.discard(sid)  # nothing of it can expire any more
        if grant.expires_at is None or grant.expires_at > now:
            grant.expiry_notified_at = None
        elif grant.expiry_notified_at is None:
            grant.expiry_notified_at = now
            server.emit(
                "token_expired", {"grace": settings.token_grace}, to=sid, namespace=NAMESPACE
            )
        elif now - grant.expiry_notified_at >= settings.token_grace:
            log.info("token expired: sub=%s cut after %ds grace", grant.sub, settings.token_grace)
            server.disconnect(sid, namespace=NAMESPACE)


def _start_sweeper(handlers: Handlers) -> None:
    connections = handlers.connections
    if connections.sweeping:  # the common case, without the lock
        return
    with connections.sweeper_lock:
        if not connections.sweeping:
            connections.sweeping = True
            handlers.server.start_background_task(_sweep, handlers)


class _InPlaceMiddleware(flask_socketio._SocketIOMiddleware):
    """Flask-SocketIO's WSGI middleware, adding `flask.app` to the environ in place.

    Flask-SocketIO copies every request's environ to add that key, and
    python-socketio keeps the copy for a websocket's whole life next to the
    server's own: 0.8 KB per idle connection. A WSGI server makes a fresh
    environ for each request, so the copy protects nothing.
    """

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        environ["flask.app"] = self.flask_app
        return socketio.WSGIApp.__call__(self, environ, start_response)


def init_app(app: Flask) -> None:
    """Register the Socket.IO handlers on the server `socketio.init_app` made for `app`."""
    app.extensions["tidings.connections"] = Connections()
    if type(app.wsgi_app) is flask_socketio._SocketIOMiddleware:
        app.wsgi_app.__class__ = _InPlaceMiddleware  # same object, same state
    server = extensions.socketio.server
    handlers = Handlers(app, server)
    app.extensions["tidings.realtime"] = handlers
    _run_after_replies(server)
    server.on("connect", handlers.connect, namespace=NAMESPACE)
    server.on("disconnect", handlers.disconnect, namespace=NAMESPACE)
    server.on("subscribe", handlers.subscribe, namespace=NAMESPACE)
    server.on("unsubscribe", handlers.unsubscribe, namespace=NAMESPACE)
    server.on("refresh", handlers.refresh, namespace=NAMESPACE)
