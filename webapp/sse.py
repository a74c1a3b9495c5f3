"""Server-Sent Events: `GET /sse?topic=...`, with Socket.IO's permissions, limits and history.

A stream subscribes to every topic of its query at once. It takes the
interest routing's join path (the topic's queue channel is confirmed before
history is read; what arrives meanwhile is held and sent after the
recovery), and then receives the topics' publications from the queue
manager like a Socket.IO room member. Each publication is one event:

    id: 1:<position of each topic of the stream>
    event: publication
    data: {"topic": ..., "offset": ..., "data": ...}

The id holds the stream's position in every one of its topics (in the order
of the query), so the `Last-Event-ID` a reconnecting `EventSource` sends lets
the server resume all of them: a `recovered` event first says, per topic,
whether history covered the gap, then what was missed follows. A position is
the offset in base 36 (`<ms>.<seq>`), `0` for "saw the topic empty", or empty
for "unknown". A new stream opens with a `subscribed` event (each topic's
latest offset) that carries the first id, so that even a stream that drops
before its first publication resumes where it began.

Every TIDINGS_SSE_KEEPALIVE seconds (15) without anything to send, a comment
line keeps proxies from closing the stream. A stream whose client stops reading
is cut, as a websocket is, when its backlog passes TIDINGS_CLIENT_QUEUE_BYTES
or TIDINGS_CLIENT_QUEUE_PACKETS: the response ends, and `EventSource`
reconnects and resumes from its last event id. Bad input gets a 4xx with a
named error before the stream starts.

A message reaches a topic's streams from the queue manager's greenlet
(`Stream.deliver`). Its events, and each distinct id that follows them, are
built once for all the streams at the same positions (`Positions` are
interned, `Outgoing` keeps what each got). Once a response's headers are out,
a stream whose own greenlet waits for work gets its chunk at once, with one
non-blocking `send()` on the socket (as `webapp.fanout` does for
websockets): no switch to that greenlet, no pywsgi write. Anything else (the
rest of a partial send, a chunk for a stream still writing an earlier one)
is queued for the stream's greenlet, which writes the socket itself, in
order; nothing can overtake what is in flight. The connection's 8 KB read
buffer is swapped for a small one meanwhile: the client sends nothing more.

Internals relied on (gevent 26.9 pywsgi; check them on upgrade): the
`start_response` the app gets is a bound method of the connection's
`WSGIHandler`, which has `headers_sent`, `response_use_chunked`,
`response_length`, `socket`, `rfile` and `wsgi_input.rfile`, writes each
item of the body as one chunk and ends the body with `0\r\n\r\n` after the
iterator ends; gevent sockets keep the stdlib socket, non-blocking, as
`_sock`. Anything else (another server, a middleware's `start_response`,
TLS, HTTP/1.0) takes the server's own writes, as before.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar

import redis
from flask import Blueprint, Flask, Response, current_app, jsonify, request
from gevent.pywsgi import WSGIHandler
from gevent.socket import socket as gevent_socket

from tidings import metrics
from tidings.event_stream import ID_VERSION, read_event_id
from tidings.event_stream import position as encode_position
from tidings.history import BEGINNING, parse_offset, recover_many
from tidings.topics import is_valid_topic
from webapp.addresses import client_address
from webapp.backpressure import sever
from webapp.grants import Grant, InvalidToken, decode_token, grant_for
from webapp.realtime import SUBSCRIBED_WAIT_SECONDS, Connection

if TYPE_CHECKING:
    from webapp.queue import QueueManager

log = logging.getLogger("tidings.sse")

bp = Blueprint("sse", __name__)

# Topics one stream may carry, and the longest query string it may have.
MAX_TOPICS = 32
MAX_QUERY_BYTES = 4096
# How long `EventSource` waits before reconnecting after the stream ends (ms).
RETRY_MS = 1000
SID_PREFIX = "sse:"
# Bytes: the read buffer of a stream's connection once its response has
# started (its client sends nothing more; a next request still parses).
READ_BUFFER = 512
KEEPALIVE = b": keep-alive\n\n"
TOKEN_EXPIRED = b'event: token_expired\ndata: {"grace":0}\n\n'


def decode_positions(last_event_id: str, topics: int) -> list[str | None]:
    """Return the offsets an event id holds for each of `topics` topics; ValueError if malformed."""
    if len(last_event_id) > 64 * MAX_TOPICS:
        raise ValueError("not an id this server gave")
    return read_event_id(last_event_id, topics)


def publication_events(pubs: list[dict[str, Any]]) -> list[tuple[tuple[int, int], str, bytes]]:
    """Return each publication's offset (pair, id position) and its `event:`/`data:` lines, once."""
    events = []
    for pub in pubs:
        offset = pub.get("offset")
        pair = parse_offset(offset)
        if pair is None:
            continue
        data = json.dumps(pub, separators=(",", ":"), ensure_ascii=False)
        events.append(
            (pair, encode_position(offset), b"event: publication\ndata: " + data.encode() + b"\n\n")
        )
    return events


