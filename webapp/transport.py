"""A connection read when its socket is readable and written without a greenlet.

A parked greenlet costs at least 9.8 KB (its saved stack and the object,
bench/PROFILE.md, finding 3); an idle connection here costs a socket object,
one read watcher of gevent's hub (`loop.io(fd, READ)`) and this object. The
hub calls `_readable` when bytes arrive: one non-blocking `recv_into` into a
buffer shared by every connection of the process, handed to `received`
(what a subclass keeps, it copies).

Writes are non-blocking `send()`s from whichever greenlet writes. What the
kernel does not take at once waits in a backlog, and only then does the
connection get a write watcher that sends the rest when the socket drains;
both go when the backlog is empty. The backlog is bounded as
`webapp.backpressure.Bounds` says, and a connection over its bounds is cut
(`on_cut`), not buffered. Everything here runs in the hub or in greenlets
of one thread, never blocking, so no lock is needed.

Subclasses say what the bytes mean and what to do when the peer is gone:
`webapp.websockets` (engine.io over websocket frames). The lifecycle: OPEN,
then CLOSING (`close(flush=True)`: the backlog goes out, at most
`FLUSH_SECONDS`) or HELD (`hold`: a cut under way, reading and writing
stopped, the backlog dropped, the socket left to whoever ends it), then
CLOSED, when the socket is closed, the watchers are gone, and `finished` runs
once.
"""

from __future__ import annotations

import _socket
import contextlib
import logging
from collections import deque
from typing import Any, Protocol

from gevent import get_hub

log = logging.getLogger("tidings.transport")

OPEN, CLOSING, CLOSED, HELD = 0, 1, 2, 3
READ, WRITE = 1, 2
# Bytes one readiness event may read; a client sending more is read again on
# the next turn of the loop, after every other ready connection.
READ_SIZE = 65536
# Seconds a closing connection may take to send its backlog before it is cut.
FLUSH_SECONDS = 5.0

# Every connection of the process reads into this buffer, one at a time: the
# hub runs one callback at once.
_SCRATCH = bytearray(READ_SIZE)
_VIEW = memoryview(_SCRATCH)


class Bounded(Protocol):
    """What bounds a backlog (`webapp.backpressure.Bounds` is one)."""

    def admits(self, packets: int, held: int, replies: int, size: int, reply: bool) -> bool:
        """Tell whether one more item of `size` bytes may join the backlog."""


