"""Engine.IO over websockets with no greenlet per connection (issue 16).

python-engineio serves a websocket with two greenlets for its whole life
(`Socket._websocket_handler` reads in the request's greenlet, gevent-websocket's
handler, and starts a writer parked on the connection's queue): together
about 20 KB of an idle connection's 39 (bench/PROFILE.md). Here engine.io
keeps its `Socket` (session, handshake, packets, long-polling), and once a
websocket is upgraded the worker's handler (`webapp.worker`) hands its
socket over and returns to gevent's server: an `EngineWebSocket` then reads
it from a hub watcher, parses frames incrementally (`webapp.frames`) and
writes without a greenlet (`webapp.transport`).

- Inbound: a PONG and a Socket.IO event go to engine.io from the hub
  callback itself (python-socketio starts its own greenlet for the event's
  handler, as before); anything that may block (a Socket.IO connect runs
  Tidings' `connect` handler, which may ask Redis; a disconnect; an ack; a
  binary message) goes, in arrival order, to a greenlet that lives only
  while such messages wait. Websocket pings are answered, close frames
  answered and honoured, and a message over `max_http_buffer_size`
  (TIDINGS_MAX_MESSAGE_BYTES) is refused from its frame header.
- Outbound: the engine.io socket's `queue` becomes the `EngineWebSocket`:
  `Socket.send` puts a packet, which is framed and sent now, or behind the
  backlog (bounded; `webapp.backpressure`). `webapp.fanout` writes a frame
  built once per emit through the same path, so order holds per connection.
- Upgrades from long-polling: the probe (`2probe` -> `3probe`, a NOOP to
  end the pending poll, then `5`) is answered as engine.io does, and what
  was queued for polling goes out first when the upgrade completes.
- The WSGI environ that python-socketio keeps per connection is cut to
  `ENVIRON_KEYS` once the websocket is handed over.

Internals relied on (python-engineio 4.15, python-socketio 5.18; check them
on upgrade): `Socket._websocket_handler(ws)` is where engine.io serves a
websocket, `ws._sock.handler` is gevent-websocket's handler; `Socket.queue`
is used through `put` (None: closed), `join` and, for polling only, `get`;
`Socket.connected`, `upgrading`, `upgraded`, `closed`, `receive`, `close`;
`Server.sockets`; python-socketio's `Server.environ` and `async_handlers`.
"""

from __future__ import annotations

import _socket
import logging
import sys
from collections import deque
from typing import Any

import engineio.socket
from engineio import exceptions, packet

from tidings import metrics
from webapp.frames import (
    BINARY,
    CLOSE,
    NORMAL,
    PING,
    PONG,
    PROTOCOL_ERROR,
    TEXT,
    TOO_BIG,
    FrameReader,
    ProtocolError,
    close_frame,
    encode_frame,
)
from webapp.transport import OPEN, Bounded, Transport

log = logging.getLogger("tidings.websockets")

# The WSGI environ keys kept per connection once its websocket is handed over
# (python-socketio passes the environ to `connect`, and `get_environ` returns
# it): who the client is and what it asked for, enough to rebuild a Flask
# request context; not the headers, the socket objects, the input stream.
ENVIRON_KEYS = (
    "REMOTE_ADDR",
    "REMOTE_PORT",
    "HTTP_X_FORWARDED_FOR",
    "HTTP_HOST",
    "HTTP_ORIGIN",
    "REQUEST_METHOD",
    "SCRIPT_NAME",
    "PATH_INFO",
    "QUERY_STRING",
    "SERVER_NAME",
    "SERVER_PORT",
    "SERVER_PROTOCOL",
    "wsgi.url_scheme",
    "flask.app",
)
# Of those, the ones whose values repeat from connection to connection: each
# connection's copy of them is swapped for one shared string (`sys.intern`).
_SHARED_VALUES = frozenset(ENVIRON_KEYS) - {"REMOTE_PORT", "QUERY_STRING"}