def chunk(data: bytes) -> bytes:
    """Return `data` as one chunk of a chunked HTTP/1.1 body (RFC 9112 7.1), as pywsgi frames it."""
    return b"%x\r\n%b\r\n" % (len(data), data)


class Positions:
    """A stream's position in each of its topics and the `id:` line that says so; never changed.

    Interned (`Positions.of`): streams of the same topics at the same positions
    hold the same object, so that a message's events, ids and chunk are built
    once for all of them (`Outgoing`), not once per stream.
    """

    __slots__ = ("__weakref__", "id_line", "pairs", "positions", "topics")

    _interned: ClassVar[weakref.WeakValueDictionary[tuple[Any, ...], Positions]] = (
        weakref.WeakValueDictionary()
    )

    def __init__(
        self,
        topics: tuple[str, ...],
        positions: tuple[str, ...],
        pairs: tuple[tuple[int, int] | None, ...],
    ) -> None:
        self.topics = topics
        # Per topic: as the id writes it, and the offset the stream is past (None: unknown).
        self.positions = positions
        self.pairs = pairs
        self.id_line = f"id: {ID_VERSION}:{','.join(positions)}\n".encode()

    @classmethod
    def of(
        cls,
        topics: tuple[str, ...],
        positions: tuple[str, ...],
        pairs: tuple[tuple[int, int] | None, ...],
    ) -> Positions:
        """Return the one `Positions` of these values."""
        key = (topics, positions, pairs)
        known = cls._interned.get(key)
        if known is None:
            known = cls._interned[key] = cls(topics, positions, pairs)
        return known

    @classmethod
    def start(cls, topics: tuple[str, ...]) -> Positions:
        """Return the positions of a stream that knows nothing of its topics yet."""
        return cls.of(topics, ("",) * len(topics), (None,) * len(topics))

    def moved(self, index: int, position: str, pair: tuple[int, int] | None) -> Positions:
        """Return these positions with topic `index` at `position` (and past `pair`, if known)."""
        positions = list(self.positions)
        positions[index] = position
        pairs = self.pairs
        if pair is not None:
            pairs = (*pairs[:index], pair, *pairs[index + 1 :])
        return Positions.of(self.topics, tuple(positions), pairs)

    def advance(
        self, topic: str, events: list[tuple[tuple[int, int], str, bytes]]
    ) -> tuple[Positions, bytes, int]:
        """Return the positions past the events newer than these, their text with ids, how many."""
        index = self.topics.index(topic)
        after = self.pairs[index]
        at = self
        parts = []
        for pair, position, text in events:
            if after is not None and pair <= after:
                continue  # the stream has it already (a recovery overlapped the live stream)
            after = pair
            at = at.moved(index, position, pair)
            parts.append(at.id_line + text)
        return at, b"".join(parts), len(parts)


# What a stream gets of a message: its next positions, its text, as a chunk, how many events.
Step = tuple[Positions, bytes, bytes, int]


