"""gunicorn worker class: gevent-websocket's, handing upgraded engine.io websockets over.

Once engine.io has accepted a websocket (`webapp.websockets`), the handler
gives the connection's socket away (`detach_websocket`) and returns to
gevent's server: no greenlet stays parked per connection, reading or
writing (a parked one costs at least 9.8 KB; bench/PROFILE.md, finding 3).
The pool slot the handler held passes to the connection (`KeepingPool`), so
`worker_connections` still bounds a worker's open websockets, and a worker
that stops still waits for them as gunicorn's gevent worker does.

Other websockets (an app's own gevent-websocket endpoint; a websocket under
gunicorn's TLS, which engine.io then serves with its greenlets) are read
through a 512-byte buffer once upgraded, not pywsgi's 8 KB one; the handler
lets go of the parsed request headers, which the environ holds anyway.

Request headers themselves are parsed without the `email` package when they
are plain `Name: value` lines (every browser's and client's): pywsgi hands
them to `email.parser`, a general MIME parser that was 8% of the worker's
CPU per connection. Anything else (folded lines, a bare CR, odd names) still
goes through it, so the result is the same message either way.

`gunicorn.conf.py` names `webapp.worker.GeventWebSocketWorker` (the same class
name as gevent-websocket's, which `flask --app webapp doctor` looks for).
"""

from __future__ import annotations

import email.parser
from http import client
from typing import Any

from gevent import getcurrent
from gevent.pool import Group, Pool
from gevent.pywsgi import OldMessage, WSGIHandler
from gevent.socket import socket as gevent_socket
from geventwebsocket.gunicorn import workers
from geventwebsocket.handler import WebSocketHandler
from geventwebsocket.websocket import WebSocket
from gunicorn.workers.ggevent import PyWSGIServer

# Bytes. A client frame up to this size (header, mask, payload: every pong and
# a subscribe without a long token) is still one recv().
UPGRADED_READ_BUFFER = 512


# A field name as `email.feedparser.headerRE` accepts one: printable ASCII but ':'.
_NAME_CHARS = frozenset(chr(code) for code in range(0x21, 0x7F)) - {":"}


def _plain_headers(lines: list[bytes]) -> OldMessage | None:
    """Parse plain `Name: value` lines as the `email` parser would; None for anything else."""
    if not lines or lines[-1] not in (b"\r\n", b"\n"):
        return None  # cut short: the email parser decides
    message = OldMessage()
    headers = message._headers  # what `email.message.Message.set_raw` appends to
    for raw in lines[:-1]:
        line = raw.decode("iso-8859-1")
        name, colon, value = line[:-2].partition(":")
        # The email parser splits lines at a bare CR too, reads a leading
        # space or tab as a continuation, and ends the headers at a line
        # without a valid name: leave all of those to it.
        if (
            not colon
            or not line.endswith("\r\n")
            or "\r" in value
            or not name
            or not _NAME_CHARS.issuperset(name)
        ):
            return None
        # compat32's header_source_parse: leading blanks stripped, trailing kept.
        headers.append((name, value.lstrip(" \t")))
    return message


def parse_request_headers(fp: Any) -> OldMessage:
    """Read and parse request headers exactly as gevent's `pywsgi.headers_factory` does."""
    try:
        # http.client's own reader (private, Python 3.11): its line and count
        # limits and errors, as gevent gets them through `parse_headers`.
        lines = client._read_headers(fp)  # type: ignore[attr-defined]
    except client.LineTooLong:
        message = OldMessage()
        message.status = "Line too long"
        return message
    plain = _plain_headers(lines)
    if plain is not None:
        return plain
    text = b"".join(lines).decode("iso-8859-1")
    return email.parser.Parser(_class=OldMessage).parsestr(text)


def _buffered(rfile: Any, sock: Any) -> bytes | None:
    """Return the bytes `rfile` holds beyond the request, without blocking; None on an error."""
    timeout = sock.gettimeout()
    sock.settimeout(0.0)
    try:
        # Buffered bytes come back as they are; with none, one non-blocking
        # recv() (b"" when nothing has arrived). Nothing is consumed.
        return rfile.peek()
    except OSError:  # the peer already went away; whoever reads next finds out
        return None
    finally:
        sock.settimeout(timeout)


class _Detached(WebSocket):
    """A gevent-websocket WebSocket whose connection was handed over: nothing left to close."""

    __slots__ = ()

    def __del__(self) -> None:
        # gevent-websocket's would try to send a close frame (building two
        # classes on the way) on a socket that is no longer its own.
        pass


