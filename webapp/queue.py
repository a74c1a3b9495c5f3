"""The web worker's end of the Socket.IO message queue: `tidings:socketio` and per-topic channels.

One Redis connection per worker, read directly (tidings.pubsub), carries:

- `tidings:socketio`, python-socketio's channel: control messages and
  application emits (`socketio.emit` from app code, or from another process
  through Flask-SocketIO's write-only queue), handled as python-socketio's
  PubSubManager does;
- `tidings:socketio:<topic>` for each topic this worker's clients are
  subscribed to (interest routing, `webapp.routing`): the listener's
  publications. These take a lean path: the publications list is sliced out
  of the message by position (the forward script puts it last), framed once,
  and written to the room's websockets (`webapp.fanout`); no JSON decode, no
  packet re-encode.

A client joins a topic in three steps (`begin_join`, `finish_join`), which
close the join race: the worker's channel is confirmed by Redis before the
subscribe handler reads history, publications that arrive meanwhile are held
for the joining client, and after the ack (whose recovery ends at the
history's latest offset) the client gets the held ones that are newer, then
joins the room. No gap, no copy, no reordering on the wire.

The queue is at most once: whatever the listener emits while this worker is
not subscribed never reaches it. So the manager remembers the newest offset
it has shown each topic's room and, after every resubscribe and before any
newer message of the topic, replays from history what came after it. A room
whose gap history no longer covers has its connections dropped: its clients
reconnect, resubscribe with `since` and are told `recovered: false`. Redis
closing this connection for a full output buffer (a worker too slow for its
topics, `client-output-buffer-limit pubsub`) is handled the same way.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import redis
import socketio
from engineio import packet as eio_packet
from socketio import packet as sio_packet

from tidings import metrics
from tidings.connection import client_name, connect, follow_master
from tidings.forwarder import now_ms
from tidings.history import BEGINNING, parse_offset, recover_many
from tidings.keys import SOCKETIO_CHANNEL, room
from tidings.pubsub import PubSubConnection, is_pong
from webapp import fanout
from webapp.backpressure import abort_connection
from webapp.routing import LINGER_SECONDS, LIVE, Route, Routes
from webapp.sse import Outgoing, Stream, publication_events

log = logging.getLogger("tidings.queue")

POLL_SECONDS = 1.0
BACKOFF_START = 0.05
BACKOFF_MAX = 1.0
# The loop wakes at least every POLL_SECONDS; older than this means it is stuck.
STALE_AFTER_SECONDS = 5.0
# Queue messages handled before the loop lets other greenlets run, and the
# longest it handles them without doing so.
REPLIES_PER_TURN = 256
TURN_SECONDS = 0.02
# How often the counts of routed deliveries reach the metrics: each write is
# a memory-mapped file update in multiprocess mode, too dear per read.
FLUSH_SECONDS = 0.5
# How often the command writer looks for lingering routes to leave.
EXPIRE_EVERY_SECONDS = 0.5

_CONTROL = SOCKETIO_CHANNEL.encode()
_MESSAGE = b"message"
_META_KEY = b',"tidings":'
_DATA_KEY = b',"data":['
_PACKET_HEAD = b'2["publications",'
# json.loads without its type checks and encoding detection, for str.
_decode = json.JSONDecoder().raw_decode


@dataclass
class Join:
    """A client between its `subscribe` and the room: what the topic's channel brought meanwhile."""

    sid: str
    topic: str
    route: Route
    # Publications lists (JSON text) and their last offsets, in arrival order.
    held: list[tuple[bytes, tuple[int, int] | None]] = field(default_factory=list)
    # The queue connection (`QueueManager.generation`) its route was live on
    # when it read history: on another one, what it holds may have a hole.
    generation: int = -1