# Stages of a connection: an upgrade from polling waits for the probe, then
# for the UPGRADE packet; LIVE serves engine.io packets.
PROBE, UPGRADE, LIVE = 0, 1, 2
# In the inbox: the transport ended (after whatever arrived before it).
_GONE = object()
_PROBE_ANSWER = encode_frame(b"3probe")

_engineio_handler = engineio.socket.Socket._websocket_handler
_installed = False


def is_reply(pkt: Any) -> bool:
    """Tell a Socket.IO ack (type 3: a `subscribe` answer, with its recovery) from the rest."""
    data = getattr(pkt, "data", None)
    return getattr(pkt, "packet_type", None) == packet.MESSAGE and (
        isinstance(data, str) and data[:1] == "3"
    )


def _frame(pkt: packet.Packet) -> bytes:
    """Return an engine.io packet as one websocket frame: text, or binary for bytes."""
    encoded = pkt.encode()
    if isinstance(encoded, str):
        return encode_frame(encoded.encode())
    return encode_frame(encoded, BINARY)


class Layer:
    """What the websockets of one engine.io server share."""

    def __init__(self, server: Any, bounds: Bounded | None, on_cut: Any) -> None:
        self.eio = server.eio
        # python-socketio's environ per engine.io sid.
        self.environs: dict[str, Any] = server.environ
        self.bounds = bounds
        # on_cut(engine.io socket, packets, bytes): a backlog passed its bounds.
        self.on_cut = on_cut
        self.limit: int = server.eio.max_http_buffer_size
        # Socket.IO events may be handed over from the hub only when
        # python-socketio runs their handlers in greenlets of their own.
        self.inline_events: bool = server.async_handlers

    def slim_environ(self, eio_sid: str) -> None:
        """Keep only `ENVIRON_KEYS` of a connection's environ, repeated values shared."""
        environ = self.environs.get(eio_sid)
        if environ is not None:
            slim = {}
            for key in ENVIRON_KEYS:
                if key in environ:
                    value = environ[key]
                    if type(value) is str and key in _SHARED_VALUES:
                        value = sys.intern(value)
                    slim[key] = value
            self.environs[eio_sid] = slim


