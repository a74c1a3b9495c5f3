"""Presence on a web node: the hooks of the Socket.IO handlers, the flusher, `presence` events.

The handlers of webapp/realtime.py call `admit`, `subscribed`,
`unsubscribed`, `disconnected` and `refreshed`; each only updates this
node's bookkeeping in memory (`tidings.presence.LocalPresence`), with two
exceptions: a connect under TIDINGS_MAX_CONNECTIONS_PER_USER asks Redis
(the cap holds across nodes, so it cannot be decided locally), and a token
is checked against this node's copy of the revocations.

A background greenlet flushes the deltas to the cluster-wide state
(`tidings.cluster`) every FLUSH_SECONDS when there are any, beats every
HEARTBEAT_SECONDS, and sends its whole share again every SYNC_SECONDS and
after any failed flush (whose outcome is unknown). After each flush it
sends the collected `joins` / `leaves` to the topics' rooms, in order, one
event per run of the same kind.

Operator commands (webapp/control.py) come here too: disconnect a user's
connections, unsubscribe them from a topic, close what a revocation refuses.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
import socketio
from flask import Flask

from tidings import metrics, revocation
from tidings.cluster import Cluster, Flushed
from tidings.connection import connect
from tidings.keys import room
from tidings.presence import Batch, LocalPresence
from tidings.revocation import Revocations
from tidings.settings import Settings
from tidings.stats import worker_name
from tidings.topics import is_valid_topic
from webapp import extensions, sse
from webapp.grants import Grant

log = logging.getLogger("tidings.presence")

NAMESPACE = "/"
# Deltas wait at most this long: presence lags a connect by about as much.
FLUSH_SECONDS = 0.2
# Well inside tidings.cluster.NODE_TTL_MS (10 s): a live node is never reaped.
HEARTBEAT_SECONDS = 1.0
# A node sends its whole share this often, healing any drift (a Redis that
# lost its last second of writes in a crash).
SYNC_SECONDS = 60.0


# topic -> [("joins" | "leaves", {"topic", "sub", "client"}), ...], in order
Events = dict[str, list[tuple[str, dict[str, Any]]]]


def _error(error: str) -> dict[str, Any]:
    return {"ok": False, "error": error}


class Presence:
    """This web node's presence: bookkeeping, flushing, reads, revocations, commands."""

    def __init__(self, app: Flask) -> None:
        self.app = app
        self.settings: Settings = app.extensions["tidings.settings"]
        self.client: redis.Redis = app.extensions["tidings.redis"]
        self.local = LocalPresence(self.settings.presence_topics, self.settings.join_leave_topics)
        self.cluster = Cluster(self.client, webhooks=self.settings.webhook_url is not None)
        self.node = worker_name()
        self.started_ms = int(time.time() * 1000)
        self.revocations = Revocations()
        # Serialises this node's writes of its share (flushes, syncs, the
        # per-user cap's admissions): a sync must not overtake an admission.
        self._redis_lock = threading.Lock()
        self._need_sync = True  # the first flush registers the node
        self._last_beat = 0.0
        self._last_sync = 0.0
        self._down = False

    @property
    def server(self) -> socketio.Server:
        """Return the python-socketio server."""
        return extensions.socketio.server

    # -- hooks of the Socket.IO handlers ---------------------------------------------

    def admit(self, sid: str, grant: Grant) -> None:
        """Record a connection, or refuse it (revoked token, per-user cap) by raising."""
        if self.revocations.refuses(grant.sub, grant.issued_at, grant.token_id):
            log.info("refused a connection: revoked token (sub=%s)", grant.sub)
            raise socketio.exceptions.ConnectionRefusedError("invalid_token")
        cap = self.settings.max_connections_per_user
        record = {"issued_at": grant.issued_at, "token_id": grant.token_id}
        if cap is None or grant.sub is None:
            self.local.connect(sid, grant.sub, **record)
            return
        events: Events = {}
        try:
            with self._redis_lock:
                verdict = self.cluster.admit(self.node, grant.sub, cap)
                if verdict < 0:  # this node is not registered yet (or was reaped)
                    self._flush_locked(True, events)
                    verdict = self.cluster.admit(self.node, grant.sub, cap)
                if verdict > 0:
                    self.local.connect(sid, grant.sub, counted=True, **record)
        except redis.RedisError as exc:
            log.warning("refused a connection: Redis unavailable for the user cap (%s)", exc)
            raise socketio.exceptions.ConnectionRefusedError("unavailable") from None
        finally:
            self._emit(events)
        if verdict <= 0:
            log.info("refused a connection: sub=%s has %d connections already", grant.sub, cap)
            metrics.limit_hit("connections_per_user")
            raise socketio.exceptions.ConnectionRefusedError("limit")

    def refreshed(self, sid: str, grant: Grant) -> bool:
        """Record a connection's new token; False (refuse it) when it is revoked."""
        if self.revocations.refuses(grant.sub, grant.issued_at, grant.token_id):
            log.info("refresh refused: revoked token (sub=%s)", grant.sub)
            return False
        self.local.refresh(sid, grant.issued_at, grant.token_id)
        return True

    def subscribed(self, sid: str, topic: str) -> None:
        """Record a successful `subscribe`."""
        self.local.subscribe(sid, topic)

    def unsubscribed(self, sid: str, topic: str) -> None:
        """Record that a connection left a topic."""
        self.local.unsubscribe(sid, topic)

    def disconnected(self, sid: str) -> None:
        """Record a closed connection."""
        self.local.disconnect(sid)

    # -- flushing ----------------------------------------------------------------------

    def _facts(self) -> dict[str, str]:
        connections, topics = self.local.local_counts()
        return {
            "host": socket.gethostname(),
            "pid": str(os.getpid()),
            "started": str(self.started_ms),
            "connections": str(connections),
            "topics": str(topics),
        }

    def _take(self, sync: bool, events: Events) -> Batch:
        """Take the deltas (or the whole share), moving their join/leave events to `events`."""
        batch = self.local.snapshot() if sync else self.local.take()
        for topic, items in batch.events.items():
            events.setdefault(topic, []).extend(items)
        return batch

    def _flush_locked(self, sync: bool, events: Events) -> Flushed:
        """Flush with `_redis_lock` held; raise redis errors (the next flush syncs)."""
        batch = self._take(sync, events)
        try:
            flushed = self.cluster.flush(self.node, batch, sync=sync, facts=self._facts())
            if not flushed.known:
                # Reaped while alive (paused), or Redis lost our keys: send everything.
                again = self._take(True, events)
                flushed = self.cluster.flush(self.node, again, sync=True, facts=self._facts())
                sync = True
        except redis.RedisError:
            # The script may or may not have run: only a whole share is safe now.
            self._need_sync = True
            raise
        now = time.monotonic()
        self._last_beat = now
        if sync:
            self._need_sync = False
            self._last_sync = now
        return flushed

    def flush(self, sync: bool = False) -> None:
        """Send this node's deltas (or whole share), beat, then send joins and leaves."""
        events: Events = {}
        try:
            with self._redis_lock:
                flushed = self._flush_locked(sync or self._need_sync, events)
        except redis.RedisError as exc:
            if not self._down:
                log.warning("presence: Redis unavailable (%s); will sync when it is back", exc)
                self._down = True
            return
        finally:
            self._emit(events)  # they happened, whatever Redis says
        if self._down:
            log.info("presence: Redis is back; this node's share is synced")
            self._down = False
        if flushed.revocations_version != self.revocations.version:
            self.reload_revocations()

    def _emit(self, events: Events) -> None:
        for topic, items in events.items():
            run: list[dict[str, Any]] = []
            kind = None
            for event, item in items:
                if event != kind and run:
                    self.server.emit(kind, run, to=room(topic), namespace=NAMESPACE)
                    run = []
                kind = event
                run.append(item)
            if run:
                self.server.emit(kind, run, to=room(topic), namespace=NAMESPACE)

    def tick(self) -> None:
        """Flush if anything waits, a beat or a sync is due."""
        now = time.monotonic()
        if (
            self.local.pending()
            or self._need_sync
            or now - self._last_beat >= HEARTBEAT_SECONDS
            or now - self._last_sync >= SYNC_SECONDS
        ):
            self.flush(sync=now - self._last_sync >= SYNC_SECONDS)

    def run(self, closed: Callable[[], bool]) -> None:
        """Flush until `closed()` (tests; a worker simply exits)."""
        while not closed():
            try:
                self.tick()
            except Exception:  # never let one bad flush stop presence for good
                log.exception("presence flush failed; trying again")
            time.sleep(FLUSH_SECONDS)  # gevent-patched in a serving worker

    # -- revocations ---------------------------------------------------------------------

    def reload_revocations(self) -> int:
        """Reload the revocations and close the connections they now refuse; return how many."""
        try:
            self.revocations = revocation.load(self.client, self.settings.revocation_ttl)
        except redis.RedisError as exc:
            log.warning("revocations not reloaded: Redis unavailable (%s)", exc)
            return 0
        refuses = self.revocations.refuses
        sids = self.local.matching(lambda m: refuses(m.sub, m.issued_at, m.token_id))
        for sid in sids:
            self._disconnect(sid)
        if sids:
            log.info("revocations: closed %d connections", len(sids))
        return len(sids)

    # -- operator commands ---------------------------------------------------------------

    def _disconnect(self, sid: str) -> None:
        """Close a connection of this node: a Socket.IO one, or an SSE stream."""
        if not sse.close_stream(self.app, sid):
            self.server.disconnect(sid, namespace=NAMESPACE)

    def handle(self, command: dict[str, Any]) -> int:
        """Act on an operator command on this node's connections; return how many it touched."""
        op = command["op"]
        count = 0
        if op == "disconnect":
            for sub in command["subs"]:
                for sid in self.local.sids_of(sub):
                    self._disconnect(sid)
                    count += 1
        elif op == "unsubscribe":
            realtime = self.app.extensions["tidings.realtime"]
            for sub, topic in command["pairs"]:
                for sid in self.local.sids_of(sub):
                    if sse.drop_topic(self.app, sid, topic):  # an SSE stream: told there
                        count += 1
                    elif self.local.is_subscribed(sid, topic):
                        realtime.unsubscribe(sid, {"topic": topic})
                        self.server.emit(
                            "unsubscribed",
                            {"topic": topic},
                            to=sid,
                            namespace=NAMESPACE,
                            ignore_queue=True,
                        )
                        count += 1
        elif op == "revoke":
            count = self.reload_revocations()
        if count:
            log.info("operator command %s: %d connections on this node", op, count)
        return count

    # -- Socket.IO events: presence, presence_stats ----------------------------------------

    def _check(self, sid: str, payload: Any) -> str | dict[str, Any]:
        """Return the topic a presence request may read, or the error ack."""
        connection = self.app.extensions["tidings.connections"].by_sid.get(sid)
        if connection is None or not isinstance(payload, dict):
            return _error("invalid_topic")
        # Each read costs Redis a round trip: they share the subscribe rate.
        if not connection.take(self.settings.subscribe_rate):
            metrics.limit_hit("subscribe_rate")
            return _error("limit")
        topic = payload.get("topic")
        if not is_valid_topic(topic):
            return _error("invalid_topic")
        grant = connection.grant
        if not grant.allows(topic, self.settings.public_topics) and topic not in grant.topics:
            log.info("presence forbidden: sub=%s topic=%s", grant.sub, topic)
            return _error("forbidden")
        if not self.local.keeps_presence(topic):
            return _error("presence_off")
        return topic

    def _read(self, sid: str, payload: Any, read: Callable[[str], dict[str, Any]]) -> dict:
        topic = self._check(sid, payload)
        if isinstance(topic, dict):
            return topic
        if self.local.pending():
            self.flush()  # this node's own changes show at once
        try:
            return {"ok": True, "topic": topic, **read(topic)}
        except redis.RedisError as exc:
            log.warning("presence %s: Redis unavailable (%s)", topic, exc)
            return _error("unavailable")

    def on_presence(self, sid: str, payload: Any = None, *_: Any) -> dict[str, Any]:
        """Answer `presence`: connections and users (with their connections) of a topic."""

        def read(topic: str) -> dict[str, Any]:
            clients, users = self.cluster.members(topic)
            return {"clients": clients, "users": users}

        return self._read(sid, payload, read)

    def on_presence_stats(self, sid: str, payload: Any = None, *_: Any) -> dict[str, Any]:
        """Answer `presence_stats`: how many connections and users a topic has."""

        def read(topic: str) -> dict[str, Any]:
            clients, users = self.cluster.stats(topic)
            return {"clients": clients, "users": users}

        return self._read(sid, payload, read)


def init_app(app: Flask) -> None:
    """Create this node's presence, register its events; in a serving worker, start it."""
    from webapp import control

    presence = Presence(app)
    app.extensions["tidings.presence"] = presence
    server = extensions.socketio.server
    server.on("presence", presence.on_presence, namespace=NAMESPACE)
    server.on("presence_stats", presence.on_presence_stats, namespace=NAMESPACE)
    manager = app.extensions.get("tidings.queue")
    if manager is None or not app.config.get("SUBSCRIBE_QUEUE"):
        return
    presence.reload_revocations()
    extensions.socketio.start_background_task(presence.run, lambda: manager.closed)
    # A connection of its own, named tidings:web-control:<host>:<pid> in CLIENT
    # LIST, so that the message queue's stays the web worker's one subscriber.
    client = connect(presence.settings.redis_url, "web-control", max_connections=4)
    listener = control.ControlListener(client, presence, closed=lambda: manager.closed)
    extensions.socketio.start_background_task(listener.run)
