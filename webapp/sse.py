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
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import redis
from flask import Blueprint, Flask, Response, current_app, jsonify, request

from tidings import metrics
from tidings.history import BEGINNING, parse_offset, recover_many
from tidings.topics import is_valid_topic
from webapp.addresses import client_address
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
ID_VERSION = "1"
SID_PREFIX = "sse:"


def encode_position(offset: str | None) -> str:
    """Return one topic's position as it goes into an event id."""
    pair = parse_offset(offset)
    if pair is None:
        return ""
    if pair == (0, 0):
        return "0"
    return f"{_base36(pair[0])}.{_base36(pair[1])}"


def decode_positions(last_event_id: str, topics: int) -> list[str | None]:
    """Return the offsets an event id holds for each of `topics` topics; ValueError if malformed."""
    version, colon, body = last_event_id.partition(":")
    if version != ID_VERSION or not colon or len(last_event_id) > 64 * MAX_TOPICS:
        raise ValueError("not an id this server gave")
    parts = body.split(",")
    if len(parts) != topics:
        raise ValueError(f"the id holds {len(parts)} positions for {topics} topics")
    positions: list[str | None] = []
    for part in parts:
        if part == "":
            positions.append(None)
        elif part == "0":
            positions.append(BEGINNING)
        else:
            ms, dot, seq = part.partition(".")
            if not dot:
                raise ValueError(f"bad position {part!r}")
            positions.append(f"{int(ms, 36)}-{int(seq, 36)}")  # ValueError if not base 36
    return positions


def _base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        number, rest = divmod(number, 36)
        out = digits[rest] + out
        if not number:
            return out


def publication_events(pubs: list[dict[str, Any]]) -> list[tuple[tuple[int, int], str, bytes]]:
    """Return each publication's offset (pair, text) and its `event:`/`data:` lines, built once."""
    events = []
    for pub in pubs:
        offset = pub.get("offset")
        pair = parse_offset(offset)
        if pair is None:
            continue
        data = json.dumps(pub, separators=(",", ":"), ensure_ascii=False)
        events.append((pair, offset, b"event: publication\ndata: " + data.encode() + b"\n\n"))
    return events


class Stream:
    """One SSE response: its topics, its position in each, and what waits to be written."""

    def __init__(self, sid: str, topics: list[str], grant: Grant, *, bounds: tuple[int, int]):
        self.sid = sid
        self.topics = topics
        self.grant = grant
        self.positions = {topic: "" for topic in topics}
        self._pairs: dict[str, tuple[int, int]] = {}
        self._max_packets, self._max_bytes = bounds
        self._queue: deque[bytes] = deque()
        self._bytes = 0
        self._wake = threading.Event()
        # True while the response's greenlet writes an earlier chunk (maybe
        # blocked on a client that does not read): only then is what queues
        # up a backlog. While it waits for work, a whole burst queued in one
        # turn goes out on its next run.
        self._writing = False
        self.closed = False
        self.cut = False

    def move(self, topic: str, offset: str | None) -> None:
        """Set the stream's position in `topic` (no event)."""
        self.positions[topic] = encode_position(offset)
        pair = parse_offset(offset)
        if pair is not None:
            self._pairs[topic] = pair

    def offset(self, topic: str) -> str | None:
        """Return the offset the stream is at in `topic`; None if it saw the topic empty."""
        pair = self._pairs.get(topic)
        return None if pair is None or pair == (0, 0) else f"{pair[0]}-{pair[1]}"

    def event_id(self) -> bytes:
        """Return the `id:` line of the stream's current positions."""
        body = ",".join(self.positions[topic] for topic in self.topics)
        return f"id: {ID_VERSION}:{body}\n".encode()

    def send(self, topic: str, events: list[tuple[tuple[int, int], str, bytes]]) -> int:
        """Queue the events newer than the stream's position in `topic`; return how many."""
        after = self._pairs.get(topic)
        sent = 0
        for pair, offset, text in events:
            if after is not None and pair <= after:
                continue  # the stream has it already (a recovery overlapped the live stream)
            after = pair
            self.positions[topic] = encode_position(offset)
            self.write(self.event_id() + text)
            sent += 1
        if after is not None:
            self._pairs[topic] = after
        return sent

    def write(self, chunk: bytes) -> None:
        """Queue bytes for the client; a backlog over the bounds cuts the stream."""
        if self.closed:
            return
        over = len(self._queue) >= self._max_packets or self._bytes + len(chunk) > self._max_bytes
        if self._writing and self._queue and over:
            log.warning(
                "slow client cut: sid=%s had %d events / %d bytes queued (limits %d / %d)",
                self.sid,
                len(self._queue),
                self._bytes,
                self._max_packets,
                self._max_bytes,
            )
            metrics.slow_client_cut()
            self.cut = True
            self.close()
            return
        self._queue.append(chunk)
        self._bytes += len(chunk)
        self._wake.set()

    def take(self, timeout: float) -> bytes | None:
        """Return everything queued, waiting up to `timeout` for something; None if nothing came."""
        self._writing = False
        if not self._queue and not self.closed:
            self._wake.wait(timeout)
        self._wake.clear()
        if not self._queue:
            return None
        chunk = b"".join(self._queue)
        self._queue.clear()
        self._bytes = 0
        self._writing = True  # until the caller asks again: it is writing this
        return chunk

    def close(self) -> None:
        """End the stream: the response finishes after what is already queued."""
        self.closed = True
        self._wake.set()


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
    return Response(
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


def _events(app: Flask, stream: Stream, keepalive: float) -> Iterator[bytes]:
    """The response body: queued events as they come, a comment when idle (keep-alive)."""
    try:
        while True:
            chunk = stream.take(keepalive)
            if chunk is not None:
                yield chunk
            if stream.closed:
                return
            expires = stream.grant.expires_at
            if expires is not None and expires <= time.time():
                yield b'event: token_expired\ndata: {"grace":0}\n\n'
                return
            if chunk is None:
                yield b": keep-alive\n\n"
    finally:
        _closed(app, stream)


def _closed(app: Flask, stream: Stream) -> None:
    """Forget a stream everywhere (its client went, it was cut, or it never opened)."""
    streams = app.extensions["tidings.sse"]
    if streams.pop(stream.sid, None) is None:
        return
    stream.close()
    manager: QueueManager | None = app.extensions["tidings.queue"]
    if manager is not None:
        manager.detach_stream(stream)
    connections = app.extensions["tidings.connections"]
    connection = connections.by_sid.pop(stream.sid, None)
    app.extensions["tidings.presence"].disconnected(stream.sid)
    if connection is not None:
        for topic in connection.grant.topics:
            metrics.subscription_changed(topic, -1)
        connections.per_ip[connection.ip] -= 1
        if connections.per_ip[connection.ip] <= 0:
            del connections.per_ip[connection.ip]


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
    if stream is None or topic not in stream.positions or manager is None:
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
