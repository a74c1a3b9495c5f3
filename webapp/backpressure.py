"""Bounded outgoing backlogs: a client that cannot keep up is cut, not buffered forever.

python-engineio gives every connection an unbounded queue; a client that
stops reading (a stalled tab, a dead network path) would let publications
pile up in the worker's memory. Here every connection's backlog counts its
packets and bytes, and a connection over either bound is closed with a
logged reason. The client reconnects and recovers what it missed from
history, so being cut loses it nothing.

Two backlogs are bounded by the same rule (`Bounds`): an upgraded
websocket's frames that the kernel has not taken yet (`webapp.transport`,
through `webapp.websockets`), and engine.io's queue of every other
connection (long-polling, an upgrade under way, a websocket served by
engine.io's own greenlets under TLS), which `install` replaces with a
counting one.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import struct
import termios
import threading
from collections.abc import Callable
from typing import Any

import engineio.socket
from engineio import packet

from tidings import metrics
from webapp import websockets
from webapp.transport import CLOSED
from webapp.websockets import is_reply

log = logging.getLogger("tidings.backpressure")


class Bounds:
    """TIDINGS_CLIENT_QUEUE_PACKETS and TIDINGS_CLIENT_QUEUE_BYTES, and how a backlog meets them."""

    __slots__ = ("max_bytes", "max_packets")

    def __init__(self, max_packets: int, max_bytes: int) -> None:
        self.max_packets = max_packets
        self.max_bytes = max_bytes

    def admits(self, packets: int, held: int, replies: int, size: int, reply: bool) -> bool:
        """Tell whether an item of `size` bytes may join `packets` items of `held` bytes.

        `replies` of the held bytes are Socket.IO acks. One reply at a time
        is let through whatever its size: a client that reconnects far
        behind gets its whole recovery in one `subscribe` ack while live
        publications queue behind it; measured with them, it would be cut at
        every reconnect and never catch up. A second reply while one waits
        is measured. Live traffic is measured without the reply in flight.
        """
        counted = (held if replies else 0) if reply else held - replies
        # One packet always goes through, whatever its size: only a backlog is slow.
        return packets < self.max_packets and not (
            packets and counted and counted + size > self.max_bytes
        )


def _packet_size(item: Any) -> int:
    data = getattr(item, "data", None)
    return len(data) if isinstance(data, (str, bytes, memoryview)) else 0


# SO_LINGER on, zero seconds: close() sends RST and drops unsent data.
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)
# How long a cut client has to read what the kernel still holds for it
# before the connection is reset instead.
DRAIN_SECONDS = 2.0


def abort_connection(eio: Any, eio_sid: str) -> int | None:
    """Drop a connection at the transport, so the client reconnects by itself.

    A Socket.IO-level disconnect would tell clients not to come back; a
    broken transport makes every Socket.IO client reconnect and resubscribe.
    Returns how many bytes the kernel still held for the client, if known.
    """
    sock = eio.sockets.get(eio_sid)
    if sock is None:
        return None
    return _abort(eio, sock)


def _abort(eio: Any, sock: engineio.socket.Socket) -> int | None:
    """`abort_connection` of one engine.io socket; the bytes the kernel still held, if known."""
    transport = websockets.transport_of(sock)
    if transport is None:
        raw = getattr(sock, "tidings_socket", None)  # engine.io's own websocket (TLS)
        sock.close(wait=False, abort=True, reason=eio.reason.SERVER_DISCONNECT)
        return sever(raw, sock.sid) if raw is not None else None
    # The kernel's part first: once the transport is closed its descriptor is gone.
    unsent = sever(transport.sock, sock.sid) if transport.state != CLOSED else None
    transport.abort()  # no close frame: the connection just ends
    sock.close(wait=False, abort=True, reason=eio.reason.SERVER_DISCONNECT)
    return unsent


def sever(raw: Any, sid: str) -> int | None:
    """End a connection after what the kernel holds for it (reset if unread); return that."""
    try:
        unsent: int | None = unsent_bytes(raw)
    except OSError:
        unsent = None
    reset_if_undrained(raw, DRAIN_SECONDS, sid)
    # The FIN goes out behind that data (a duplicate descriptor keeps the
    # socket open past our close); a writer blocked in send() on a full TCP
    # buffer (engine.io's, under TLS) wakes only when the socket is shut down.
    with contextlib.suppress(OSError):
        raw.shutdown(socket.SHUT_RDWR)
    return unsent


def reset_if_undrained(raw: socket.socket, seconds: float, sid: str = "") -> None:
    """Reset the connection if its client has not read what the kernel holds within `seconds`.

    The FIN of a shutdown waits behind that data. A client that resumes
    reading gets it, then the end, and asks history for less; one that reads
    slowly (a small window, megabytes held once the send buffer has grown)
    would notice the cut only at its ping timeout, 30 s on, by when history
    may no longer cover the gap: it gets a reset instead, which also frees
    the kernel's buffers. A duplicate of the descriptor keeps the socket
    until then, whenever the handler closes its own.
    """
    try:
        # Through os.dup: a handed-over websocket's socket is a bare _socket.socket.
        held = socket.socket(fileno=os.dup(raw.fileno()))
    except OSError:
        return

    def settle() -> None:
        with contextlib.suppress(OSError), held:
            unsent = unsent_bytes(held)
            if unsent > 0:
                held.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
                log.info("sid=%s: %d bytes unread %gs after the cut; reset", sid, unsent, seconds)

    # gevent-patched in a web worker: a timer greenlet, not a thread.
    timer = threading.Timer(seconds, settle)
    timer.daemon = True
    timer.start()


def unsent_bytes(sock: socket.socket) -> int:
    """Bytes the kernel holds for the peer, not yet acknowledged (Linux TIOCOUTQ)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]