class EngineWebSocket(Transport):
    """An engine.io connection's websocket: its reader, its writer, its `Socket.queue`."""

    __slots__ = ("eio", "frames", "inbox", "layer", "stage")

    def __init__(
        self, layer: Layer, eio: engineio.socket.Socket, sock: _socket.socket, pool: Any
    ) -> None:
        super().__init__(sock, layer.bounds, pool)
        self.layer = layer
        self.eio = eio
        self.frames = FrameReader(layer.limit)
        # Messages that wait for the dispatching greenlet; None when none runs.
        self.inbox: deque[Any] | None = None
        if eio.connected:  # connected by long-polling: this is an upgrade
            eio.upgrading = True  # polls answer NOOP meanwhile
            self.stage = PROBE
        else:
            eio.connected = True
            eio.upgraded = True
            self.stage = LIVE

    def start(self, answer: bytes, early: bytes) -> None:
        """Serve the connection: `answer` is the 101 not yet sent, `early` bytes already read."""
        self.layer.slim_environ(self.eio.sid)
        if self.stage == LIVE:
            self._adopt(answer)  # the 101 and the OPEN packet in one send()
        elif answer:
            self.write(answer, bounded=False)  # the client waits for it to probe
        if early:
            self.received(memoryview(early))
        self.start_reading()

    # -- engine.io's queue -----------------------------------------------------------------

    def put(self, pkt: packet.Packet | None, *_: Any) -> None:
        """Send an engine.io packet (None: the socket closed, so close the websocket)."""
        if pkt is None:
            self.close_websocket(NORMAL)
            return
        # Only messages are bounded, as engine.io's queue was: never a PING or a CLOSE.
        self.write(_frame(pkt), reply=is_reply(pkt), bounded=pkt.packet_type == packet.MESSAGE)

    def join(self) -> None:
        """Return at once: a packet is framed and written (or backlogged) when put."""

    def task_done(self) -> None:
        """Nothing to count: nobody polls an upgraded socket."""

    def qsize(self) -> int:
        """Return how many frames wait for the kernel."""
        return self.backlogged

    def empty(self) -> bool:
        """Tell whether nothing waits for the kernel."""
        return not self.backlogged

    def get(self, *_: Any, **__: Any) -> Any:
        """Refuse: engine.io never polls an upgraded socket."""
        raise self.eio.server.get_queue_empty_exception()

    def _adopt(self, answer: bytes = b"") -> None:
        """Become the socket's queue; send `answer`, then what engine.io had queued."""
        eio = self.eio
        queue, eio.queue = eio.queue, self
        chunks = [answer] if answer else []
        closed = False
        empty = eio.server.get_queue_empty_exception()
        while True:
            try:
                item = queue.get(block=False)
            except empty:
                break
            queue.task_done()  # a close(wait=True) waiting in join() goes on
            if item is None:
                closed = True
                break
            chunks.append(_frame(item))
        if chunks:
            # One send() for all of it; nothing is queued before, so no bound applies.
            self.write(b"".join(chunks), bounded=False)
        if closed:
            self.put(None)

    # -- inbound ---------------------------------------------------------------------------

    def received(self, data: memoryview) -> None:
        """Parse frames; hand whole messages to engine.io; answer pings and closes."""
        try:
            events = self.frames.feed(data)
        except ProtocolError as exc:
            if exc.code == TOO_BIG:
                metrics.limit_hit("message_size")
            log.info("sid=%s: websocket closed: %s", self.eio.sid, exc)
            self.stop_reading()
            self.close_websocket(exc.code, exc.reason)
            return
        for opcode, payload in events:
            if opcode in (TEXT, BINARY):
                self._message(payload)
            elif opcode == PING:
                self.write(encode_frame(payload, PONG), bounded=False)  # type: ignore[arg-type]
            elif opcode == CLOSE:
                # The close handshake: answer with the status, then close (RFC 6455 5.5.1).
                code = payload if payload != 1005 else NORMAL
                self.close_websocket(code)  # type: ignore[arg-type]
            if self.state != OPEN:
                return

    def _message(self, payload: str | bytes) -> None:
        if self.stage != LIVE:
            self._upgrade_step(payload)
        elif (
            self.inbox is None
            and type(payload) is str
            and (payload == "3" or (payload[:2] == "42" and self.layer.inline_events))
        ):
            # A PONG, or an event python-socketio hands to a greenlet of its
            # own: neither blocks, so the hub does it (no greenlet per message).
            self._receive(payload)
        else:
            self._enqueue(payload)

    def _enqueue(self, item: Any) -> None:
        """Have the dispatching greenlet handle `item` after everything before it."""
        inbox = self.inbox
        if inbox is None:
            inbox = self.inbox = deque()
            self.eio.server.start_background_task(self._dispatch)
        inbox.append(item)

    def _dispatch(self) -> None:
        """Handle the inbox in order, then end (a new one starts for the next message)."""
        inbox = self.inbox
        assert inbox is not None
        while inbox:
            item = inbox.popleft()
            if item is _GONE:
                self._gone()
            else:
                self._receive(item)
        self.inbox = None

    def _receive(self, payload: str | bytes) -> None:
        """Decode one engine.io packet and give it to the socket, as engine.io's reader does."""
        eio = self.eio
        try:
            pkt = packet.Packet(encoded_packet=payload)
        except Exception:
            log.info("sid=%s: undecodable engine.io packet %.40r; closing", eio.sid, payload)
            self.close_websocket(PROTOCOL_ERROR)
            return
        try:
            eio.receive(pkt)
        except exceptions.UnknownPacketError:
            pass
        except exceptions.SocketIsClosedError:
            self.close_websocket(NORMAL)
        except Exception:
            log.exception("sid=%s: receive error; closing the connection", eio.sid)
            self.close_websocket(NORMAL)

    def _upgrade_step(self, payload: str | bytes) -> None:
        """Answer the upgrade's probe, then complete it on UPGRADE (engine.io's protocol)."""
        eio = self.eio
        try:
            pkt = packet.Packet(encoded_packet=payload)
        except Exception:
            pkt = None
        if self.stage == PROBE:
            if pkt is None or pkt.packet_type != packet.PING or pkt.data != "probe":
                log.info("sid=%s: failed websocket upgrade, no PING probe", eio.sid)
                self.abort()
                return
            self.write(_PROBE_ANSWER, bounded=False)
            eio.queue.put(packet.Packet(packet.NOOP))  # ends the pending poll
            self.stage = UPGRADE
            return
        if pkt is None or pkt.packet_type != packet.UPGRADE:
            log.info("sid=%s: failed websocket upgrade, expected UPGRADE", eio.sid)
            eio.upgraded = False
            self.abort()
            return
        eio.upgraded = True
        eio.upgrading = False
        self.stage = LIVE
        self._adopt()

    # -- closing ---------------------------------------------------------------------------

    def close_websocket(self, code: int, reason: str = "") -> None:
        """Send a close frame after the backlog, then close the connection."""
        if self.state == OPEN:
            self.write(close_frame(code, reason), bounded=False)
            self.close(flush=True)

    def lost(self, exc: OSError | None) -> None:
        """The peer is gone or the socket failed: close now; engine.io learns in `finished`."""
        if exc is not None:
            log.debug("sid=%s: websocket failed (%s); closing the connection", self.eio.sid, exc)
        self.abort()

    def over_bounds(self, packets: int, size: int) -> None:
        """Cut a client whose backlog passed its bounds: nothing more in or out from now on.

        `on_cut` (`webapp.backpressure`) ends it in a greenlet of its own:
        logged, counted, the kernel's data measured, then the end.
        """
        if self.state == OPEN:
            self.hold()
            self.layer.on_cut(self.eio, packets, size)

    def finished(self) -> None:
        """The socket is closed: engine.io closes the session (an upgrade's failure does not)."""
        eio = self.eio
        if self.stage != LIVE:
            eio.upgrading = False  # polling goes on
            return
        if eio.closed:
            self._forget()
        else:
            self._enqueue(_GONE)

    def _gone(self) -> None:
        """Close the engine.io session after the transport ended (runs the disconnect handlers)."""
        eio = self.eio
        try:
            eio.close(wait=False, abort=True, reason=eio.server.reason.TRANSPORT_CLOSE)
        except Exception:
            log.exception("sid=%s: closing the session failed", eio.sid)
        self._forget()

    def _forget(self) -> None:
        sockets = self.eio.server.sockets
        if sockets.get(self.eio.sid) is self.eio:
            del sockets[self.eio.sid]