class Outgoing:
    """A message for a topic's streams: what each distinct `Positions` gets, built once."""

    __slots__ = ("clock", "events", "now", "steps", "topic")

    def __init__(self, topic: str, events: list[tuple[tuple[int, int], str, bytes]]) -> None:
        self.topic = topic
        self.events = events
        self.steps: dict[Positions, Step] = {}
        self.now = time.time()  # tokens' expiry
        self.clock = time.monotonic()  # streams' idle time

    def step(self, at: Positions) -> Step:
        """Return what a stream at `at` gets (cached: every stream there gets the same bytes)."""
        step = self.steps.get(at)
        if step is None:
            after, text, count = at.advance(self.topic, self.events)
            step = self.steps[at] = (after, text, chunk(text) if count else b"", count)
        return step


class Wire:
    """A stream's socket, written directly once its response's headers are out."""

    __slots__ = ("handler", "raw", "sock")

    def __init__(self, handler: Any, sock: Any) -> None:
        self.handler = handler  # gevent pywsgi's WSGIHandler: its response length for the log
        self.sock = sock  # the gevent socket: blocking sends wait on it
        self.raw = sock._sock  # the stdlib socket under it, non-blocking

    def send(self, data: bytes) -> None:
        """Send all of `data` from the response's greenlet, waiting for the client if need be."""
        try:
            sent = self.raw.send(data)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            # gevent's sendall: waits for the socket (and asks its SO_SNDBUF each call).
            self.sock.sendall(memoryview(data)[sent:])
        self.handler.response_length += len(data)


def _nothing_buffered(rfile: Any, sock: Any) -> bool:
    """Tell whether `rfile` holds no bytes beyond the request, without blocking."""
    timeout = sock.gettimeout()
    sock.settimeout(0.0)
    try:
        # Buffered bytes come back as they are; with none, one non-blocking
        # recv() (b"" when nothing has arrived). Nothing is lost either way:
        # what peek() returns stays in the old reader, which is then kept.
        return not rfile.peek()
    except OSError:  # the peer went away already; the next write finds out
        return False
    finally:
        sock.settimeout(timeout)


def _small_reader(handler: Any) -> None:
    """Read the rest of the connection (the next request, if any) through a small buffer.

    pywsgi's reader holds 8 KB for the connection's life, and a stream's
    client sends nothing while it lasts (as `webapp.worker` does for
    upgraded websockets).
    """
    old, sock = handler.rfile, handler.socket
    if old is None or not _nothing_buffered(old, sock):
        return  # a pipelined request waits in it: keep it (correct, just larger)
    small = sock.makefile("rb", READ_BUFFER)
    handler.rfile = small
    if handler.wsgi_input is not None and handler.wsgi_input.rfile is old:
        handler.wsgi_input.rfile = small
    old.close()  # drops its reference to the socket, which stays open


