"""Fan-out to a room without a greenlet switch per recipient.

python-engineio hands every packet to the recipient's writer greenlet through
its queue: per recipient a switch there and back, a gevent `Timeout` in
`Socket.poll`, the `'4' + data` copy, UTF-8 encoding and framing in
gevent-websocket's pure Python, and `sendall`'s extra `getsockopt`. Here an
emit builds its websocket frame once, and every recipient whose writer is
parked on an empty queue gets it with one non-blocking `send()` on the raw
socket. A parked writer holds nothing in flight, so nothing can overtake the
frame: per-topic order per connection is kept. Anyone else (polling
transport, writer busy or with a backlog, upgrade in progress, ping overdue)
takes engine.io's queue as before, with the slow-client bounds of
`webapp.backpressure`; an upgraded websocket behind a backlog gets the same
frame queued, as a `Preframed` item shared by all of them, so a slow client
costs no framing of its own and no copy of its own while its writer waits.

A send that the kernel takes only in part never blocks the emit loop: the
rest of the frame goes into the connection's queue as a `Preframed` item,
which its writer sends as it is, and the connection takes the queued path
until that is written. A send that fails means the client is gone: the
socket is shut down, so engine.io's reader ends the connection as for any
broken transport.

Only plain TCP sockets of gevent-websocket connections are written directly:
under TLS the wire is not the socket's bytes, and other transports have no
socket of their own.

Internals relied on (python-engineio 4.15, gevent-websocket 0.10.1, gevent
26.9; check them on upgrade): engine.io's gevent driver wraps the WebSocket
as `ws._sock`, whose `handler.socket` is the connection; its websocket writer
sends `ws.send(pkt.encode())` for every packet it takes from `Socket.queue`
and parks in `queue.get` between; `Socket.upgraded`, `closing`, `closed`,
`last_ping`; gevent sockets keep the stdlib socket as `_sock` and a pending
writer on `_write_event`. The only patch is per connection: `ws.send`, to
recognise `Preframed` (installed by `attach`, from
`backpressure._record_websockets`).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
import time
from collections.abc import Iterable
from typing import Any

import engineio.socket
from engineio import packet
from gevent.socket import socket as gevent_socket

log = logging.getLogger("tidings.fanout")

_FIN_TEXT = 0x81  # FIN + opcode 1 (text); server frames are never masked
_HEAD16 = struct.Struct("!BBH")
_HEAD64 = struct.Struct("!BBQ")


def text_frame(text: str) -> bytes:
    """Return `text` as one final, unmasked websocket text frame (RFC 6455 5.2)."""
    return encode_frame(text.encode())


def encode_frame(payload: bytes) -> bytes:
    """Return UTF-8 text as one final, unmasked websocket text frame (RFC 6455 5.2)."""
    size = len(payload)
    if size < 126:
        head = bytes((_FIN_TEXT, size))
    elif size < 0x10000:
        head = _HEAD16.pack(_FIN_TEXT, 126, size)
    else:
        head = _HEAD64.pack(_FIN_TEXT, 127, size)
    return head + payload


class Preframed(packet.Packet):
    """A frame built by the fan-out, whole or the rest of a direct write; sent as it is."""

    def __init__(self, frame: memoryview) -> None:
        # A MESSAGE with its bytes as data: the queue's byte bound counts them,
        # and it is never taken for a reply.
        super().__init__(packet.MESSAGE, frame)

    def encode(self, b64: bool = False) -> Any:
        # engine.io's writer calls `ws.send(pkt.encode())`; the send that
        # `attach` installs recognises the item and writes its bytes unframed.
        return self


class Direct:
    """What a direct write needs of one upgraded gevent-websocket connection, kept at upgrade."""

    __slots__ = ("busy", "gsock", "raw", "sock", "websocket")

    def __init__(self, sock: engineio.socket.Socket, websocket: Any, gsock: Any) -> None:
        self.sock = sock
        self.websocket = websocket  # geventwebsocket.WebSocket: `closed` once it is
        self.gsock = gsock  # the gevent socket: its writers wait on `_write_event`
        self.raw = gsock._sock  # the stdlib socket under it, non-blocking
        # True while a frame's rest waits for the writer, or once the
        # transport broke or the handler ended: the connection takes the
        # queued path meanwhile. (While the rest waits, the queue's state
        # says so too; the flag does not leave correctness to that.)
        self.busy = False

    def write(self, frame: bytes, now: float, ping_timeout: float) -> bool:
        """Write `frame` now if nothing else can be in flight; False means: queue it instead."""
        sock = self.sock
        if self.busy or not sock.upgraded or sock.closing or sock.closed:
            return False
        queue = sock.queue
        # The writer waits in `get` on an empty queue: it holds nothing, so
        # this frame cannot overtake anything. A cut queue drops, as queued.
        if not queue.waiting or queue.qsize() or queue.cut:
            return False
        last_ping = sock.last_ping
        if last_ping and now - last_ping > ping_timeout:
            return False  # engine.io's `Socket.send` closes it: let it
        if self.websocket.closed:
            return False
        event = self.gsock._write_event
        if event is None or event.callback is not None:
            # Closed, or another greenlet (gevent-websocket's reader answering
            # a ping or a close) waits to finish a frame: do not write into it.
            return False
        try:
            sent = self.raw.send(frame)
        except BlockingIOError:
            return False  # nothing went out: an ordinary queued packet will do
        except OSError as exc:
            self.broken(exc)
            return True
        if sent < len(frame):
            self.busy = True
            # A view, not a copy: every client the frame reached only in part
            # shares its bytes.
            queue.put(Preframed(memoryview(frame)[sent:]))
        return True

    def write_rest(self, item: Preframed) -> None:
        """Send a queued frame, or a frame's rest, from the writer greenlet (not the emit loop)."""
        if self.websocket.closed:
            raise ConnectionError("websocket closed")
        try:
            self.gsock.sendall(item.data)
        except OSError as exc:
            self.broken(exc)
            raise  # engine.io's writer ends, as on any failed send
        self.busy = False

    def broken(self, exc: OSError) -> None:
        """Treat a failed direct write as a broken transport: end the connection, quietly."""
        self.busy = True
        log.debug("sid=%s: websocket send failed (%s); closing the connection", self.sock.sid, exc)
        # The reader greenlet wakes from its recv and engine.io closes the
        # connection as when a client vanishes; the client reconnects and
        # recovers from history.
        self.shutdown()

    def shutdown(self) -> None:
        """Shut the socket down, waking whatever greenlet waits on it."""
        with contextlib.suppress(OSError):
            self.raw.shutdown(socket.SHUT_RDWR)


