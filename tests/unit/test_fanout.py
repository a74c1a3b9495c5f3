"""Direct fan-out: frames, partial sends, order and bounds over real engine.io and TCP.

Each connection here is engine.io's own websocket handler over gevent-websocket
on a loopback TCP connection, run in greenlets of this thread (gevent's own
sockets and queues, no monkeypatching); the test holds the browser's end.
"""

from __future__ import annotations

import json
import logging
import socket
import struct
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import engineio.socket
import gevent
import gevent.socket
import pytest
import redis
import socketio
from engineio import packet as eio_packet
from geventwebsocket.websocket import Stream, WebSocket
from websocket import ABNF
from websocket._abnf import frame_buffer

from tests.support import forwarded_message
from tidings.keys import history_key
from webapp import backpressure, fanout
from webapp import queue as queue_module
from webapp.queue import QueueManager
from webapp.routing import Route

ROOM = "t:public.x"


def settle(condition: Callable[[], Any], timeout: float = 5) -> None:
    """Yield to the hub until `condition` holds (time.sleep would block every greenlet)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        gevent.sleep(0.005)


class Incomplete(Exception):
    """The bytes end inside a frame."""


def parse(data: bytes, *, whole_only: bool = False) -> list[ABNF]:
    """Decode `data` with websocket-client's frame parser (`whole_only`: drop a cut tail)."""
    view = memoryview(data)
    offset = 0

    def recv(n: int) -> bytes:
        nonlocal offset
        chunk = bytes(view[offset : offset + n])
        if not chunk:
            raise Incomplete
        offset += len(chunk)
        return chunk

    frames = frame_buffer(recv, skip_utf8_validation=False)
    out = []
    while offset < len(data):
        try:
            out.append(frames.recv_frame())
        except Incomplete:
            if whole_only:
                break
            raise
    return out


class Conn:
    """One upgraded connection in a room; `client` is the browser's end of its TCP connection."""

    def __init__(self, harness: Harness, eio_sid: str, *, small_buffers: bool) -> None:
        self.eio_sid = eio_sid
        self.client = gevent.socket.socket()
        if small_buffers:
            # The kernel holds only some 100 KiB for a client that does not
            # read. (Set before connecting: a receive buffer shrunk later
            # leaves loopback TCP crawling through zero-window probes.)
            self.client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        self.client.connect(harness.address)
        server_end, _ = harness.listener.accept()
        if small_buffers:
            server_end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        self.server_end = server_end
        handler = SimpleNamespace(
            socket=server_end,
            rfile=server_end.makefile("rb"),
            server=SimpleNamespace(application=None),
            logger=logging.getLogger("geventwebsocket"),
        )
        websocket = WebSocket({}, Stream(handler), handler)
        self.sock = engineio.socket.Socket(harness.server.eio, eio_sid)
        harness.server.eio.sockets[eio_sid] = self.sock
        self.task = gevent.spawn(
            self.sock._upgrade_websocket, {"wsgi.websocket": websocket}, lambda *a: None
        )
        self.sid = harness.manager.connect(eio_sid, "/")
        harness.manager.enter_room(self.sid, "/", ROOM)
        settle(self.parked)
        self.received = b""

    def parked(self) -> bool:
        """Tell whether the writer waits on an empty queue."""
        return self.sock.queue.waiting == 1 and not self.sock.queue.qsize()

    @property
    def direct(self) -> fanout.Direct:
        return self.sock.tidings_direct

    def read(self, frames: int, timeout: float = 10) -> list[ABNF]:
        """Read until `frames` whole frames arrived; return all frames received so far."""
        with gevent.Timeout(timeout):
            while True:
                try:
                    parsed = parse(self.received)
                except Incomplete:
                    parsed = []
                if len(parsed) >= frames:
                    return parsed
                chunk = self.client.recv(65536)
                assert chunk, "connection closed"
                self.received += chunk

    def numbers(self, frames: int) -> list[int]:
        """Read `frames` publications events; return their `n`s in arrival order."""
        out = []
        for frame in self.read(frames):
            text = frame.data.decode()
            assert text.startswith("42"), text
            event, publications = json.loads(text[2:])
            assert event == "publications"
            out += [p["data"]["n"] for p in publications]
        return out


