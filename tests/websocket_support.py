"""Websockets for unit tests: a browser's end, and a real server served as the worker does.

`Harness` runs python-socketio (gevent mode, Tidings' queue manager, bounded
backlogs) under gevent's pywsgi with the worker's handler and server class,
in greenlets of the test's thread (no monkeypatching); `Harness.connect`
makes a real HTTP upgrade over loopback TCP, which `webapp.websockets`
takes over. Clients speak raw Engine.IO v4 / Socket.IO v5 frames.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import engineio.socket
import gevent
import gevent.socket
import redis
import socketio
from engineio import packet as eio_packet
from gevent.pool import Pool
from websocket import ABNF
from websocket._abnf import frame_buffer

from webapp import backpressure, pings, websockets
from webapp.queue import QueueManager
from webapp.worker import SmallBufferWebSocketHandler, WebSocketServer

TEXT, BINARY, CLOSE, PING, PONG = 0x1, 0x2, 0x8, 0x9, 0xA


def settle(condition: Callable[[], Any], timeout: float = 5) -> None:
    """Yield to the hub until `condition` holds (time.sleep would block every greenlet)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        gevent.sleep(0.005)


def client_frame(
    payload: bytes | str,
    opcode: int = TEXT,
    *,
    fin: bool = True,
    rsv: int = 0,
    masked: bool = True,
    length: int | None = None,
) -> bytes:
    """One frame as a client sends it (masked); `length` overrides the announced size."""
    data = payload.encode() if isinstance(payload, str) else payload
    size = len(data) if length is None else length
    first = (0x80 if fin else 0) | rsv << 4 | opcode
    bit = 0x80 if masked else 0
    if size < 126:
        head = struct.pack("!BB", first, bit | size)
    elif size < 65536:
        head = struct.pack("!BBH", first, bit | 126, size)
    else:
        head = struct.pack("!BBQ", first, bit | 127, size)
    if not masked:
        return head + data
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data))


class Incomplete(Exception):
    """The bytes end inside a frame."""


def parse_prefix(data: bytes) -> tuple[list[ABNF], int]:
    """Decode the whole server frames at the start of `data`; return them and their length."""
    view = memoryview(data)
    offset = 0

    def recv(n: int) -> bytes:
        nonlocal offset
        chunk = bytes(view[offset : offset + n])
        if len(chunk) < n:
            raise Incomplete
        offset += n
        return chunk

    frames = frame_buffer(recv, skip_utf8_validation=False)
    out: list[ABNF] = []
    consumed = 0
    while consumed < len(data):
        try:
            out.append(frames.recv_frame())
        except Incomplete:
            break
        consumed = offset
    return out, consumed


def parse(data: bytes, *, whole_only: bool = False) -> list[ABNF]:
    """Decode server frames with websocket-client's parser (`whole_only`: drop a cut tail)."""
    frames, consumed = parse_prefix(data)
    if consumed < len(data) and not whole_only:
        raise Incomplete
    return frames


def handshake(path: str) -> bytes:
    """A websocket upgrade request for `path`."""
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def read_head(sock: Any) -> tuple[bytes, bytes]:
    """Read an HTTP response head; return it and whatever came after it."""
    data = b""
    with gevent.Timeout(10):
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            assert chunk, "closed before the response"
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


class Browser:
    """The client's end of one TCP connection (a gevent socket: reading yields to the hub)."""

    def __init__(self, sock: Any, received: bytes = b"") -> None:
        self.sock = sock
        self.received = received

    def send(self, data: bytes) -> None:
        """Send raw bytes."""
        self.sock.sendall(data)

    def send_text(self, text: str) -> None:
        """Send one masked text frame."""
        self.sock.sendall(client_frame(text))

    def take(self, count: int, timeout: float = 10) -> list[ABNF]:
        """Read and consume the next `count` frames."""
        with gevent.Timeout(timeout):
            while True:
                frames, _ = parse_prefix(self.received)
                if len(frames) >= count:
                    used = 0
                    for _ in range(count):
                        used += _frame_length(self.received[used:])
                    self.received = self.received[used:]
                    return frames[:count]
                chunk = self.sock.recv(65536)
                assert chunk, f"connection closed after {len(frames)} frames"
                self.received += chunk

    def texts(self, count: int, timeout: float = 10) -> list[str]:
        """Read and consume `count` frames; return their payloads as text."""
        return [f.data.decode() for f in self.take(count, timeout)]

    def until_closed(self, timeout: float = 10) -> list[ABNF]:
        """Read to the end of the stream; return the whole frames received and not taken."""
        with gevent.Timeout(timeout):
            while True:
                try:
                    chunk = self.sock.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                self.received += chunk
        return parse(self.received, whole_only=True)

    def close(self) -> None:
        """Close the client's socket."""
        self.sock.close()