class Stream:
    """One SSE response: its topics, its position in each, and what waits to be written.

    The queue manager's greenlet hands each message to every stream
    (`deliver`). While the response's own greenlet waits for work, the chunk
    goes out at once with one non-blocking `send()` from there (as
    `webapp.fanout` does for websockets): no switch to that greenlet, no
    pywsgi write. Otherwise, or for what the kernel did not take, it is
    queued for the response's greenlet, which sends queued bytes in order.
    """

    __slots__ = (
        "_bytes",
        "_events",
        "_max_bytes",
        "_max_packets",
        "_queue",
        "_wake",
        "_wire",
        "_writing",
        "at",
        "closed",
        "cut",
        "grant",
        "handler",
        "sent_at",
        "sid",
        "topics",
    )

    def __init__(self, sid: str, topics: list[str], grant: Grant, *, bounds: tuple[int, int]):
        self.sid = sid
        self.topics = topics
        self.grant = grant
        self.at = Positions.start(tuple(topics))
        self._max_packets, self._max_bytes = bounds
        # Bytes for the response's greenlet: event text until the headers are
        # out, then what goes on the wire as it is (chunks, a chunk's rest).
        self._queue: deque[bytes | memoryview] = deque()
        self._events = 0  # events queued, for the TIDINGS_CLIENT_QUEUE_PACKETS bound
        self._bytes = 0
        self._wake = threading.Event()
        # True while the response's greenlet writes an earlier chunk (maybe
        # blocked on a client that does not read): only then is what queues
        # up a backlog. While it waits for work, a whole burst queued in one
        # turn goes out on its next run.
        self._writing = False
        # gevent pywsgi's handler of the response, until the stream takes its socket.
        self.handler: Any = None
        self._wire: Wire | None = None
        self.sent_at = time.monotonic()  # when bytes last went out (keep-alive)
        self.closed = False
        self.cut = False

    def move(self, topic: str, offset: str | None) -> None:
        """Set the stream's position in `topic` (no event)."""
        index = self.topics.index(topic)
        self.at = self.at.moved(index, encode_position(offset), parse_offset(offset))

    def offset(self, topic: str) -> str | None:
        """Return the offset the stream is at in `topic`; None if it saw the topic empty."""
        pair = self.at.pairs[self.topics.index(topic)]
        return None if pair is None or pair == (0, 0) else f"{pair[0]}-{pair[1]}"

    def event_id(self) -> bytes:
        """Return the `id:` line of the stream's current positions."""
        return self.at.id_line

    def send(self, topic: str, events: list[tuple[tuple[int, int], str, bytes]]) -> int:
        """Queue the events newer than the stream's position in `topic`; return how many."""
        return self.deliver(Outgoing(topic, events))

    def deliver(self, outgoing: Outgoing) -> int:
        """Send or queue what the stream has not had of a message; return how many events."""
        at = self.at
        step = outgoing.steps.get(at) or outgoing.step(at)
        if not step[3] or self.closed:
            return 0
        self.at = step[0]
        wire = self._wire
        if wire is not None and not self._writing and not self._queue:
            expires = self.grant.expires_at
            if expires is None or expires > outgoing.now:
                # Nothing in flight: the chunk cannot overtake anything.
                self._send_now(wire, step[2], step[3], outgoing.clock)
                return step[3]
            # Expired: the response's greenlet sends it, then `token_expired`.
        self.write(step[1], step[2], step[3])
        return step[3]

    def _send_now(self, wire: Wire, data: bytes, events: int, clock: float) -> None:
        try:
            sent = wire.raw.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:  # the client is gone: end the response
            log.debug("sid=%s: stream send failed (%s); closing it", self.sid, exc)
            self.close()
            return
        wire.handler.response_length += sent
        if sent:
            self.sent_at = clock
        if sent < len(data):
            # The rest for the response's greenlet, which waits for the client.
            rest = memoryview(data)[sent:]
            self._queue.append(rest)
            self._events += events
            self._bytes += len(rest)
            self._wake.set()

    def write(self, text: bytes, chunked: bytes | None = None, events: int = 1) -> None:
        """Queue `events` events' text for the client; a backlog over the bounds cuts the stream."""
        if self.closed:
            return
        over = (
            self._events + events > self._max_packets or self._bytes + len(text) > self._max_bytes
        )
        if self._writing and self._queue and over:
            metrics.slow_client_cut()
            self.cut = True
            self.close()
            # As for a websocket: what is queued here is dropped, what the
            # kernel holds goes out before the FIN, and a client that does
            # not read it within the drain time gets a reset. Without this
            # the response's greenlet would wait on the client for good.
            unsent = sever(self._wire.raw, self.sid) if self._wire is not None else None
            log.warning(
                "slow client cut: sid=%s had %d events / %d bytes queued (limits %d / %d),"
                " %s bytes more in the kernel",
                self.sid,
                self._events,
                self._bytes,
                self._max_packets,
                self._max_bytes,
                "?" if unsent is None else unsent,
            )
            return
        if self._wire is not None:
            self._queue.append(chunked or chunk(text))
        else:
            self._queue.append(text)
        self._events += events
        self._bytes += len(text)
        self._wake.set()

    def take(self, timeout: float) -> bytes | None:
        """Return everything queued, waiting up to `timeout` for something; None if nothing came."""
        self._writing = False
        if not self._queue and not self.closed:
            self._wake.wait(timeout)
        self._wake.clear()
        if not self._queue:
            return None
        data = b"".join(self._queue)
        self._queue.clear()
        self._events = self._bytes = 0
        self._writing = True  # until the caller asks again: it is writing this
        return data

    def writing(self) -> None:
        """Say that the response's greenlet writes something of its own (keep-alive, end)."""
        self._writing = True

    def frame(self, text: bytes) -> bytes:
        """Return `text` as the response's greenlet sends it: a chunk once it writes the socket."""
        return text if self._wire is None else chunk(text)

    def take_socket(self) -> Wire | None:
        """Write the socket directly from here on, if the server allows (once the headers are out).

        Only gevent pywsgi's chunked responses on a plain TCP socket: under
        TLS the wire is not the socket's bytes, and without chunking the
        framing is another.
        """
        handler, self.handler = self.handler, None
        if handler is None or not handler.headers_sent or self.closed:
            return None
        with contextlib.suppress(OSError, AttributeError, ValueError):
            _small_reader(handler)
        if not handler.response_use_chunked or type(handler.socket) is not gevent_socket:
            return None
        self._wire = Wire(handler, handler.socket)
        if self._queue:  # queued meanwhile, as text: one chunk
            data = b"".join(self._queue)
            self._queue.clear()
            self._queue.append(chunk(data))
        return self._wire

    def close(self) -> None:
        """End the stream: the response finishes after what is already queued."""
        self.closed = True
        self._wake.set()

    def release(self) -> None:
        """Let go of the server's handler and socket (the response has ended)."""
        self.handler = self._wire = None