class Transport:
    """A non-blocking socket: read by a hub watcher, written directly or through a backlog."""

    __slots__ = (
        "backlog",
        "bounds",
        "pending_bytes",
        "pool",
        "reader",
        "reply_bytes",
        "sock",
        "state",
        "writer",
    )

    def __init__(self, sock: _socket.socket, bounds: Bounded | None, pool: Any = None) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.bounds = bounds
        # The gunicorn pool whose slot this connection holds (`webapp.worker.KeepingPool`).
        self.pool = pool
        self.state = OPEN
        self.reader: Any = None
        self.writer: Any = None
        # (bytes or a view, is a reply) not yet taken by the kernel, oldest first.
        self.backlog: deque[tuple[Any, bool]] | None = None
        self.pending_bytes = 0
        self.reply_bytes = 0

    # -- reading ---------------------------------------------------------------------------

    def start_reading(self) -> None:
        """Have the hub call `received` whenever bytes arrive."""
        if self.state == OPEN and self.reader is None:
            self.reader = get_hub().loop.io(self.sock.fileno(), READ)
            self.reader.start(self._readable)

    def stop_reading(self) -> None:
        """Read nothing more (what arrives stays in the kernel until the socket closes)."""
        reader, self.reader = self.reader, None
        if reader is not None:
            reader.stop()
            reader.close()

    def _readable(self) -> None:
        """The hub's callback: one non-blocking read; never raises into the hub."""
        try:
            try:
                size = self.sock.recv_into(_SCRATCH)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.lost(exc)
                return
            if not size:
                self.lost(None)
                return
            self.received(_VIEW[:size])
        except Exception:
            log.exception("a connection's read failed; closing it")
            self.lost(None)

    def received(self, data: memoryview) -> None:
        """Handle bytes read (a view of a shared buffer: copy what is kept)."""
        raise NotImplementedError

    def lost(self, exc: OSError | None) -> None:
        """The peer is gone (end of stream, a reset, a failed send): close, and tell the owner."""
        self.abort()

    # -- writing ---------------------------------------------------------------------------

    @property
    def backlogged(self) -> int:
        """Return how many items wait for the kernel."""
        return len(self.backlog) if self.backlog is not None else 0

    def write(self, data: bytes | memoryview, *, reply: bool = False, bounded: bool = True) -> bool:
        """Send `data` now, or after the backlog; False if it was not taken (closed, or cut).

        `reply` marks a Socket.IO ack (see `webapp.backpressure`); an
        unbounded item (a control frame) never cuts the connection.
        """
        if self.state != OPEN:
            return False
        backlog = self.backlog
        if backlog is None:
            try:
                sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                self.lost(exc)
                return False
            if sent == len(data):
                return True
            # A view, not a copy: every connection the frame reached only in
            # part shares its bytes.
            data = memoryview(data)[sent:]
            backlog = self.backlog = deque()
            self.writer = get_hub().loop.io(self.sock.fileno(), WRITE)
            self.writer.start(self._writable)
        elif (
            bounded
            and self.bounds is not None
            and not self.bounds.admits(
                len(backlog), self.pending_bytes, self.reply_bytes, len(data), reply
            )
        ):
            self.over_bounds(len(backlog) + 1, self.pending_bytes + len(data))
            return False
        backlog.append((data, reply))
        self.pending_bytes += len(data)
        if reply:
            self.reply_bytes += len(data)
        return True

    def _writable(self) -> None:
        """The hub's callback while a backlog exists: send until the kernel is full."""
        try:
            self._drain()
        except Exception:
            log.exception("a connection's write failed; closing it")
            self.lost(None)

    def _drain(self) -> None:
        backlog = self.backlog
        sock = self.sock
        while backlog:
            data, reply = backlog[0]
            try:
                sent = sock.send(data)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.lost(exc)
                return
            self.pending_bytes -= sent
            if reply:
                self.reply_bytes -= sent
            if sent < len(data):
                backlog[0] = (memoryview(data)[sent:], reply)
                return
            backlog.popleft()
        self._stop_writing()
        if self.state == CLOSING:
            self._finish()

    def _stop_writing(self) -> None:
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.stop()
            writer.close()
        self.backlog = None
        self.pending_bytes = self.reply_bytes = 0

    def over_bounds(self, packets: int, size: int) -> None:
        """The backlog would pass its bounds: cut the connection (subclasses say more)."""
        self.abort()

    def hold(self) -> None:
        """Read and write no more, drop the backlog; the socket stays open until `abort`.

        A cut ends the connection at the kernel (what it holds, then the
        end) before the socket is closed, from a greenlet of its own.
        """
        if self.state == OPEN:
            self.state = HELD
            self.stop_reading()
            self._stop_writing()

    # -- closing ---------------------------------------------------------------------------

    def close(self, *, flush: bool = True) -> None:
        """Close: after the backlog is sent (`flush`, at most FLUSH_SECONDS), or now."""
        if self.state != OPEN:
            if not flush:
                self.abort()
            return
        self.stop_reading()
        if not flush or self.backlog is None:
            self._finish()
            return
        self.state = CLOSING
        timer = get_hub().loop.timer(FLUSH_SECONDS)
        timer.start(self._flush_timed_out, timer)

    def _flush_timed_out(self, timer: Any) -> None:
        timer.close()
        if self.state == CLOSING:
            log.debug("closing a connection whose backlog did not drain in %ss", FLUSH_SECONDS)
            self._finish()

    def abort(self) -> None:
        """Close now, dropping the backlog (the peer sees the connection end short)."""
        if self.state != CLOSED:
            self._finish()

    def _finish(self) -> None:
        self.state = CLOSED
        self.stop_reading()
        self._stop_writing()
        sock = self.sock
        with contextlib.suppress(OSError):
            # Unread bytes make close() send a reset, which can destroy what
            # was sent last (a close frame) before the peer reads it.
            sock.recv(READ_SIZE)
        sock.close()
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.release_kept()
        try:
            self.finished()
        except Exception:
            log.exception("a connection's close handler failed")

    def finished(self) -> None:
        """Run once, when the socket is closed (subclasses)."""