class SmallBufferWebSocketHandler(WebSocketHandler):
    """gevent-websocket's handler: faster request headers, lighter upgraded connections.

    The 101 answer of an upgrade is not written before the app runs, as
    gevent-websocket does, but with the connection's first bytes: a websocket
    handed over (`detach_websocket`) sends it with engine.io's OPEN packet in
    one `send()`; any other app's websocket sends it on its first read or
    write, and reads through a 512-byte buffer from then on.
    """

    def MessageClass(self, fp: Any, *_: Any) -> OldMessage:  # pywsgi names it so
        """Parse the request headers (pywsgi calls this with its `rfile`)."""
        return parse_request_headers(fp)

    def run_application(self) -> Any:
        """gevent-websocket's, except that the 101 answer waits for the first bytes."""
        if getattr(self.server, "pre_start_hook", None):
            return super().run_application()
        self.result = self.upgrade_websocket()
        if hasattr(self, "websocket"):
            self.run_websocket()
            return None
        if self.status:  # refused: the answer (a 400) goes out now
            if not self.result:
                self.result = []
            self.process_result()
            return None
        return WSGIHandler.run_application(self)  # not an upgrade: the app answers

    def upgrade_connection(self) -> Any:
        """Upgrade as gevent-websocket does; defer the answer; drop the parsed headers."""
        answer = super().upgrade_connection()
        websocket = self.environ.get("wsgi.websocket")
        if websocket is not None:
            # The parsed request headers (1-3 KB) are read only to build the
            # environ, which holds them too; the handler would keep them for
            # the websocket's life. The class default (empty) stays readable.
            self.__dict__.pop("headers", None)
            # gevent-websocket reads frame headers through `stream.read`, the
            # rest through `raw_read`, and writes through `raw_write`.
            websocket.stream.read = websocket.raw_read = self._first_read
            websocket.stream.write = websocket.raw_write = self._first_write
        return answer

    def _answer(self) -> None:
        """Send the 101 answer if it has not gone out yet."""
        if not self.headers_sent and self.status:
            self.write(b"")

    def _first_read(self, size: int) -> bytes:
        """Answer the upgrade, then read through a 512-byte buffer (or the kept 8 KB one)."""
        self._answer()
        websocket = self.websocket
        old = self.rfile
        reader = old
        # A compliant client sends no frame before the 101 answer, so the old
        # reader is empty; if it is not, it is kept (correct, just larger).
        if _buffered(old, self.socket) == b"":
            reader = self.socket.makefile("rb", UPGRADED_READ_BUFFER)
            # Every holder of the old reader lets go, so its buffer is freed now.
            self.rfile = reader
            if self.wsgi_input is not None:
                self.wsgi_input.rfile = reader
            if self.environ.get("wsgi.input") is old:
                self.environ["wsgi.input"] = reader
            old.close()  # drops its SocketIO's reference; the socket stays open
        websocket.stream.read = websocket.raw_read = reader.read
        return reader.read(size)

    def _first_write(self, data: bytes) -> Any:
        """Answer the upgrade, then write as gevent-websocket does."""
        self._answer()
        websocket = self.websocket
        websocket.stream.write = websocket.raw_write = self.socket.sendall
        return self.socket.sendall(data)

    def detach_websocket(self) -> tuple[int, bytes, bytes, KeepingPool | None] | None:
        """Give the upgraded connection's socket away; None if it cannot be (TLS, an error).

        Returns the file descriptor (now the caller's to close), the 101
        answer if it has not been sent (the caller sends it first), the bytes
        read past the request (a client may send its first frame right after
        the 101), and the pool whose slot the caller now holds (call its
        `release_kept` once the connection is closed). The handler then ends
        without touching the connection: no close frame, no close.
        """
        sock = self.socket
        websocket = self.environ.get("wsgi.websocket")
        if type(sock) is not gevent_socket or websocket is None:
            return None  # an SSLSocket must be read through its TLS layer
        early = _buffered(self.rfile, sock)
        if early is None:
            return None
        answer = b""
        if not self.headers_sent and self.status:
            written: list[bytes] = []
            self._sendall = written.append  # pywsgi formats, this keeps
            try:
                self.write(b"")
            finally:
                del self._sendall
            answer = b"".join(written)
        pool = getattr(self.server, "pool", None)
        kept = pool if isinstance(pool, KeepingPool) else None
        if kept is not None:
            kept.keep(getcurrent())
        # gevent-websocket's run_websocket closes a websocket it thinks open,
        # sending a close frame; pywsgi's handle() closes `self.socket`.
        websocket.closed = True
        websocket.stream = websocket.raw_write = websocket.raw_read = None
        if type(websocket) is WebSocket:
            websocket.__class__ = _Detached
        self.socket = None
        return sock.detach(), answer, bytes(early), kept


class KeepingPool(Pool):
    """gevent's pool, where a handler's slot can pass to the connection it detached.

    gunicorn gives each worker a pool of `worker_connections` greenlets and
    stops accepting while it is full. A handler that detached its websocket
    ends; its slot stays taken (`kept`) until the connection calls
    `release_kept`, so the bound still counts every open connection.
    """

    def __init__(self, size: int | None = None) -> None:
        super().__init__(size)
        self.kept = 0
        self._keeping: set[Any] = set()

    def keep(self, greenlet: Any) -> None:
        """Keep `greenlet`'s slot taken after it ends (until `release_kept`)."""
        self._keeping.add(greenlet)

    def _discard(self, greenlet: Any) -> None:
        if greenlet in self._keeping:
            self._keeping.discard(greenlet)
            Group._discard(self, greenlet)  # untracked, the semaphore still taken
            self.kept += 1
        else:
            super()._discard(greenlet)

    def release_kept(self) -> None:
        """Free the slot of a connection that was detached and is now closed."""
        self.kept -= 1
        self._semaphore.release()

    def free_count(self) -> int:
        """Return how many more greenlets fit: running handlers and kept slots count."""
        if self.size is None:
            return 1
        return max(0, self.size - len(self) - self.kept)


class WebSocketServer(PyWSGIServer):
    """gunicorn's pywsgi server with a `KeepingPool` in place of its plain pool."""

    def __init__(self, listener: Any, *args: Any, spawn: Any = "default", **kwargs: Any) -> None:
        if type(spawn) is Pool:
            spawn = KeepingPool(spawn.size)
        super().__init__(listener, *args, spawn=spawn, **kwargs)


class GeventWebSocketWorker(workers.GeventWebSocketWorker):
    """gevent-websocket's gunicorn worker: `SmallBufferWebSocketHandler`, `WebSocketServer`."""

    wsgi_handler = SmallBufferWebSocketHandler
    server_class = WebSocketServer
