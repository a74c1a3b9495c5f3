"""The worker's handler: request headers as gevent parses them; small buffer, nothing lost."""

from __future__ import annotations

import base64
import io
import os
import struct
import sys
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from gevent import pywsgi
from gevent import socket as gsocket
from hypothesis import given
from hypothesis import strategies as st

from webapp.worker import (
    UPGRADED_READ_BUFFER,
    SmallBufferWebSocketHandler,
    parse_request_headers,
)

# What pywsgi reads a request through (`makefile("rb", -1)`), buffer included.
DEFAULT_READER = sys.getsizeof(io.BufferedReader(io.BytesIO(), io.DEFAULT_BUFFER_SIZE))


def echo(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """Echo websocket messages; note the size of the reader each connection kept."""
    ws = environ.get("wsgi.websocket")
    if ws is None:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [b"plain"]
    kept_headers.append("headers" in vars(ws.handler))
    while (message := ws.receive()) is not None:
        if not readers:  # the reader is chosen at the first read (the 101 goes out then)
            readers.append(sys.getsizeof(environ["wsgi.input"]))
        ws.send(message)
    return []


readers: list[int] = []
kept_headers: list[bool] = []


@pytest.fixture
def server() -> Iterator[pywsgi.WSGIServer]:
    readers.clear()
    kept_headers.clear()
    server = pywsgi.WSGIServer(
        ("127.0.0.1", 0), echo, handler_class=SmallBufferWebSocketHandler, log=None
    )
    server.start()
    yield server
    server.stop(timeout=1)


def handshake() -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def frame(text: str) -> bytes:
    """A masked text frame, as a client sends it."""
    payload = text.encode()
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x81, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x81, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x81, 0x80 | 127, n)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def read_exactly(sock: gsocket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "connection closed"
        data += chunk
    return data


def read_message(sock: gsocket.socket) -> str:
    """One unmasked text frame from the server."""
    _, length = read_exactly(sock, 2)
    if length == 126:
        (length,) = struct.unpack("!H", read_exactly(sock, 2))
    elif length == 127:
        (length,) = struct.unpack("!Q", read_exactly(sock, 8))
    return read_exactly(sock, length).decode()


def read_response_head(sock: gsocket.socket) -> bytes:
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += read_exactly(sock, 1)
    return head


def connect(server: pywsgi.WSGIServer, first: bytes = b"") -> gsocket.socket:
    sock = gsocket.create_connection(server.address, timeout=5)
    sock.sendall(handshake() + first)
    assert read_response_head(sock).startswith(b"HTTP/1.1 101")
    return sock


def test_an_upgraded_connection_is_read_through_a_small_buffer(
    server: pywsgi.WSGIServer,
) -> None:
    sock = connect(server)
    try:
        messages = ["42", "x" * 300, "y" * (UPGRADED_READ_BUFFER * 3), "z" * 70_000]
        for message in messages:
            sock.sendall(frame(message))
            assert read_message(sock) == message
        # Several frames in one segment, split across the small buffer's edges.
        burst = [f'42["subscribe",{{"topic":"public.{i}"}}]' for i in range(40)]
        sock.sendall(b"".join(frame(message) for message in burst))
        assert [read_message(sock) for _ in burst] == burst
    finally:
        sock.close()
    assert readers and readers[0] < DEFAULT_READER - 4096
    assert kept_headers == [False]  # the parsed request is not kept either


def test_bytes_sent_along_with_the_handshake_are_kept(server: pywsgi.WSGIServer) -> None:
    # A client must wait for the 101 before sending a frame; one that does
    # not keeps the request's reader (and loses nothing).
    sock = connect(server, first=frame("early"))
    try:
        assert read_message(sock) == "early"
        sock.sendall(frame("later"))
        assert read_message(sock) == "later"
    finally:
        sock.close()
    assert readers and readers[0] >= DEFAULT_READER - 512


def test_plain_http_is_served_as_before(server: pywsgi.WSGIServer) -> None:
    sock = gsocket.create_connection(server.address, timeout=5)
    try:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    finally:
        sock.close()
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"plain")


# -- request headers ---------------------------------------------------------------------------

header_lines = st.lists(
    st.one_of(
        # Plain lines, as every client sends them.
        st.tuples(
            st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1).filter(
                lambda name: ":" not in name
            ),
            st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF)),
        ).map(lambda pair: f"{pair[0]}: {pair[1]}\r\n".encode("latin-1")),
        # Anything else: folded lines, bare CRs, odd names, missing colons.
        st.binary(max_size=40).map(lambda raw: raw.replace(b"\n", b"") + b"\r\n"),
        st.sampled_from([b" folded\r\n", b"\tfolded\r\n", b"From x\r\n", b": x\r\n", b"a:b\n"]),
    ),
    max_size=8,
)


@given(header_lines, st.sampled_from([b"\r\n", b"\n", b"", b"Host: cut"]))
def test_request_headers_parse_as_gevents_own_parser_does(lines: list[bytes], end: bytes) -> None:
    raw = b"".join(lines) + end
    ours = parse_request_headers(io.BytesIO(raw))
    theirs = pywsgi.headers_factory(io.BytesIO(raw))
    assert ours._headers == theirs._headers
    assert ours.status == theirs.status
    assert list(ours.headers) == list(theirs.headers)


def test_plain_request_headers_skip_the_email_parser() -> None:
    raw = handshake()[handshake().index(b"\r\n") + 2 :]
    message = parse_request_headers(io.BytesIO(raw))
    assert message.get("upgrade") == "websocket" and message.typeheader is None
    assert message.defects == [] and message.get_payload() is None  # built directly


def test_overlong_header_lines_are_refused_as_before() -> None:
    raw = b"X-Long: " + b"x" * 70_000 + b"\r\n\r\n"
    assert parse_request_headers(io.BytesIO(raw)).status == "Line too long"


# -- handing a websocket over ------------------------------------------------------------------


def test_only_a_plain_gevent_socket_is_handed_over_with_what_was_read() -> None:
    class Wrapped(gsocket.socket):  # as gevent's SSLSocket subclasses it
        pass

    server = SimpleNamespace(pool=None)
    with Wrapped() as tls:
        handler = SmallBufferWebSocketHandler(tls, ("127.0.0.1", 1), server)
        handler.environ = {"wsgi.websocket": SimpleNamespace()}
        assert handler.detach_websocket() is None
    ours, peer = gsocket.socketpair()
    handler = SmallBufferWebSocketHandler(ours, ("127.0.0.1", 1), server)
    handler.environ = {"wsgi.websocket": SimpleNamespace()}
    peer.sendall(b"early frame")
    taken = handler.detach_websocket()
    assert taken is not None
    fd, answer, early, pool = taken
    assert early == b"early frame" and pool is None and handler.socket is None
    assert answer == b""  # no start_response here: nothing to answer
    assert handler.environ["wsgi.websocket"].closed  # no close frame from the handler
    ours.close()  # the gevent socket no longer owns the descriptor
    os.write(fd, b"still open")
    assert peer.recv(100) == b"still open"
    os.close(fd)
    peer.close()
