"""Bounded outgoing queues: a client that cannot keep up is cut, not buffered forever.

python-engineio gives every connection an unbounded queue that its writer
drains; a client that stops reading (a stalled tab, a dead network path)
blocks its writer in `send()` while publications pile up in the worker's
memory. Here each queue counts its packets and bytes, and a connection over
either bound is closed with a logged reason. The client reconnects and
recovers what it missed from history, so being cut loses it nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import socket
import struct
import termios
import threading
from collections.abc import Callable
from typing import Any

import engineio.socket
from engineio import packet

from tidings import metrics
from webapp import fanout

log = logging.getLogger("tidings.backpressure")

_record_ws_installed = False


def _packet_size(item: Any) -> int:
    data = getattr(item, "data", None)
    return len(data) if isinstance(data, (str, bytes, memoryview)) else 0


def _is_reply(item: Any) -> bool:
    """Tell a Socket.IO ack (type 3: a `subscribe` answer, with its recovery) from the rest."""
    data = getattr(item, "data", None)
    return getattr(item, "packet_type", None) == packet.MESSAGE and (
        isinstance(data, str) and data[:1] == "3"
    )


def _record_websockets() -> None:
    """Make engine.io sockets keep their websocket's socket and count oversized messages.

    The socket is looked up once, at upgrade, for `abort_connection` and for
    `fanout`'s direct writes, which need it per recipient per emit.
    """
    global _record_ws_installed
    if _record_ws_installed:
        return
    original = engineio.socket.Socket._websocket_handler

    def recording_handler(self: engineio.socket.Socket, ws: Any) -> Any:
        self.tidings_socket = fanout.handler_socket(ws)
        fanout.attach(self, ws, self.tidings_socket)
        wait = ws.wait
        limit = self.server.max_http_buffer_size

        def counted_wait() -> Any:
            # engine.io closes the connection on an oversized message; count it.
            data = wait()
            if data and len(data) > limit:
                metrics.limit_hit("message_size")
            return data

        ws.wait = counted_wait
        try:
            return original(self, ws)
        finally:
            # The handler has closed the websocket: nothing may write to it directly now.
            fanout.detach(self)
            self.tidings_socket = None

    engineio.socket.Socket._websocket_handler = recording_handler
    _record_ws_installed = True


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
    raw = getattr(sock, "tidings_socket", None)
    sock.close(wait=False, abort=True, reason=eio.reason.SERVER_DISCONNECT)
    if raw is None:
        return None
    try:
        unsent: int | None = unsent_bytes(raw)
    except OSError:
        unsent = None
    reset_if_undrained(raw, DRAIN_SECONDS, eio_sid)
    # A writer blocked in send() on a full TCP buffer wakes only when the
    # socket is shut down.
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
        held = raw.dup()
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
) -> None:
    """Bound every connection's outgoing queue of a python-socketio `server`."""
    eio = server.eio
    base = type(eio.create_queue())

    class MeteredQueue(base):  # type: ignore[misc, valid-type]
        """The async mode's queue, counting the bytes it holds."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.pending_bytes = 0
            # Of which acks: a recovery can be far larger than the live bound.
            self.reply_bytes = 0
            self.cut = False
            # Greenlets blocked in `get`: on an upgraded connection, only its
            # writer. `fanout` writes directly while the writer waits here on
            # an empty queue. Counted here rather than by wrapping engine.io's
            # `Socket.poll`: this is the exact moment the writer holds nothing,
            # it needs no monkeypatch, and gevent's compiled queue does not
            # expose its getters.
            self.waiting = 0
            super().__init__(*args, **kwargs)

        def get(self, block: bool = True, timeout: float | None = None) -> Any:
            if not block:
                return super().get(False)
            self.waiting += 1
            try:
                return super().get(True, timeout)
            finally:
                self.waiting -= 1

        def _put(self, item: Any) -> None:
            size = _packet_size(item)
            self.pending_bytes += size
            if _is_reply(item):
                self.reply_bytes += size
            super()._put(item)

        def _get(self) -> Any:
            item = super()._get()
            size = _packet_size(item)
            self.pending_bytes -= size
            if _is_reply(item):
                self.reply_bytes -= size
            return item

    eio.create_queue = MeteredQueue
    _record_websockets()
    send_packet = eio.send_packet

    def cut(sock: engineio.socket.Socket, packets: int, size: int) -> None:
        metrics.slow_client_cut()
        on_cut(sock.sid)
        unsent = abort_connection(eio, sock.sid)
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

    def bounded_send_packet(sid: str, pkt: packet.Packet) -> None:
        sock = eio.sockets.get(sid)
        queue = getattr(sock, "queue", None)
        if isinstance(queue, MeteredQueue) and pkt.packet_type == packet.MESSAGE:
            if queue.cut:
                return
            backlog = queue.qsize()
            size = _packet_size(pkt)
            if _is_reply(pkt):
                # One reply at a time is let through whatever its size: a
                # client that reconnects far behind gets its whole recovery in
                # one `subscribe` ack while live publications queue behind it;
                # measured with them, it would be cut at every reconnect and
                # never catch up. A second reply while one waits is measured.
                held = queue.pending_bytes if queue.reply_bytes else 0
            else:
                # Live traffic is measured without the reply in flight.
                held = queue.pending_bytes - queue.reply_bytes
            # One packet always goes through, whatever its size: only a backlog is slow.
            if backlog >= max_packets or (backlog and held and held + size > max_bytes):
                queue.cut = True
                # Not inline: this runs inside an emit loop over the room.
                eio.start_background_task(cut, sock, queue.qsize(), queue.pending_bytes)
                return
        send_packet(sid, pkt)

    eio.send_packet = bounded_send_packet
