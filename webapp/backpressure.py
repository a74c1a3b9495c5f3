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
import logging
import socket
from collections.abc import Callable
from typing import Any

import engineio.socket
from engineio import packet

from tidings import metrics
from webapp import websockets
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


def abort_connection(eio: Any, eio_sid: str) -> None:
    """Drop a connection at the transport, so the client reconnects by itself.

    A Socket.IO-level disconnect would tell clients not to come back; a
    broken transport makes every Socket.IO client reconnect and resubscribe.
    """
    sock = eio.sockets.get(eio_sid)
    if sock is None:
        return
    transport = websockets.transport_of(sock)
    raw = getattr(sock, "tidings_socket", None)  # engine.io's own websocket (TLS)
    sock.close(wait=False, abort=True, reason=eio.reason.SERVER_DISCONNECT)
    if transport is not None:
        transport.abort()  # no close frame: the connection just ends
    elif raw is not None:
        # A writer blocked in send() on a full TCP buffer wakes only when the
        # socket is shut down.
        with contextlib.suppress(OSError):
            raw.shutdown(socket.SHUT_RDWR)


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
        log.warning(
            "slow client cut: sid=%s had %d packets / %d bytes queued (limits %d / %d)",
            sock.sid,
            packets,
            size,
            max_packets,
            max_bytes,
        )
        metrics.slow_client_cut()
        on_cut(sock.sid)
        abort_connection(eio, sock.sid)

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
