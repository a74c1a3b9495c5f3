"""Fan-out: frames, partial sends, order and bounds over real engine.io websockets and TCP.

Each connection is a real websocket upgrade served as the worker serves it
(`tests.websocket_support.Harness`: gevent's pywsgi with the worker's
handler, `webapp.websockets` taking the socket over), in greenlets of this
thread; the test holds the browser's end.
"""

from __future__ import annotations

import json
import logging
import socket
import struct
from collections.abc import Iterator

import engineio.socket
import gevent
import pytest
import redis
from engineio import packet as eio_packet
from websocket import ABNF

from tests.support import forwarded_message
from tests.websocket_support import Harness, parse, settle
from tidings.keys import history_key
from webapp import backpressure, fanout
from webapp import queue as queue_module
from webapp import transport as transport_module
from webapp.routing import Route

ROOM = "t:public.x"


def publish(harness: Harness, n: int, size: int = 10) -> None:
    """Emit one publication locally, as the catch-up does; the emit must never block."""
    pub = {"topic": "public.x", "offset": f"1-{n}", "data": {"n": n, "pad": "x" * size}}
    with gevent.Timeout(2):  # a blocking send would park this greenlet here
        harness.manager.emit("publications", [pub], namespace="/", room=ROOM, ignore_queue=True)


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


def test_an_idle_connection_gets_the_frame_directly_as_engine_io_s_packets_come(
    harness: Harness,
) -> None:
    conn = harness.connect(room=ROOM)
    for size in (10, 200, 70_000):  # the three length encodings
        publish(harness, size, size)
    assert harness.queued == []
    assert conn.transport.backlog is None  # the kernel took each at once
    direct = conn.take(3)
    # The same publications through engine.io's `Socket.send` (what acks take).
    for size in (10, 200, 70_000):
        pub = {"topic": "public.x", "offset": f"1-{size}", "data": {"n": size, "pad": "x" * size}}
        text = '2["publications",' + json.dumps([pub], separators=(",", ":")) + "]"
        conn.eio.send(eio_packet.Packet(eio_packet.MESSAGE, text))
    assert [f.data for f in direct] == [f.data for f in conn.take(3)]


def test_a_partial_send_leaves_the_rest_in_the_backlog_without_blocking(
    harness: Harness,
) -> None:
    conn = harness.connect(small_buffers=True, room=ROOM)
    publish(harness, 0, 1_000_000)  # far more than the kernel buffers hold
    transport = conn.transport
    assert harness.queued == [] and transport.backlogged == 1
    assert 0 < transport.pending_bytes < 1_000_100 and transport.writer is not None
    publish(harness, 1)  # the rest waits for the kernel: this one waits behind it
    publish(harness, 2)
    assert transport.backlogged == 3 and harness.queued == []
    assert conn.numbers(3) == [0, 1, 2]
    settle(lambda: transport.backlog is None)
    assert transport.writer is None and transport.pending_bytes == 0
    publish(harness, 3)  # idle again: straight to the kernel
    assert conn.numbers(1) == [3]


def test_clients_behind_a_backlog_share_one_frame(harness: Harness) -> None:
    # Stalled clients of a flooded topic hold the same frames, not a copy each.
    one = harness.connect(small_buffers=True, room=ROOM)
    two = harness.connect(small_buffers=True, room=ROOM)
    publish(harness, 0, 1_000_000)
    publish(harness, 1, 1_000_000)  # both are behind now
    (rest_one, _), (next_one, _) = one.transport.backlog  # type: ignore[misc]
    (rest_two, _), (next_two, _) = two.transport.backlog  # type: ignore[misc]
    assert rest_one.obj is rest_two.obj  # the rests of frame 0: views of the one frame
    assert next_one is next_two and len(next_one) > 1_000_000
    assert one.transport.pending_bytes == len(rest_one) + len(next_one)
    assert one.numbers(2) == [0, 1] and two.numbers(2) == [0, 1]


def test_order_is_kept_behind_a_backlog(harness: Harness) -> None:
    conn = harness.connect(small_buffers=True, room=ROOM)
    other = harness.connect(room=ROOM)
    for n in range(200):  # the slow one falls behind; the other keeps up
        publish(harness, n, 5000)
    assert conn.transport.backlogged and harness.queued == []
    assert other.numbers(200) == list(range(200))
    assert conn.numbers(200) == list(range(200))


def test_a_packet_sent_through_engine_io_first_goes_first(harness: Harness) -> None:
    conn = harness.connect(small_buffers=True, room=ROOM)
    publish(harness, 0, 1_000_000)  # a backlog
    earlier = eio_packet.Packet(eio_packet.MESSAGE, '2["publications",[{"data":{"n":-1}}]]')
    harness.server._send_eio_packet(conn.eio_sid, earlier)  # an emit to the sid, say
    publish(harness, 1)
    assert conn.numbers(3) == [0, -1, 1]


