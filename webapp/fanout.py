"""Fan-out to a room: one frame per emit, written to every websocket without a greenlet switch.

python-engineio hands every packet to its connection's queue, encoded and
framed per recipient. Here an emit builds its websocket frame once, and every
recipient served by `webapp.websockets` gets it through its transport: one
non-blocking `send()` when nothing is waiting for the kernel, or a place in
its bounded backlog behind what is (the same bytes object for every
recipient, and the unsent rest of a partial write a view of it, never a
copy). Packets and frames of a connection take the same path, so per-topic
order per connection is kept. A client over its backlog's bounds is cut
(`webapp.backpressure`); a send that fails ends that connection, quietly.

Everyone else takes engine.io's queue as before, with the same bounds: long-
polling connections, an upgrade under way, a connection closing or with its
PING overdue (engine.io's `Socket.send` closes it), and a websocket that
engine.io serves with its own greenlets (under TLS).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from engineio import packet

from webapp.frames import encode_frame
from webapp.websockets import EngineWebSocket

__all__ = ["deliver", "encode_frame", "text_frame"]


def text_frame(text: str) -> bytes:
    """Return `text` as one final, unmasked websocket text frame (RFC 6455 5.2)."""
    return encode_frame(text.encode())


def deliver(
    server: Any, pkt: packet.Packet, eio_sids: Iterable[str], *, frame: bytes | None = None
) -> int:
    """Send one text MESSAGE to every connection; return how many got it through a transport.

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
    direct = 0
    for eio_sid in eio_sids:
        sock = sockets.get(eio_sid)
        transport = getattr(sock, "queue", None)
        if type(transport) is EngineWebSocket and not (sock.closing or sock.closed):
            last_ping = sock.last_ping
            if not (last_ping and now - last_ping > ping_timeout):
                if frame is None:
                    frame = text_frame(pkt.encode())  # cached: queued packets reuse the text
                transport.write(frame)
                direct += 1
                continue
        queued(eio_sid, pkt)
    return direct