def transport_of(eio_socket: Any) -> EngineWebSocket | None:
    """Return the websocket serving an engine.io socket, or None (polling, or not handed over)."""
    queue = getattr(eio_socket, "queue", None)
    return queue if type(queue) is EngineWebSocket else None


def _serve(self: engineio.socket.Socket, ws: Any) -> Any:
    """`Socket._websocket_handler`: take the socket over, or serve it engine.io's way."""
    layer: Layer | None = getattr(self.server, "tidings_websockets", None)
    handler = getattr(getattr(ws, "_sock", None), "handler", None)
    detach = getattr(handler, "detach_websocket", None)
    taken = detach() if layer is not None and detach is not None else None
    if taken is None:
        # TLS (gunicorn's certfile), or a server that is not this worker's:
        # engine.io's greenlets, with the socket kept for `abort_connection`.
        self.tidings_socket = getattr(handler, "socket", None)
        try:
            return _engineio_handler(self, ws)
        finally:
            self.tidings_socket = None
    fd, answer, early, pool = taken
    EngineWebSocket(layer, self, _socket.socket(fileno=fd), pool).start(answer, early)
    return []


def install(server: Any, *, bounds: Bounded | None, on_cut: Any) -> Layer:
    """Serve the websockets of a python-socketio `server` this way (gevent mode only)."""
    global _installed
    layer = server.eio.tidings_websockets = Layer(server, bounds, on_cut)
    if not _installed:
        engineio.socket.Socket._websocket_handler = _serve  # type: ignore[method-assign]
        _installed = True
    return layer
