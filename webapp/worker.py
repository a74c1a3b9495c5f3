"""gunicorn worker class: gevent-websocket's, with a small read buffer on upgraded connections.

gevent's pywsgi reads each connection through `sock.makefile("rb", -1)`, an
`io.BufferedReader` of 8 KB, and gevent-websocket keeps reading a websocket
through it for the connection's life: 8 KB of every idle connection's ~50 KB
(bench/PROFILE.md, finding 3). Client frames are small (pongs, subscribes), so
once a connection is upgraded this handler reads it through a 512-byte buffer
instead; the HTTP request before it is parsed as before. It also lets go of
the parsed request headers, which the environ holds anyway.

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

from gevent.pywsgi import OldMessage
from geventwebsocket.gunicorn import workers
from geventwebsocket.handler import WebSocketHandler

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


def _nothing_buffered(rfile: Any, sock: Any) -> bool:
    """Tell whether `rfile` holds no bytes beyond the request, without blocking."""
    timeout = sock.gettimeout()
    sock.settimeout(0.0)
    try:
        # Buffered bytes come back as they are; with none, one non-blocking
        # recv() (b"" when nothing has arrived). Either way nothing is lost:
        # whatever peek() returns stays in the old reader, which is then kept.
        return not rfile.peek()
    except OSError:  # the peer already went away; the websocket will find out
        return False
    finally:
        sock.settimeout(timeout)


class SmallBufferWebSocketHandler(WebSocketHandler):
    """gevent-websocket's handler: faster request headers, lighter upgraded connections."""

    def MessageClass(self, fp: Any, *_: Any) -> OldMessage:  # pywsgi names it so
        """Parse the request headers (pywsgi calls this with its `rfile`)."""
        return parse_request_headers(fp)

    def upgrade_connection(self) -> Any:
        """Swap the 8 KB reader for a small one, upgrade as gevent-websocket does, drop headers."""
        # Before the upgrade: the WebSocket's stream binds rfile.read when made.
        # A compliant client sends no frame before the 101 answer, so the old
        # reader is empty; if it is not, it is kept (correct, just larger).
        old = self.rfile
        if _nothing_buffered(old, self.socket):
            small = self.socket.makefile("rb", UPGRADED_READ_BUFFER)
            # Every holder of the old reader lets go, so its buffer is freed now.
            self.rfile = small
            if self.wsgi_input is not None:
                self.wsgi_input.rfile = small
            if self.environ.get("wsgi.input") is old:
                self.environ["wsgi.input"] = small
            old.close()  # drops its SocketIO's reference; the socket stays open
        answer = super().upgrade_connection()
        if self.environ.get("wsgi.websocket") is not None:
            # The parsed request headers (1-3 KB) are read only to build the
            # environ, which holds them too; the handler would keep them for
            # the websocket's life. The class default (empty) stays readable.
            self.__dict__.pop("headers", None)
        return answer


class GeventWebSocketWorker(workers.GeventWebSocketWorker):
    """gevent-websocket's gunicorn worker with `SmallBufferWebSocketHandler`."""

    wsgi_handler = SmallBufferWebSocketHandler