def _error(status: int, error: str, detail: str) -> tuple[Response, int]:
    return jsonify({"error": error, "detail": detail}), status


def _token() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.args.get("token") or None


@bp.get("/sse")
def sse() -> Any:
    """Open an event stream of the query's topics, resuming from `Last-Event-ID`."""
    app: Flask = current_app._get_current_object()  # type: ignore[attr-defined]  # outlives the request
    settings = app.extensions["tidings.settings"]
    if len(request.query_string) > MAX_QUERY_BYTES:
        return _error(414, "query_too_long", f"at most {MAX_QUERY_BYTES} bytes of query string")
    topics = list(dict.fromkeys(request.args.getlist("topic")))
    if not topics:
        return _error(400, "no_topic", "name at least one topic: /sse?topic=<topic>")
    if len(topics) > min(MAX_TOPICS, settings.max_subscriptions):
        limit = min(MAX_TOPICS, settings.max_subscriptions)
        return _error(400, "too_many_topics", f"at most {limit} topics per stream")
    bad = [t for t in topics if not is_valid_topic(t)]
    if bad:
        return _error(400, "invalid_topic", f"not a topic: {bad[0][:140]!r}")
    grant = Grant()
    token = _token()
    if token is not None:
        try:
            grant = grant_for(decode_token(token, settings))
        except InvalidToken as exc:
            log.info("refused a stream: invalid token (%s)", exc)
            return _error(401, "invalid_token", str(exc))
    forbidden = [t for t in topics if not grant.allows(t, settings.public_topics)]
    if forbidden:
        log.info("forbidden: sub=%s topic=%s (sse)", grant.sub, forbidden[0])
        return _error(403, "forbidden", f"not allowed: {forbidden[0]}")
    resume = request.headers.get("Last-Event-ID") or request.args.get("lastEventId")
    positions: list[str | None] = [None] * len(topics)
    if resume:
        try:
            positions = decode_positions(resume, len(topics))
        except ValueError as exc:
            return _error(400, "bad_last_event_id", str(exc))
    return _open(app, topics, grant, positions, resumed=bool(resume))