def split_message(raw: bytes) -> tuple[bytes, dict[str, Any]] | None:
    """Return a forwarded message's publications list (JSON text) and its `tidings` metadata.

    The forward script writes `...,"tidings":{...},"data":[[...]]}`: nothing
    before `data` comes from a publisher, so its first occurrence is the key.
    None for anything else (a message of another shape is decoded instead).
    """
    data_at = raw.find(_DATA_KEY)
    meta_at = raw.find(_META_KEY, 0, data_at) if data_at > 0 else -1
    if meta_at < 0 or not raw.endswith(b"]]}"):
        return None
    try:
        meta = _decode(raw[meta_at + len(_META_KEY) : data_at].decode())[0]
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(meta, dict):
        return None
    return raw[data_at + len(_DATA_KEY) : -2], meta


def _newer_than(pubs: list[Any], offset: tuple[int, int]) -> list[Any]:
    """Return the publications (dicts) of a list whose offset is after `offset`."""
    return [p for p in pubs if (parse_offset(p.get("offset")) or (0, 0)) > offset]


class QueueManager(socketio.PubSubManager):
    """Socket.IO client manager on `tidings:socketio` and per-topic channels, with Tidings' loop."""

    name = "tidings"

    def __init__(
        self,
        url: str,
        *,
        history: redis.Redis,
        history_size: int,
        linger: float = LINGER_SECONDS,
    ) -> None:
        super().__init__(channel=SOCKETIO_CHANNEL)
        self._url = url
        self._redis: redis.Redis | None = None
        self._connection: PubSubConnection | None = None
        self.routes = Routes(linger)
        self._lock = threading.Lock()
        self._wake = threading.Event()  # the command writer has work
        # topic -> sid -> Join: clients between `begin_join` and `finish_join`.
        self._joins: dict[str, dict[str, Join]] = {}
        # topic -> sid -> SSE stream (webapp.sse): subscribers that are no
        # Socket.IO room members. Each keeps its own position per topic.
        self._streams: dict[str, dict[str, Stream]] = {}
        # topic -> sid -> (offset, eio sid): members who joined at an offset
        # this worker's stream of the topic may not have passed yet (their
        # history read ran ahead of the socket): what is not newer is not
        # theirs. Each leaves this map at the first message past its offset.
        self._fresh: dict[str, dict[str, tuple[tuple[int, int], str]]] = {}
        self.subscribed = False
        # Set while Redis has confirmed `tidings:socketio` on the live connection.
        self._live = threading.Event()
        self.last_poll = 0.0
        self.reconnects = 0
        # Between the log line of an outage and the one of its end.
        self._down = False
        # Counts queue connections lost: a join that read history on an
        # earlier one cannot trust what it holds.
        self.generation = 0
        self._closed = False
        self._history = history
        self._history_size = history_size
        # Newest offset this worker has shown each topic's room: every member
        # has been shown everything up to it (or did not want it).
        self._shown: dict[str, tuple[tuple[int, int], str]] = {}
        # Per topic, the newest offset the last catch-up replayed: live
        # messages that overlap it are trimmed (`_without_replayed`).
        self._replayed: dict[str, tuple[int, int]] = {}
        # Publications received on topic channels, and of those, how many
        # found a local client (the rest came while a channel lingered).
        self.received = 0
        self.delivered = 0
        # Metrics of the messages read lately, written every FLUSH_SECONDS.
        self.batch = metrics.Batch()

    # -- emitting --------------------------------------------------------------

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

    def _publish(self, data: Any) -> None:
        """Publish to the other workers on `tidings:socketio`, once.

        python-socketio's managers reconnect and retry on a failed publish; a
        web worker publishes rarely (an emit to a sid it does not hold), and
        a lost control message is logged, never retried twice.
        """
        try:
            self._history.publish(self.channel, self.json.dumps(data))
        except redis.RedisError as exc:
            log.warning("message queue: publish failed (%s); not delivered to other workers", exc)

    # -- routed publications ------------------------------------------------------

    def _deliver_routed(self, topic: str, raw: bytes) -> None:
        """Hand one forwarded message of a topic's channel to the room and to joining clients."""
        name = room(topic)
        members = self.rooms.get("/", {}).get(name)
        joins = self._joins.get(topic)
        streams = self._streams.get(topic)
        parts = split_message(raw)
        if parts is None:
            # Not the forward script's shape (an older listener, an operator's
            # probe): python-socketio's format, decoded.
            with contextlib.suppress(ValueError):
                message = json.loads(raw)
                if isinstance(message, dict) and message.get("method") == "emit":
                    self._handle_emit(message)
            return
        listing, meta = parts
        entered = meta.get("t")
        count = len(entered) if isinstance(entered, list) else 1
        self.received += count
        if not members and not joins and not streams:
            return  # lingering, or every client left while it was on its way
        self.delivered += count
        last = parse_offset(meta.get("last"))
        if topic in self._replayed:
            trimmed = self._without_replayed(topic, listing, meta)
            if trimmed is None:
                return
            listing, meta = trimmed
        if joins:
            with self._lock:
                for join in self._joins.get(topic, {}).values():
                    join.held.append((listing, last))
        if streams:
            with contextlib.suppress(ValueError):
                # Each distinct next id and chunk is built once for the streams
                # at the same positions, and written at once to idle ones.
                outgoing = Outgoing(topic, publication_events(_decode(listing.decode())[0]))
                reached = 0
                for stream in list(streams.values()):
                    if stream.deliver(outgoing):
                        reached += 1
                if reached:
                    self.batch.sent(reached, 0)
            if last is not None:
                self._shown[topic] = (last, meta["last"])
        if members:
            recipients = list(members.values())
            behind: list[tuple[str, tuple[int, int]]] = []
            if topic in self._fresh:
                recipients, behind = self._past_fresh(topic, members, meta)
            payload = _PACKET_HEAD + listing + b"]"
            fanout.deliver(
                self.server,
                eio_packet.Packet(eio_packet.MESSAGE, payload.decode()),
                recipients,
                frame=fanout.encode_frame(b"4" + payload),
            )
            for sid, offset in behind:
                with contextlib.suppress(ValueError):
                    newer = _newer_than(json.loads(listing), offset)
                    if newer:
                        self._emit_here("publications", newer, "/", sid, None)
            if last is not None:
                self._shown[topic] = (last, meta["last"])
            self.batch.sent(len(members), len(payload) + 1)
            entered = meta.get("t")
            if isinstance(entered, list):
                self.batch.latencies(str(meta.get("path")), entered, now_ms())

    def _past_fresh(
        self, topic: str, members: Any, meta: dict[str, Any]
    ) -> tuple[list[str], list[tuple[str, tuple[int, int]]]]:
        """Split a message's recipients: whole, or (fresh members it overlaps) filtered.

        Returns the eio sids that get the message as it is, and the members
        that get only its publications newer than their offset.
        """
        fresh = self._fresh[topic]
        first, last = parse_offset(meta.get("first")), parse_offset(meta.get("last"))
        skip: set[str] = set()
        behind: list[tuple[str, tuple[int, int]]] = []
        for sid, (offset, eio_sid) in list(fresh.items()):
            if sid not in members:
                del fresh[sid]  # left the room
                continue
            if last is not None and last <= offset:
                skip.add(eio_sid)  # all of it was in the ack (or before it)
                continue
            del fresh[sid]  # the stream is past its offset from here on
            if first is not None and first > offset:
                continue  # all of it is new to this member
            skip.add(eio_sid)
            behind.append((sid, offset))
        if not fresh:
            del self._fresh[topic]
        return [eio_sid for eio_sid in members.values() if eio_sid not in skip], behind

    def _without_replayed(
        self, topic: str, listing: bytes, meta: dict[str, Any]
    ) -> tuple[bytes, dict[str, Any]] | None:
        """Drop from a live message what the last catch-up already replayed; None if all of it.

        A batch forwarded between the resubscribe and the catch-up's history
        read arrives both ways; the replay reached every client in the room,
        and anyone joining later read history after it.
        """
        upto = self._replayed[topic]
        first, last = parse_offset(meta.get("first")), parse_offset(meta.get("last"))
        if last is not None and last <= upto:
            return None
        # Everything after this message is newer than the replay.
        del self._replayed[topic]
        if first is not None and first > upto:
            return listing, meta
        try:
            pubs = json.loads(listing)
            kept = [i for i, p in enumerate(pubs) if (parse_offset(p["offset"]) or (0, 0)) > upto]
        except (ValueError, LookupError, TypeError):
            return listing, meta
        entered = meta.get("t")
        meta = {**meta, "first": pubs[kept[0]]["offset"]} if kept else meta
        if isinstance(entered, list):
            meta["t"] = [entered[i] for i in kept if i < len(entered)]
        return json.dumps([pubs[i] for i in kept], separators=(",", ":")).encode(), meta

    def note_offset(self, topic: str, offset: str | None) -> None:
        """Remember that this worker's clients of `topic` are at least at `offset`."""
        pair = parse_offset(offset)
        if pair is not None:
            known = self._shown.get(topic)
            if known is None or pair > known[0]:
                self._shown[topic] = (pair, offset)  # type: ignore[assignment]

    # -- joining a topic ------------------------------------------------------------

    def begin_join(self, sid: str, topic: str) -> Join:
        """Start holding the topic's publications for `sid` and make sure its channel is wanted."""
        with self._lock:
            route = self.routes.want(topic)
            join = Join(sid, topic, route)
            self._joins.setdefault(topic, {})[sid] = join
            commands = self.routes.has_commands()
        if commands:
            self._wake.set()
        return join

    def cancel_join(self, join: Join) -> None:
        """Stop holding publications for a join that failed."""
        with self._lock:
            self._drop_join(join)
        self._maybe_vacate(join.topic)

    def finish_join(self, join: Join, latest: str | None) -> None:
        """After the ack: send `sid` what came after `latest` while it joined, then enter the room.

        Runs right after the ack went into the client's queue, with no switch
        in between, so the held publications follow the ack and precede any
        live one.
        """
        with self._lock:
            if not self._drop_join(join):
                return  # cancelled meanwhile (an unsubscribe)
            held = join.held
        eio_sid = self.eio_sid_from_sid(join.sid, "/")
        if eio_sid is None or not self.is_connected(join.sid, "/"):
            self._maybe_vacate(join.topic)
            return
        after = parse_offset(latest)
        pubs: list[Any] = []
        for listing, last in held:
            if after is not None and last is not None and last <= after:
                continue
            with contextlib.suppress(ValueError):
                batch = json.loads(listing)
                pubs += batch if after is None else _newer_than(batch, after)
        if pubs:
            self._emit_here("publications", pubs, "/", join.sid, None)
        name = room(join.topic)
        first_member = not self.rooms.get("/", {}).get(name)
        self.server.enter_room(join.sid, name, namespace="/")
        position = pubs[-1]["offset"] if pubs else latest
        pair = parse_offset(position)
        if pair is not None:
            # The history read may have run ahead of this worker's socket:
            # what arrives up to `position` is the client's already.
            self._fresh.setdefault(join.topic, {})[join.sid] = (pair, eio_sid)
        if first_member:
            # Nobody else here is owed anything older; with others in the
            # room, their own mark stands (they may still be owed what is on
            # its way, which a catch-up must not skip). A topic empty at the
            # read is marked as such: a catch-up then replays from its start.
            self.note_offset(join.topic, position or BEGINNING)

    def attach_stream(self, stream: Stream, joins: list[Join]) -> None:
        """Make an SSE stream a subscriber of its joins' topics, after its first events.

        What the joins held is sent now (the stream drops what its position
        already covers); from here on the stream gets each topic's messages.
        """
        for join in joins:
            with self._lock:
                if not self._drop_join(join):
                    continue
                held = join.held
            topic = join.topic
            for listing, _ in held:
                with contextlib.suppress(ValueError):
                    stream.send(topic, publication_events(json.loads(listing)))
            first = not self._has_local(topic)
            self._streams.setdefault(topic, {})[stream.sid] = stream
            if first:
                self.note_offset(topic, stream.offset(topic) or BEGINNING)

    def detach_stream(self, stream: Stream, topics: Iterable[str] | None = None) -> None:
        """Stop sending an SSE stream its topics (all of them by default)."""
        for topic in stream.topics if topics is None else topics:
            streams = self._streams.get(topic)
            if streams is not None and streams.pop(stream.sid, None) is not None:
                if not streams:
                    del self._streams[topic]
                self._maybe_vacate(topic)

    def _has_local(self, topic: str) -> bool:
        """Tell whether a client here (room member or stream) receives the topic."""
        return bool(self.rooms.get("/", {}).get(room(topic)) or self._streams.get(topic))

    def cancel_joins_of(self, sid: str, topic: str) -> None:
        """Cancel `sid`'s join of `topic` still under way, if any (it unsubscribed)."""
        with self._lock:
            join = self._joins.get(topic, {}).get(sid)
            if join is not None:
                self._drop_join(join)

    def _drop_join(self, join: Join) -> bool:
        """Forget a join; False if it was gone already."""
        joins = self._joins.get(join.topic)
        if joins is None or joins.get(join.sid) is not join:
            return False
        del joins[join.sid]
        if not joins:
            del self._joins[join.topic]
        return True

    # -- room membership drives routing -------------------------------------------

    def basic_enter_room(self, sid: str, namespace: str, room: Any, eio_sid: Any = None) -> None:
        """Enter a room; a topic room entered directly (app code) gets its channel too."""
        super().basic_enter_room(sid, namespace, room, eio_sid=eio_sid)
        if namespace == "/" and isinstance(room, str) and room.startswith("t:"):
            with self._lock:
                route = self.routes.by_topic.get(room[2:])
                needed = route is None or not route.wanted
                if needed:
                    self.routes.want(room[2:])
            if needed:
                self._wake.set()

    def basic_leave_room(self, sid: str, namespace: str, room: Any) -> None:
        """Leave a room; the last local member of a topic room starts its channel's linger."""
        super().basic_leave_room(sid, namespace, room)
        if namespace == "/" and isinstance(room, str) and room.startswith("t:"):
            fresh = self._fresh.get(room[2:])
            if fresh is not None:
                fresh.pop(sid, None)
                if not fresh:
                    del self._fresh[room[2:]]
            self._maybe_vacate(room[2:])

    def _maybe_vacate(self, topic: str) -> None:
        if self._has_local(topic):
            return
        with self._lock:
            if topic not in self._joins:
                self.routes.vacate(topic, time.monotonic())

    def recipients(self, room_name: str) -> int:
        """Return how many of this worker's connections are in a room of `/`."""
        members = self.rooms.get("/", {}).get(room_name)
        return len(members) if members is not None else 0

    # -- the connection -------------------------------------------------------------

    def initialize(self) -> None:
        """Start the reading loop and the command writer (python-socketio calls this once)."""
        super().initialize()  # starts `_thread`
        self.server.start_background_task(self._write_commands)

    def _thread(self) -> None:
        """Read the queue connection forever: connect, subscribe, dispatch, reconnect."""
        backoff = BACKOFF_START
        while not self._closed:
            try:
                self._connect()
                backoff = BACKOFF_START
                self._read()
            except Exception as exc:  # any failure: drop the connection and start over
                self._disconnected()
                if self._closed:
                    return
                self.reconnects += 1
                metrics.QUEUE_RECONNECTS.inc()
                if not isinstance(exc, (redis.RedisError, OSError)):
                    # Not an outage: a bug, with its stack, every time.
                    log.exception("message queue: the loop failed; reconnecting")
                elif not self._down:
                    log.warning("message queue: Redis unavailable (%s); reconnecting", exc)
                    self._down = True
                time.sleep(backoff)  # gevent-patched: yields to the hub
                backoff = min(backoff * 2, BACKOFF_MAX)

    def _connect(self) -> None:
        if self._redis is None:
            # Its own client (pool), so that Sentinel failovers move it too.
            self._redis = connect(self._url, "web", max_connections=4)
            follow_master(self._redis)
        connection = PubSubConnection(self._redis)
        with self._lock:
            self._connection = connection
            self.routes.reset(connected=True)
        connection.subscribe([SOCKETIO_CHANNEL])
        self._wake.set()  # the writer subscribes the routes

    def _disconnected(self) -> None:
        self.subscribed = False
        self._live.clear()
        with self._lock:
            self.generation += 1
            connection, self._connection = self._connection, None
            self.routes.reset(connected=False)
        if connection is not None:
            with contextlib.suppress(Exception):  # already broken
                connection.close()

    def _read(self) -> None:
        """Dispatch replies until the connection fails (raises) or the manager closes."""
        connection = self._connection
        assert connection is not None
        caught_up: list[Route] = []
        flushed = 0.0
        while not self._closed:
            replies = connection.read(POLL_SECONDS, max_replies=REPLIES_PER_TURN)
            self.last_poll = turn = time.monotonic()
            for reply in replies:
                if time.monotonic() - turn > TURN_SECONDS:
                    # A worker short of CPU (or a message to very many clients)
                    # must still let gunicorn's heartbeat and the clients'
                    # PONG readers run: starved for 30 s, gunicorn kills it.
                    time.sleep(0)  # gevent-patched: a switch
                    turn = time.monotonic()
                if not isinstance(reply, list) or len(reply) < 3:
                    if isinstance(reply, redis.ResponseError):
                        log.error("message queue: Redis refused a command: %s", reply)
                    elif not is_pong(reply):
                        log.warning("message queue: unexpected reply %.80r", reply)
                    continue
                kind, channel = reply[0], reply[1]
                if kind == _MESSAGE:
                    if caught_up:
                        # Before any newer message: each topic stays in order.
                        self._catch_up(caught_up)
                        caught_up = []
                    self.batch.messages += 1
                    if channel == _CONTROL:
                        self._handle_control(reply[2])
                    else:
                        self._deliver_routed(channel[len(_CONTROL) + 1 :].decode(), reply[2])
                elif kind == b"subscribe":
                    if channel == _CONTROL:
                        self.subscribed = True
                        self._live.set()
                        if self._down:
                            log.info("message queue: Redis is back; resubscribed")
                            self._down = False
                        elif self.reconnects == 0:
                            log.info("message queue: subscribed to %s", SOCKETIO_CHANNEL)
                        continue
                    with self._lock:
                        route = self.routes.confirmed(channel.decode())
                    if route is not None and self._has_local(route.topic):
                        # Clients here while the channel was not subscribed
                        # (a reconnect): what they missed is in history.
                        caught_up.append(route)
                elif kind == b"unsubscribe":
                    with self._lock:
                        gone = self.routes.left(channel.decode())
                    if gone is not None:
                        # Nobody here wants the topic: nothing to catch up,
                        # nothing to remember (377 B per topic ever served).
                        self._shown.pop(gone, None)
                        self._replayed.pop(gone, None)
                        self._fresh.pop(gone, None)
            if caught_up:
                self._catch_up(caught_up)
                caught_up = []
            if self.last_poll - flushed >= FLUSH_SECONDS:
                self.batch.flush()
                flushed = self.last_poll
            if replies:
                # A burst is read in turns: writers, pings and handlers run
                # between them (without this, 100,000 queued messages held the
                # event loop for seconds). gevent-patched: a switch.
                time.sleep(0)

    def _write_commands(self) -> None:
        """Send queued (UN)SUBSCRIBE commands in batches; leave routes that lingered out."""
        while not self._closed:
            self._wake.wait(EXPIRE_EVERY_SECONDS)
            self._wake.clear()
            with self._lock:
                self.routes.expire(time.monotonic())
                connection = self._connection
                subscribe, unsubscribe = self.routes.take_commands()
            if connection is None or not (subscribe or unsubscribe):
                continue
            try:
                if subscribe:
                    connection.subscribe(subscribe)
                if unsubscribe:
                    connection.subscribe(unsubscribe, "UNSUBSCRIBE")
            except (redis.RedisError, OSError) as exc:
                # The reader finds the broken connection too, and resubscribes
                # every wanted route on the next one.
                log.debug("message queue: could not send (UN)SUBSCRIBE (%s)", exc)

    def _handle_control(self, raw: bytes) -> None:
        """Handle a `tidings:socketio` message as python-socketio's PubSubManager does."""
        try:
            data = self.json.loads(raw)
        except ValueError:
            return  # python-socketio ignores what does not parse (a pickle, say)
        if not isinstance(data, dict) or "method" not in data:
            return
        try:
            method = data["method"]
            if method == "callback":
                self._handle_callback(data)
            elif data.get("host_id") != self.host_id:
                handler = {
                    "emit": self._handle_emit,
                    "disconnect": self._handle_disconnect,
                    "enter_room": self._handle_enter_room,
                    "leave_room": self._handle_leave_room,
                    "close_room": self._handle_close_room,
                }.get(method)
                if handler is not None:
                    handler(data)
        except Exception:
            log.exception("message queue: handling a %r message failed", data.get("method"))

    def _handle_emit(self, message: dict) -> None:
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
                message.get("room"),
                message.get("skip_sid"),
            )
        else:
            super()._handle_emit(message)

    def _catch_up(self, routes: Iterable[Route]) -> None:
        """Replay, per topic, what was forwarded while this worker was not subscribed."""
        wanted = []
        for route in routes:
            shown = self._shown.get(route.topic)
            if shown is not None and self._has_local(route.topic):
                wanted.append((route.topic, shown[1]))
        if not wanted:
            return
        recoveries = recover_many(self._history, wanted, history_size=self._history_size)
        for (topic, _), recovery in zip(wanted, recoveries, strict=True):
            name = room(topic)
            participants = list(self.get_participants("/", name))
            if not recovery.recovered:
                log.warning(
                    "topic=%s: history no longer covers the gap; resyncing its clients",
                    topic,
                    extra={"topic": topic},
                )
                for _, eio_sid in participants:
                    abort_connection(self.server.eio, eio_sid)
                for stream in list(self._streams.get(topic, {}).values()):
                    stream.close()  # it reconnects, resumes and is told `recovered: false`
                continue
            pubs = recovery.publications
            if not pubs:
                continue
            log.info(
                "topic=%s: replayed %d missed publications",
                topic,
                len(pubs),
                extra={"topic": topic},
            )
            outgoing = Outgoing(topic, publication_events(pubs))
            for stream in list(self._streams.get(topic, {}).values()):
                stream.deliver(outgoing)
            fresh = self._fresh.pop(topic, {})
            skip = [sid for sid in fresh if sid in dict(participants)]
            self._emit_here("publications", pubs, "/", name, skip)
            for sid in skip:
                newer = _newer_than(pubs, fresh[sid][0])
                if newer:
                    self._emit_here("publications", newer, "/", sid, None)
            metrics.QUEUE_REPLAYED.inc(len(pubs))
            size = len(json.dumps(pubs, separators=(",", ":")))
            metrics.sent(len(participants), size + metrics.PACKET_OVERHEAD)
            self.note_offset(topic, pubs[-1]["offset"])
            self._replayed[topic] = parse_offset(pubs[-1]["offset"])  # type: ignore[assignment]

    # -- state ---------------------------------------------------------------------

    def close(self) -> None:
        """End the loops (tests; a worker simply exits)."""
        self._closed = True
        self._wake.set()
        with self._lock:
            connection = self._connection
        if connection is not None:
            with contextlib.suppress(Exception):
                connection.close()

    def wait_subscribed(self, timeout: float) -> bool:
        """Wait until Redis confirmed this worker's `tidings:socketio`; False at the deadline."""
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

    def channels(self) -> int:
        """Return how many per-topic queue channels this worker is subscribed to."""
        with self._lock:
            return self.routes.count(LIVE)

    def client_name(self) -> str:
        """Return the CLIENT SETNAME of this worker's queue connection."""
        return client_name("web")