def install(
    server: Any,
    *,
    max_packets: int,
    max_bytes: int,
    on_cut: Callable[[str], None] = lambda sid: None,
) -> Bounds:
    """Bound every connection's backlog of a python-socketio `server`; serve its websockets."""
    eio = server.eio
    bounds = Bounds(max_packets, max_bytes)
    base = type(eio.create_queue())

    class MeteredQueue(base):  # type: ignore[misc, valid-type]
        """The async mode's queue, counting the bytes it holds."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.pending_bytes = 0
            # Of which acks: a recovery can be far larger than the live bound.
            self.reply_bytes = 0
            self.cut = False
            super().__init__(*args, **kwargs)

        def _put(self, item: Any) -> None:
            size = _packet_size(item)
            self.pending_bytes += size
            if is_reply(item):
                self.reply_bytes += size
            super()._put(item)

        def _get(self) -> Any:
            item = super()._get()
            size = _packet_size(item)
            self.pending_bytes -= size
            if is_reply(item):
                self.reply_bytes -= size
            return item

    eio.create_queue = MeteredQueue
    send_packet = eio.send_packet

    def cut(sock: engineio.socket.Socket, packets: int, size: int) -> None:
        metrics.slow_client_cut()
        on_cut(sock.sid)
        unsent = _abort(eio, sock)
        log.warning(
            "slow client cut: sid=%s had %d packets / %d bytes queued (limits %d / %d),"
            " %s bytes more in the kernel",
            sock.sid,
            packets,
            size,
            max_packets,
            max_bytes,
            "?" if unsent is None else unsent,
        )

    def cut_later(sock: engineio.socket.Socket, packets: int, size: int) -> None:
        # Not inline: this runs inside an emit loop over a room, or in the hub.
        eio.start_background_task(cut, sock, packets, size)

    def bounded_send_packet(sid: str, pkt: packet.Packet) -> None:
        sock = eio.sockets.get(sid)
        queue = getattr(sock, "queue", None)
        if isinstance(queue, MeteredQueue) and pkt.packet_type == packet.MESSAGE:
            if queue.cut:
                return
            size = _packet_size(pkt)
            if not bounds.admits(
                queue.qsize(), queue.pending_bytes, queue.reply_bytes, size, is_reply(pkt)
            ):
                queue.cut = True
                cut_later(sock, queue.qsize(), queue.pending_bytes)
                return
        send_packet(sid, pkt)

    eio.send_packet = bounded_send_packet
    websockets.install(server, bounds=bounds, on_cut=cut_later)
    return bounds