def _open(
    app: Flask, topics: list[str], grant: Grant, positions: list[str | None], *, resumed: bool
) -> Any:
    settings = app.extensions["tidings.settings"]
    connections = app.extensions["tidings.connections"]
    presence = app.extensions["tidings.presence"]
    manager: QueueManager | None = app.extensions["tidings.queue"]
    if manager is None:
        return _error(503, "unavailable", "this worker has no message queue")
    ip = client_address(request.environ, settings)
    if connections.per_ip[ip] >= settings.max_connections_per_ip:
        log.warning("refused a stream: %s has %d connections already", ip, connections.per_ip[ip])
        metrics.limit_hit("connections_per_ip")
        return _error(429, "limit", "too many connections from this address")
    sid = SID_PREFIX + os.urandom(9).hex()
    try:
        presence.admit(sid, grant)  # revocations, the per-user cap
    except Exception as exc:  # python-socketio's ConnectionRefusedError, with a reason
        reason = str(getattr(exc, "error_args", {}).get("message", "") or exc) or "refused"
        status = {"invalid_token": 401, "limit": 429}.get(reason, 503)
        return _error(status, reason, "refused")
    stream = Stream(
        sid, topics, grant, bounds=(settings.client_queue_packets, settings.client_queue_bytes)
    )
    connections.by_sid[sid] = Connection(grant, ip, allowance=float(settings.subscribe_rate))
    connections.per_ip[ip] += 1
    streams = app.extensions["tidings.sse"]
    streams[sid] = stream
    try:
        opened = _join(app, manager, stream, positions, resumed=resumed)
    except BaseException:
        _closed(app, stream)
        raise
    if opened is not None:
        _closed(app, stream)
        return opened
    for topic in topics:
        grant.topics[topic] = None
        presence.subscribed(sid, topic)
        metrics.subscription_changed(topic, 1)
    log.debug("sid=%s: stream of %s from %s", sid, ", ".join(topics), ip)
    return EventStreamResponse(
        app,
        stream,
        _events(app, stream, float(settings.sse_keepalive)),
        mimetype="text/event-stream",
        headers={
            "Cache-Control": "no-cache",
            # nginx: pass each event on at once (also `proxy_buffering off`).
            "X-Accel-Buffering": "no",
        },
        direct_passthrough=True,
    )


def _join(
    app: Flask,
    manager: QueueManager,
    stream: Stream,
    positions: list[str | None],
    *,
    resumed: bool,
) -> Any:
    """Subscribe the stream to its topics and queue its first events; an error response, or None."""
    settings = app.extensions["tidings.settings"]
    topics = stream.topics
    joins = [manager.begin_join(stream.sid, topic) for topic in topics]
    deadline = time.monotonic() + SUBSCRIBED_WAIT_SECONDS
    for join in joins:
        if not join.route.live.wait(max(0.0, deadline - time.monotonic())):
            for each in joins:
                manager.cancel_join(each)
            log.warning("stream %s: this worker is not subscribed to the queue", stream.sid)
            return _error(503, "unavailable", "the message queue is not reachable; retry")
    generation = manager.generation
    try:
        recoveries = recover_many(
            app.extensions["tidings.redis"],
            list(zip(topics, positions, strict=True)),
            history_size=settings.history_size,
        )
    except redis.RedisError as exc:
        for join in joins:
            manager.cancel_join(join)
        log.warning("stream %s: Redis unavailable (%s)", stream.sid, exc)
        return _error(503, "unavailable", "Redis is not reachable; retry")
    if generation != manager.generation:
        for join in joins:
            manager.cancel_join(join)
        return _error(503, "unavailable", "the message queue reconnected; retry")
    stream.write(f"retry: {RETRY_MS}\n: tidings\n\n".encode())
    recovered: dict[str, bool] = {}
    replay: list[tuple[str, list[dict[str, Any]]]] = []
    for topic, since, recovery in zip(topics, positions, recoveries, strict=True):
        if resumed and since is not None and recovery.recovered:
            stream.move(topic, since)
            replay.append((topic, recovery.publications))
            recovered[topic] = True
        else:
            if resumed:
                recovered[topic] = False  # a gap: the client resyncs this topic
            stream.move(topic, recovery.offset or BEGINNING)
    if resumed:
        stream.write(
            stream.event_id()
            + b"event: recovered\ndata: "
            + json.dumps({"recovered": all(recovered.values()), "topics": recovered}).encode()
            + b"\n\n"
        )
    else:
        # An event with data, so that every EventSource keeps its id (the
        # "eventsource" package ignores an id-only event): a stream that
        # drops before its first publication still resumes where it began.
        offsets = {topic: stream.offset(topic) for topic in topics}
        stream.write(
            stream.event_id()
            + b"event: subscribed\ndata: "
            + json.dumps({"topics": offsets}).encode()
            + b"\n\n"
        )
    for topic, publications in replay:
        stream.send(topic, publication_events(publications))
    manager.attach_stream(stream, joins)
    return None