def handler_socket(ws: Any) -> Any:
    """Return the connection socket under engine.io's gevent-websocket wrapper, or None."""
    # engine.io's gevent driver keeps gevent-websocket's WebSocket as `_sock`;
    # the WebSocket's WSGI handler holds the accepted socket.
    return getattr(getattr(getattr(ws, "_sock", None), "handler", None), "socket", None)


def attach(sock: engineio.socket.Socket, ws: Any, gsock: Any) -> Direct | None:
    """Enable direct writes to a new websocket on `gsock`; None if they cannot be used."""
    sock.tidings_direct = None
    # Exactly gevent's plain socket: an SSLSocket (a subclass) must not be
    # written under its TLS layer. And only with a queue that says when its
    # writer is parked (`backpressure.install`'s).
    if type(gsock) is not gevent_socket or not hasattr(sock.queue, "waiting"):
        return None
    websocket = ws._sock
    direct = Direct(sock, websocket, gsock)
    send = ws.send

    def send_preframed(message: Any) -> Any:
        if type(message) is Preframed:
            return direct.write_rest(message)
        return send(message)

    ws.send = send_preframed
    sock.tidings_direct = direct
    return direct


def detach(sock: engineio.socket.Socket) -> None:
    """Stop direct writes to a connection whose websocket handler has ended."""
    direct = getattr(sock, "tidings_direct", None)
    if direct is not None:
        direct.busy = True
        sock.tidings_direct = None


def deliver(
    server: Any, pkt: packet.Packet, eio_sids: Iterable[str], *, frame: bytes | None = None
) -> int:
    """Send one text MESSAGE to every connection, directly where idle; return how many were.

    `frame`, when the caller has it, is `pkt` as a websocket frame already.
    """
    eio = server.eio
    queued = server._send_eio_packet
    if eio.logger.isEnabledFor(logging.INFO):
        # engine.io logs every packet it queues; keep that log complete.
        for eio_sid in eio_sids:
            queued(eio_sid, pkt)
        return 0
    sockets = eio.sockets
    now = time.time()
    ping_timeout = eio.ping_timeout
    shared: Preframed | None = None
    direct_count = 0
    for eio_sid in eio_sids:
        sock = sockets.get(eio_sid)
        direct = getattr(sock, "tidings_direct", None)
        if direct is not None:
            if frame is None:
                frame = text_frame(pkt.encode())  # cached: queued writers reuse the text
            if direct.write(frame, now, ping_timeout):
                direct_count += 1
                continue
            if sock.upgraded:
                # Behind a backlog: the writer sends this frame as it is.
                # engine.io's path would frame it again per client, and each
                # blocked writer would hold its own copy in flight.
                if shared is None:
                    shared = Preframed(memoryview(frame))
                queued(eio_sid, shared)
                continue
        queued(eio_sid, pkt)
    return direct_count
