"""The web worker's end of the Socket.IO message queue (`tidings:socketio`).

python-socketio's RedisManager backs off up to 60 s between reconnects and
blocks in a bare `listen()`; Tidings needs deliveries back within seconds of
Redis returning and a readiness check that knows whether this worker is
really subscribed. This subclass owns the loop: a bounded `get_message`, a
capped backoff, one log line per outage, and the state `/readyz` reads.

The queue is at most once: whatever the listener emits while this worker is
not subscribed never reaches it, and its clients, whose websockets stayed up,
would never ask. So the manager remembers the newest offset it has shown
each topic's room and, after every resubscribe and before any new message,
replays what history holds after it (clients drop copies by offset). A room
whose gap history no longer covers has its connections dropped: its clients
reconnect, resubscribe with `since` and are told `recovered: false`.

Delivery to this worker's clients builds each event's packet and websocket
frame once and writes it straight to idle websockets (`webapp.fanout`);
callbacks and binary data keep python-socketio's path.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import redis
import socketio
from engineio import packet as eio_packet
from redis.backoff import NoBackoff
from redis.retry import Retry
from socketio import packet as sio_packet

from tidings import metrics
from tidings.connection import SOCKET_TIMEOUT, client_name, follow_master
from tidings.forwarder import now_ms
from tidings.history import BEGINNING, parse_offset, recover
from tidings.keys import SOCKETIO_CHANNEL
from webapp import fanout
from webapp.backpressure import abort_connection

log = logging.getLogger("tidings.queue")

POLL_SECONDS = 1.0
BACKOFF_START = 0.05
BACKOFF_MAX = 1.0
# The loop wakes at least every POLL_SECONDS; older than this means it is stuck.
STALE_AFTER_SECONDS = 5.0


class QueueManager(socketio.RedisManager):
    """Socket.IO client manager on `tidings:socketio` with a loop Tidings controls."""

    def __init__(self, url: str, *, history: redis.Redis, history_size: int) -> None:
        super().__init__(
            url,
            channel=SOCKETIO_CHANNEL,
            redis_options={
                "client_name": client_name("web"),
                "socket_timeout": SOCKET_TIMEOUT,
                "socket_connect_timeout": SOCKET_TIMEOUT,
                "health_check_interval": 10,
                # No silent reconnects inside redis-py: every lost subscription
                # must reach the loop below, which catches up after it.
                "retry": Retry(NoBackoff(), 0),
            },
        )
        self.subscribed = False
        # Set once Redis has confirmed the subscription and missed publications
        # were replayed; `subscribe` handlers wait on it (see `wait_subscribed`).
        self._live = threading.Event()
        self.last_poll = 0.0
        self.reconnects = 0
        self._closed = False
        self._history = history
        self._history_size = history_size
        # Newest offset this worker has shown (or acked) per topic.
        self._shown: dict[str, tuple[tuple[int, int], str]] = {}
        # Per topic, the newest offset the last catch-up replayed: live
        # messages that overlap it are trimmed (`_without_replayed`).
        self._replayed: dict[str, tuple[int, int] | None] = {}

    def note_offset(self, topic: str, offset: str | None) -> None:
        """Remember that this worker's clients of `topic` are at least at `offset`."""
        pair = parse_offset(offset)
        if pair is not None:
            known = self._shown.get(topic)
            if known is None or pair > known[0]:
                self._shown[topic] = (pair, offset)  # type: ignore[assignment]

    def emit(
        self,
        event: str,
        data: Any,
        namespace: str | None = None,
        room: Any = None,
        skip_sid: Any = None,
        callback: Any = None,
        to: Any = None,
        **kwargs: Any,
    ) -> None:
        """Emit as python-socketio does; a local emit without callback is framed once."""
        if callback is not None or not kwargs.get("ignore_queue"):
            # Through the queue: PubSubManager.emit delivers here by `_handle_emit`.
            return super().emit(
                event,
                data,
                namespace=namespace,
                room=room,
                skip_sid=skip_sid,
                callback=callback,
                to=to,
                **kwargs,
            )
        self._emit_here(event, data, namespace, to or room, skip_sid)
        return None

    def _emit_here(
        self, event: str, data: Any, namespace: str | None, room: Any, skip_sid: Any
    ) -> None:
        """Deliver to this worker's clients: `Manager.emit` without callback, one frame per emit."""
        if namespace not in self.rooms:
            return
        args = list(data) if isinstance(data, tuple) else [] if data is None else [data]
        encoded = self.server.packet_class(
            sio_packet.EVENT, namespace=namespace, data=[event, *args]
        ).encode()
        if not isinstance(encoded, str):
            # Binary attachments (a list of packets), or a binary packet class:
            # python-socketio's own path.
            socketio.Manager.emit(self, event, data, namespace, room=room, skip_sid=skip_sid)
            return
        skip = skip_sid if isinstance(skip_sid, list) else [skip_sid]
        fanout.deliver(
            self.server,
            eio_packet.Packet(eio_packet.MESSAGE, encoded),
            [eio_sid for sid, eio_sid in self.get_participants(namespace, room) if sid not in skip],
        )

    def _handle_emit(self, message: dict) -> None:
        room = message.get("room")
        if self._replayed and message.get("event") == "publications" and isinstance(room, str):
            trimmed = self._without_replayed(room[2:], message)
            if trimmed is None:
                return
            message = trimmed
        if message.get("callback") is None and not message.get("binary"):
            # PubSubManager._handle_emit would deliver through `super().emit`,
            # Manager.emit itself, past this class's `emit`: route it here.
            data = message["data"]
            if isinstance(data, list):
                data = data[0] if len(data) == 1 else tuple(data)
            self._emit_here(
                message["event"],
                data,
                message.get("namespace"),
                room,
                message.get("skip_sid"),
            )
        else:
            super()._handle_emit(message)
        if message.get("event") == "publications" and isinstance(room, str):
            with contextlib.suppress(LookupError, TypeError, AttributeError):
                self.note_offset(room[2:], message["data"][0][-1]["offset"])
            # The forward script's `tidings` key: path, list size, entry times.
            meta = message.get("tidings")
            if isinstance(meta, dict):
                recipients = self.recipients(room)
                if recipients:
                    size = meta.get("n")  # the list's items, without its brackets
                    size = (size if isinstance(size, int) else 0) + 2
                    metrics.sent(recipients, size + metrics.PACKET_OVERHEAD)
                    entered = meta.get("t")
                    if isinstance(entered, list):
                        metrics.observe_latencies(str(meta.get("path")), entered, now_ms())

    def _without_replayed(self, topic: str, message: dict) -> dict | None:
        """Drop from a live message what the last catch-up already replayed; None if all of it.

        A batch forwarded between the resubscribe and the catch-up's history
        read arrives both ways; the replay reached every client in the room,
        and anyone joining later read history after it.
        """
        upto = self._replayed.get(topic)
        if upto is None:
            return message
        try:
            pubs = message["data"][0]
            kept = [i for i, p in enumerate(pubs) if (parse_offset(p["offset"]) or (0, 0)) > upto]
        except (LookupError, TypeError):
            return message
        fresh = [pubs[i] for i in kept]
        if not fresh:
            return None
        # Everything after this message is newer than the replay.
        del self._replayed[topic]
        if len(fresh) == len(pubs):
            return message
        trimmed = {**message, "data": [fresh]}
        meta = message.get("tidings")
        if isinstance(meta, dict) and isinstance(meta.get("t"), list):
            trimmed["tidings"] = {
                **meta,
                "n": len(json.dumps(fresh, separators=(",", ":"))) - 2,
                "t": [meta["t"][i] for i in kept if i < len(meta["t"])],
            }
        return trimmed

    def recipients(self, room: str) -> int:
        """Return how many of this worker's connections are in a room of `/`."""
        members = self.rooms.get("/", {}).get(room)
        return len(members) if members is not None else 0

    def _catch_up(self) -> None:
        """Replay, room by room, what was forwarded while this worker was not subscribed."""
        for name in list(self.rooms.get("/", {})):
            if not isinstance(name, str) or not name.startswith("t:"):
                continue
            participants = list(self.get_participants("/", name))
            if not participants:
                continue
            topic = name[2:]
            since = self._shown.get(topic, (None, BEGINNING))[1]
            recovery = recover(self._history, topic, since, history_size=self._history_size)
            if not recovery.recovered:
                log.warning(
                    "topic=%s: history no longer covers the gap; resyncing its clients",
                    topic,
                    extra={"topic": topic},
                )
                for _, eio_sid in participants:
                    abort_connection(self.server.eio, eio_sid)
                continue
            if recovery.publications:
                log.info(
                    "topic=%s: replayed %d missed publications",
                    topic,
                    len(recovery.publications),
                    extra={"topic": topic},
                )
                self.emit(
                    "publications",
                    recovery.publications,
                    namespace="/",
                    room=name,
                    ignore_queue=True,
                )
                metrics.QUEUE_REPLAYED.inc(len(recovery.publications))
                size = len(json.dumps(recovery.publications, separators=(",", ":")))
                metrics.sent(len(participants), size + metrics.PACKET_OVERHEAD)
                self.note_offset(topic, recovery.publications[-1]["offset"])
                self._replayed[topic] = parse_offset(recovery.publications[-1]["offset"])

    def _redis_connect(self) -> None:
        super()._redis_connect()
        # The SUBSCRIBE confirmation marks when this worker starts hearing the
        # queue (`_confirm_subscription`); the base class would swallow it.
        self.pubsub.ignore_subscribe_messages = False
        # redis+sentinel://: move to the new master after a failover (the old
        # one keeps this subscription up but hears nothing); the loop below
        # then catches up from history as after any outage.
        follow_master(self.redis)

    def _publish(self, data: Any) -> None:
        """Publish to the other workers through the app's Redis client, once.

        python-socketio's version reconnects on a failed publish by calling
        `_redis_connect`, which replaces the pub/sub object the listening loop
        reads: the worker would poll a pub/sub subscribed to nothing and hear
        the queue no more, while looking healthy. (A web worker publishes
        rarely: an emit to a sid it does not hold.)
        """
        try:
            self._history.publish(self.channel, self.json.dumps(data))
        except redis.RedisError as exc:
            log.warning("message queue: publish failed (%s); not delivered to other workers", exc)

    def close(self) -> None:
        """End the listening loop (tests; a worker simply exits)."""
        self._closed = True

    def wait_subscribed(self, timeout: float) -> bool:
        """Wait until Redis has confirmed this worker's subscription; False at the deadline.

        A `subscribe` handler must not read history before then: whatever the
        listener forwards between that read and the SUBSCRIBE reaching Redis
        would be neither in the client's recovery nor delivered live.
        """
        return self._live.wait(timeout)

    @property
    def closed(self) -> bool:
        """Tell whether `close` was called."""
        return self._closed

    def ready(self) -> tuple[bool, str]:
        """Tell whether this worker receives the message queue, and why not."""
        if not self.subscribed:
            return False, "not subscribed to " + SOCKETIO_CHANNEL
        if time.monotonic() - self.last_poll > STALE_AFTER_SECONDS:
            return False, "message queue loop stalled"
        return True, "subscribed to " + SOCKETIO_CHANNEL

    def _listen(self) -> Iterator[bytes]:
        channel = self.channel.encode()
        for message in self._redis_listen_with_retries():
            if message["type"] == "message" and message["channel"] == channel:
                metrics.QUEUE_MESSAGES.inc()
                yield message["data"]

    def _confirm_subscription(self) -> None:
        """Read until Redis confirms the SUBSCRIBE (nothing else can come before it)."""
        deadline = time.monotonic() + SOCKET_TIMEOUT
        while time.monotonic() < deadline:
            reply = self.pubsub.get_message(timeout=POLL_SECONDS)
            if reply is not None and reply["type"] == "subscribe":
                return
        raise redis.TimeoutError("no confirmation of SUBSCRIBE " + self.channel)

    def _redis_listen_with_retries(self) -> Iterator[dict]:
        backoff = BACKOFF_START
        down = False
        while not self._closed:
            try:
                self._redis_connect()
                self.pubsub.subscribe(self.channel)
                self._confirm_subscription()
                if down:
                    # Before any new message, so that each topic stays in order.
                    self._catch_up()
                    log.info("message queue: Redis is back; resubscribed and caught up")
                    down = False
                self.last_poll = time.monotonic()
                self.subscribed = True
                self._live.set()
                backoff = BACKOFF_START
                if self.reconnects == 0:
                    log.info("message queue: subscribed to %s", self.channel)
                while not self._closed:
                    message = self.pubsub.get_message(timeout=POLL_SECONDS)
                    self.last_poll = time.monotonic()
                    if message is not None:
                        yield message
            except Exception as exc:  # any failure: drop the connection and start over
                self.subscribed = False
                self._live.clear()
                if self._closed:
                    return
                self.reconnects += 1
                metrics.QUEUE_RECONNECTS.inc()
                if not down:
                    log.warning("message queue: Redis unavailable (%s); reconnecting", exc)
                    down = True
                with contextlib.suppress(Exception):  # the connection is already gone
                    self.redis.close()
                time.sleep(backoff)  # gevent-patched: yields to the hub
                backoff = min(backoff * 2, BACKOFF_MAX)