def test_the_bounds_cut_a_client_that_stopped_reading() -> None:
    harness = Harness(max_bytes=100_000)
    try:
        stalled = harness.connect(small_buffers=True, room=ROOM)
        healthy = harness.connect(room=ROOM)
        stalled_eio = stalled.eio
        for n in range(100):
            publish(harness, n, 5000)
        settle(lambda: harness.cuts == [stalled.eio_sid])
        settle(lambda: stalled_eio.closed)
        assert stalled.eio_sid not in harness.server.eio.sockets
        assert healthy.numbers(100) == list(range(100))
        # What went out before the cut is in order (the frame being written
        # when the socket was closed ends short), then the connection ends.
        frames = stalled.until_closed()
        numbers = [json.loads(f.data[2:])[1][0]["data"]["n"] for f in frames]
        assert numbers == list(range(len(numbers))) and len(numbers) < 100
    finally:
        harness.close()


def test_a_cut_client_that_does_not_read_on_is_reset_after_the_drain_time(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(backpressure, "DRAIN_SECONDS", 0.3)
    harness = Harness(max_bytes=100_000)
    try:
        # A small window: what the client does not read stays in the server's
        # send buffer, unacknowledged, as for a slow client far away.
        stalled = harness.connect(receive_buffer=4096, room=ROOM)
        transport = stalled.transport
        with caplog.at_level(logging.INFO, logger="tidings.backpressure"):
            for n in range(1000):
                publish(harness, n, 5000)
                if harness.cuts:
                    break
            settle(lambda: harness.cuts == [stalled.eio_sid])
            settle(lambda: "bytes more in the kernel" in caplog.text)
            # The log says what the kernel still held for the client, a number.
            line = next(
                r.getMessage() for r in caplog.records if "slow client cut" in r.getMessage()
            )
            held = int(line.rsplit(", ", 1)[1].split()[0])
            assert held > 0
            assert transport.state == transport_module.CLOSED
            # Unread past the drain time: reset, not a FIN behind megabytes.
            settle(lambda: "after the cut; reset" in caplog.text)
        with pytest.raises(ConnectionResetError), gevent.Timeout(10):
            while stalled.sock.recv(65536):
                pass
    finally:
        harness.close()


def test_a_failed_send_drops_the_connection_quietly(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    gone = harness.connect(room=ROOM)
    other = harness.connect(room=ROOM)
    gone_eio = gone.eio
    # The client resets the connection; the worker has not noticed yet.
    gone.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    gone.sock.close()
    with caplog.at_level(logging.DEBUG):
        publish(harness, 0)
        publish(harness, 1)
        settle(lambda: gone_eio.closed)
    assert gone.eio_sid not in harness.server.eio.sockets
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]
    assert any("websocket failed" in r.getMessage() for r in caplog.records)
    assert other.numbers(2) == [0, 1]


def test_connections_that_are_not_upgraded_websockets_take_the_queue(harness: Harness) -> None:
    polling = engineio.socket.Socket(harness.server.eio, "polling")
    harness.server.eio.sockets["polling"] = polling
    sid = harness.manager.connect("polling", "/")
    harness.manager.enter_room(sid, "/", ROOM)
    publish(harness, 0)
    assert harness.queued == ["polling"]
    assert polling.queue.get(block=False).data.startswith('2["publications"')


def test_callbacks_and_binary_data_take_python_socketio_s_path(harness: Harness) -> None:
    conn = harness.connect(room=ROOM)
    harness.manager.emit(
        "ev", 1, namespace="/", room=conn.sid, callback=lambda *a: None, ignore_queue=True
    )
    harness.manager.emit("ev", b"\x01\x02", namespace="/", room=ROOM, ignore_queue=True)
    ack, placeholder, attachment = conn.take(3)
    assert ack.data == b'421["ev",1]'
    assert placeholder.data.startswith(b"451-") and placeholder.opcode == ABNF.OPCODE_TEXT
    assert (attachment.opcode, attachment.data) == (ABNF.OPCODE_BINARY, b"\x01\x02")


def test_routed_messages_go_out_directly_framed_from_the_bytes_and_are_counted(
    redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    harness = Harness(history=redis_client)
    try:
        conn = harness.connect(room=ROOM)
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
        (frame,) = conn.take(1)
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
        conn = harness.connect(room=ROOM)
        harness.manager.note_offset("public.x", "0-0")  # the room saw the topic empty
        for n in range(3):
            redis_client.xadd(history_key("public.x"), {"d": json.dumps({"n": n})})
        harness.manager._catch_up([Route("public.x")])
        assert harness.queued == []
        assert conn.numbers(1) == [0, 1, 2]
    finally:
        harness.close()


def test_a_connection_with_its_ping_overdue_is_left_to_engine_io(harness: Harness) -> None:
    conn = harness.connect(room=ROOM)
    eio = conn.eio
    eio.last_ping = 1.0  # a PING sent long ago, never answered
    publish(harness, 0)
    assert harness.queued == [conn.eio_sid]  # engine.io's send closed it instead
    assert eio.closed