def _frame_length(data: bytes) -> int:
    """Return the length of the first (unmasked) server frame in `data`."""
    size = data[1] & 0x7F
    if size == 126:
        return 4 + struct.unpack("!H", data[2:4])[0]
    if size == 127:
        return 10 + struct.unpack("!Q", data[2:10])[0]
    return 2 + size


class Client(Browser):
    """A Socket.IO client on a websocket of the harness's server."""

    eio_sid: str
    sid: str | None

    def __init__(self, harness: Harness, sock: Any, received: bytes) -> None:
        super().__init__(sock, received)
        self.harness = harness
        self.sid = None

    @property
    def eio(self) -> engineio.socket.Socket:
        """The engine.io socket on the server."""
        return self.harness.server.eio.sockets[self.eio_sid]

    @property
    def transport(self) -> websockets.EngineWebSocket:
        """The server's transport of this connection."""
        found = websockets.transport_of(self.eio)
        assert found is not None
        return found

    def numbers(self, count: int) -> list[int]:
        """Read `count` publications events; return their `n`s in arrival order."""
        out = []
        for text in self.texts(count):
            assert text.startswith("42"), text
            event, publications = json.loads(text[2:])
            assert event == "publications"
            out += [p["data"]["n"] for p in publications]
        return out


class Harness:
    """A python-socketio server (gevent mode, Tidings' manager, bounded backlogs) on loopback."""

    def __init__(
        self,
        *,
        history: redis.Redis | None = None,
        max_packets: int = 1000,
        max_bytes: int = 64 * 1024 * 1024,
        limit: int = 16384,
        pool: int = 1000,
        queue: bool = True,
    ) -> None:
        # Tidings' queue manager (emits go to Redis unless `ignore_queue`), or
        # python-socketio's local one.
        self.manager = (
            QueueManager(
                "redis://127.0.0.1:1/0",
                history=history,  # type: ignore[arg-type]
                history_size=100,
            )
            if queue
            else socketio.Manager()
        )
        self.server = socketio.Server(
            async_mode="gevent", client_manager=self.manager, max_http_buffer_size=limit
        )
        # No message-queue loop: these tests emit locally (and its reconnect
        # backoff would sleep the unpatched thread).
        self.server.manager_initialized = True
        pings.install()  # as the app does: one ping loop, not a greenlet per connection
        self.cuts: list[str] = []
        backpressure.install(
            self.server, max_packets=max_packets, max_bytes=max_bytes, on_cut=self.cuts.append
        )
        # Which connections took engine.io's queue instead of their transport.
        self.queued: list[str] = []
        send = self.server._send_eio_packet

        def spy(eio_sid: str, pkt: eio_packet.Packet) -> None:
            self.queued.append(eio_sid)
            send(eio_sid, pkt)

        self.server._send_eio_packet = spy
        self.wsgi = WebSocketServer(
            ("127.0.0.1", 0),
            socketio.WSGIApp(self.server),
            spawn=Pool(pool),
            handler_class=SmallBufferWebSocketHandler,
            log=None,
        )
        self.wsgi.start()
        self.address = self.wsgi.address
        self.clients: list[Client] = []

    def connect(
        self,
        *,
        small_buffers: bool = False,
        namespace: bool = True,
        room: str | None = None,
        receive_buffer: int | None = None,
    ) -> Client:
        """Open a websocket, read the OPEN packet, and join namespace `/` (and `room`).

        `receive_buffer` sets the client's alone: the server's send buffer
        then holds what the client does not read (unacknowledged).
        """
        sock = gevent.socket.socket()
        if small_buffers:
            # The kernel holds only some 100 KiB for a client that does not
            # read. (Set before connecting: a receive buffer shrunk later
            # leaves loopback TCP crawling through zero-window probes.)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        elif receive_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.connect(self.address)
        sock.sendall(handshake("/socket.io/?EIO=4&transport=websocket"))
        head, rest = read_head(sock)
        assert head.startswith(b"HTTP/1.1 101"), head
        client = Client(self, sock, rest)
        (opening,) = client.texts(1)
        assert opening.startswith("0{"), opening
        client.eio_sid = json.loads(opening[1:])["sid"]
        if small_buffers:
            client.transport.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        if namespace:
            client.send_text("40")
            (answer,) = client.texts(1)
            assert answer.startswith("40{"), answer
            client.sid = json.loads(answer[2:])["sid"]
            if room is not None:
                self.server.enter_room(client.sid, room)
        self.clients.append(client)
        return client

    def close(self) -> None:
        """Close every client, then the server."""
        for client in self.clients:
            client.close()
        self.wsgi.stop(timeout=1)