class EventStreamResponse(Response):
    """A stream's response: tells the stream which gevent pywsgi handler serves it."""

    def __init__(self, app: Flask, stream: Stream, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.app = app
        self.stream = stream

    def close(self) -> None:
        """Close the body; a stream whose body never ran (a HEAD request's) is forgotten here."""
        super().close()
        # Closing a generator that never started skips its `finally`: the
        # stream would stay subscribed, counted and queueing for good.
        _closed(self.app, self.stream)

    def __call__(self, environ: Any, start_response: Any) -> Any:
        """Start the response; the server's handler is the one whose `start_response` this is."""
        handler = getattr(start_response, "__self__", None)
        if isinstance(handler, WSGIHandler):  # not behind a middleware's start_response
            self.stream.handler = handler
        return super().__call__(environ, start_response)


def _events(app: Flask, stream: Stream, keepalive: float) -> Iterator[bytes]:
    """The response body: queued events as they come, a comment when idle (keep-alive).

    The server writes the first chunk (with the headers); from then on the
    stream writes its socket itself when it can (`Stream.take_socket`). One
    generator, no nested one: a parked stream's saved C stack stays small.
    """
    try:
        wire: Wire | None = None
        wait = keepalive
        while True:
            sent_at = stream.sent_at
            chunk = stream.take(wait)
            wait = keepalive
            if chunk is None and not stream.closed and not _expired(stream):
                if stream.sent_at != sent_at:
                    # Events went out directly meanwhile: idle only since the last.
                    remaining = keepalive - (time.monotonic() - stream.sent_at)
                    if remaining > 0:
                        wait = remaining
                        continue
                stream.writing()
                chunk = stream.frame(KEEPALIVE)
            if chunk is not None:
                if wire is None:
                    yield chunk
                    wire = stream.take_socket()
                elif stream.cut:
                    return  # dropped: the socket is severed
                else:
                    try:
                        wire.send(chunk)
                    except OSError:  # the client went, or the stream was cut meanwhile
                        return
                stream.sent_at = time.monotonic()
            if stream.closed:
                return
            if _expired(stream):
                stream.writing()
                if wire is None:
                    yield TOKEN_EXPIRED
                else:
                    with contextlib.suppress(OSError):  # the client went meanwhile
                        wire.send(stream.frame(TOKEN_EXPIRED))
                return
    finally:
        stream.release()
        _closed(app, stream)


def _expired(stream: Stream) -> bool:
    expires = stream.grant.expires_at
    return expires is not None and expires <= time.time()


def _closed(app: Flask, stream: Stream) -> None:
    """Forget a stream everywhere (its client went, it was cut, or it never opened)."""
    streams = app.extensions["tidings.sse"]
    if streams.pop(stream.sid, None) is None:
        return
    stream.close()
    manager: QueueManager | None = app.extensions["tidings.queue"]
    if manager is not None:
        manager.detach_stream(stream)
    app.extensions["tidings.connections"].forget(stream.sid)
    app.extensions["tidings.presence"].disconnected(stream.sid)


def close_stream(app: Flask, sid: str) -> bool:
    """End a stream (operator disconnect, revocation); False if `sid` is no stream here."""
    stream = app.extensions["tidings.sse"].get(sid)
    if stream is None:
        return False
    stream.close()
    return True


def drop_topic(app: Flask, sid: str, topic: str) -> bool:
    """Stop sending a topic on a stream (operator unsubscribe); tell the client."""
    stream = app.extensions["tidings.sse"].get(sid)
    manager = app.extensions["tidings.queue"]
    if stream is None or topic not in stream.topics or manager is None:
        return False
    manager.detach_stream(stream, topics=[topic])
    connection = app.extensions["tidings.connections"].by_sid.get(sid)
    if connection is not None and connection.grant.topics.pop(topic, False) is not False:
        metrics.subscription_changed(topic, -1)
    app.extensions["tidings.presence"].unsubscribed(sid, topic)
    stream.write(b"event: unsubscribed\ndata: " + json.dumps({"topic": topic}).encode() + b"\n\n")
    return True


def init_app(app: Flask) -> None:
    """Register GET /sse and the registry of this worker's streams."""
    app.extensions["tidings.sse"] = {}
    app.register_blueprint(bp)