class Harness:
    """A QueueManager-backed Socket.IO server in gevent mode with bounded queues."""

    def __init__(
        self,
        *,
        history: redis.Redis | None = None,
        max_packets: int = 1000,
        max_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        self.manager = QueueManager(
            "redis://127.0.0.1:1/0",
            history=history,  # type: ignore[arg-type]
            history_size=100,
        )
        self.server = socketio.Server(async_mode="gevent", client_manager=self.manager)
        self.cuts: list[str] = []
        backpressure.install(
            self.server, max_packets=max_packets, max_bytes=max_bytes, on_cut=self.cuts.append
        )
        # Which connections took engine.io's queue instead of a direct write.
        self.queued: list[str] = []
        send = self.server._send_eio_packet

        def spy(eio_sid: str, pkt: eio_packet.Packet) -> None:
            self.queued.append(eio_sid)
            send(eio_sid, pkt)

        self.server._send_eio_packet = spy
        self.listener = gevent.socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.address = self.listener.getsockname()
        self.conns: list[Conn] = []

    def connect(self, *, small_buffers: bool = False) -> Conn:
        conn = Conn(self, f"eio{len(self.conns)}", small_buffers=small_buffers)
        self.conns.append(conn)
        return conn

    def publish(self, n: int, size: int = 10) -> None:
        """Emit one publication locally, as the catch-up does; the emit must never block."""
        pub = {"topic": "public.x", "offset": f"1-{n}", "data": {"n": n, "pad": "x" * size}}
        with gevent.Timeout(2):  # a blocking send would park this greenlet here
            self.manager.emit("publications", [pub], namespace="/", room=ROOM, ignore_queue=True)

    def close(self) -> None:
        for conn in self.conns:
            conn.client.close()
        gevent.joinall([c.task for c in self.conns], timeout=5)
        gevent.killall([c.task for c in self.conns])
        for conn in self.conns:
            conn.server_end.close()
        self.listener.close()


@pytest.fixture
def harness() -> Iterator[Harness]:
    made = Harness()
    yield made
    made.close()


@pytest.mark.parametrize(
    ("text", "header"),
    [
        ("", b"\x81\x00"),
        ("a" * 125, b"\x81\x7d"),
        ("a" * 126, b"\x81\x7e" + struct.pack("!H", 126)),
        ("é" * 70, b"\x81\x7e" + struct.pack("!H", 140)),  # 70 characters, 140 bytes
        ("a" * 65535, b"\x81\x7e\xff\xff"),
        ("a" * 65536, b"\x81\x7f" + struct.pack("!Q", 65536)),
        ("€" * 30000, b"\x81\x7f" + struct.pack("!Q", 90000)),
    ],
)
def test_a_text_frame_has_the_shortest_length_encoding(text: str, header: bytes) -> None:
    frame = fanout.text_frame(text)
    assert frame == header + text.encode()
    [decoded] = parse(frame)
    assert (decoded.fin, decoded.opcode, decoded.mask_value) == (1, ABNF.OPCODE_TEXT, 0)
    assert decoded.data.decode() == text


def test_an_idle_connection_gets_the_frame_directly_and_as_gevent_websocket_frames_it(
    harness: Harness,
) -> None:
    conn = harness.connect()
    for size in (10, 200, 70_000):  # the three length encodings
        harness.publish(size, size)
    assert harness.queued == []
    assert conn.parked()  # the writer never woke up
    direct = conn.read(3)
    # The same publications through engine.io's writer (gevent-websocket frames them).
    conn.received = b""
    conn.sock.queue.put(eio_packet.Packet(eio_packet.NOOP))  # the writer has work now
    for size in (10, 200, 70_000):
        harness.publish(size, size)
    noop, *queued = conn.read(4)
    assert noop.data == b"6" and len(harness.queued) == 3
    assert [f.data for f in direct] == [f.data for f in queued]


def test_a_partial_send_hands_the_rest_to_the_writer_without_blocking(harness: Harness) -> None:
    conn = harness.connect(small_buffers=True)
    harness.publish(0, 1_000_000)  # far more than the kernel buffers hold
    queue = conn.sock.queue
    assert harness.queued == [] and conn.direct.busy
    assert queue.qsize() == 1 and 0 < queue.pending_bytes < 1_000_100
    harness.publish(1)  # the rest is in flight: this one queues behind it
    harness.publish(2)
    assert harness.queued == [conn.eio_sid] * 2
    assert conn.numbers(3) == [0, 1, 2]
    settle(conn.parked)
    assert not conn.direct.busy and queue.pending_bytes == 0
    harness.publish(3)  # idle again: direct
    assert len(harness.queued) == 2
    assert conn.numbers(4)[3:] == [3]


def test_clients_behind_a_backlog_share_one_frame_and_it_is_counted(harness: Harness) -> None:
    # Stalled clients of a flooded topic hold the same frames, not a copy each.
    one = harness.connect(small_buffers=True)
    two = harness.connect(small_buffers=True)
    harness.publish(0, 1_000_000)
    harness.publish(1, 1_000_000)  # both are busy now: queued
    (rest_one, next_one), (rest_two, next_two) = one.sock.queue.queue, two.sock.queue.queue
    assert rest_one.data.obj is rest_two.data.obj  # the rests of frame 0: views of it
    assert next_one is next_two and isinstance(next_one, fanout.Preframed)
    assert one.sock.queue.pending_bytes == len(rest_one.data) + len(next_one.data)
    assert len(next_one.data) > 1_000_000
    assert one.numbers(2) == [0, 1] and two.numbers(2) == [0, 1]


def test_order_is_kept_behind_a_backlog(harness: Harness) -> None:
    conn = harness.connect(small_buffers=True)
    other = harness.connect()
    for n in range(200):  # the slow one falls behind; the other stays direct
        harness.publish(n, 5000)
    assert conn.eio_sid in harness.queued and other.eio_sid not in harness.queued
    assert other.numbers(200) == list(range(200))
    assert conn.numbers(200) == list(range(200))


def test_a_packet_queued_before_the_writer_ran_goes_first(harness: Harness) -> None:
    conn = harness.connect()
    earlier = eio_packet.Packet(eio_packet.MESSAGE, '2["publications",[{"data":{"n":-1}}]]')
    harness.server._send_eio_packet(conn.eio_sid, earlier)  # the writer has not run yet
    harness.publish(0)
    assert harness.queued == [conn.eio_sid] * 2
    assert conn.numbers(2) == [-1, 0]


def test_the_bounds_still_cut_a_client_that_stopped_reading() -> None:
    harness = Harness(max_bytes=100_000)
    try:
        stalled = harness.connect(small_buffers=True)
        healthy = harness.connect()
        for n in range(100):
            harness.publish(n, 5000)
        settle(lambda: harness.cuts == [stalled.eio_sid])
        settle(lambda: stalled.sock.closed)
        assert healthy.numbers(100) == list(range(100))
        # What went out before the cut is in order (the frame being written
        # when the socket was shut down ends short), then the connection ends.
        with gevent.Timeout(5):
            while chunk := stalled.client.recv(65536):
                stalled.received += chunk
        frames = parse(stalled.received, whole_only=True)
        numbers = [json.loads(f.data[2:])[1][0]["data"]["n"] for f in frames]
        assert numbers == list(range(len(numbers))) and len(numbers) < 100
    finally:
        harness.close()


def test_a_failed_send_drops_the_connection_quietly(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    gone = harness.connect()
    other = harness.connect()
    # The client resets the connection; the worker has not noticed yet.
    gone.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    gone.client.close()
    with caplog.at_level(logging.DEBUG):
        harness.publish(0)
        harness.publish(1)
        settle(lambda: gone.sock.closed)
    assert harness.server.eio.sockets.get(gone.eio_sid) is None or gone.sock.closed
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]
    assert any("websocket send failed" in r.getMessage() for r in caplog.records)
    assert other.numbers(2) == [0, 1]


def test_connections_that_are_not_upgraded_websockets_take_the_queue(harness: Harness) -> None:
    polling = engineio.socket.Socket(harness.server.eio, "polling")
    harness.server.eio.sockets["polling"] = polling
    sid = harness.manager.connect("polling", "/")
    harness.manager.enter_room(sid, "/", ROOM)
    harness.publish(0)
    assert harness.queued == ["polling"]
    assert polling.queue.get(block=False).data.startswith('2["publications"')


def test_callbacks_and_binary_data_take_python_socketio_s_path(harness: Harness) -> None:
    conn = harness.connect()
    harness.manager.emit(
        "ev", 1, namespace="/", room=conn.sid, callback=lambda *a: None, ignore_queue=True
    )
    harness.manager.emit("ev", b"\x01\x02", namespace="/", room=ROOM, ignore_queue=True)
    ack, placeholder, attachment = conn.read(3)
    assert ack.data == b'421["ev",1]'
    assert placeholder.data.startswith(b"451-") and placeholder.opcode == ABNF.OPCODE_TEXT
    assert (attachment.opcode, attachment.data) == (ABNF.OPCODE_BINARY, b"\x01\x02")


def test_routed_messages_go_out_directly_framed_from_the_bytes_and_are_counted(
    redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    harness = Harness(history=redis_client)
    try:
        conn = harness.connect()
        raw = forwarded_message(redis_client, "public.x", [{"n": 7}])
        # The publications list is sliced out of the message, never decoded:
        # only the small `tidings` metadata is.
        decoded: list[str] = []
        real = queue_module._decode
        monkeypatch.setattr(queue_module, "_decode", lambda t: decoded.append(t) or real(t))
        monkeypatch.setattr(queue_module, "json", None)  # nothing else decodes
        harness.manager._deliver_routed("public.x", raw)
        assert decoded and not any('"offset"' in text for text in decoded)
        assert harness.queued == []
        (frame,) = conn.read(1)
        event, (pub,) = json.loads(frame.data.decode()[2:])
        assert event == "publications" and pub["data"] == {"n": 7}
        # Counted in the read's batch, written to the metrics once per read.
        batch = harness.manager.batch
        assert (batch.recipients, batch.bytes) == (1, len(frame.data))
        assert harness.manager._shown["public.x"][1] == pub["offset"]
    finally:
        harness.close()


def test_catch_up_replays_directly(redis_client: redis.Redis) -> None:
    harness = Harness(history=redis_client)
    try:
        conn = harness.connect()
        harness.manager.note_offset("public.x", "0-0")  # the room saw the topic empty
        for n in range(3):
            redis_client.xadd(history_key("public.x"), {"d": json.dumps({"n": n})})
        harness.manager._catch_up([Route("public.x")])
        assert harness.queued == []
        assert conn.numbers(1) == [0, 1, 2]
    finally:
        harness.close()


def test_a_writer_waiting_on_its_queue_is_counted(harness: Harness) -> None:
    conn = harness.connect()
    queue = conn.sock.queue
    assert queue.waiting == 1
    queue.put(eio_packet.Packet(eio_packet.NOOP))
    assert queue.waiting == 1 and queue.qsize() == 1  # not parked: it has work
    settle(conn.parked)
    with pytest.raises(gevent.queue.Empty):
        queue.get(block=False)
    assert queue.waiting == 1


def test_only_plain_gevent_sockets_are_written_directly(harness: Harness) -> None:
    class Wrapped(gevent.socket.socket):  # as gevent's SSLSocket subclasses it
        pass

    sock = engineio.socket.Socket(harness.server.eio, "tls")
    with Wrapped() as tls, socket.socket() as plain:
        assert fanout.attach(sock, SimpleNamespace(_sock=None), tls) is None
        assert fanout.attach(sock, SimpleNamespace(_sock=None), plain) is None
    assert sock.tidings_direct is None
