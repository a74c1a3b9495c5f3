"""Engine.IO websockets without greenlets: reading, the protocol, closes, upgrades, bounds.

Real websocket upgrades to python-socketio under gevent's pywsgi with the
worker's handler and server class (`tests.websocket_support.Harness`), over
loopback TCP, in greenlets of this thread.
"""

from __future__ import annotations

import gc
import json
import random
import socket
import struct
from collections.abc import Iterator
from typing import Any

import gevent
import gevent.socket
import greenlet
import pytest

from tests.websocket_support import (
    BINARY,
    CLOSE,
    PING,
    PONG,
    TEXT,
    Browser,
    Harness,
    client_frame,
    handshake,
    read_head,
    settle,
)
from tidings import metrics
from webapp import websockets

LIMIT = 4096


@pytest.fixture
def harness() -> Iterator[Harness]:
    made = Harness(limit=LIMIT, queue=False)
    made.events: list[tuple[str, Any]] = []  # type: ignore[misc]
    made.gone: list[tuple[str, str]] = []  # type: ignore[misc]

    def on_ev(sid: str, data: Any) -> Any:
        made.events.append((sid, data))  # type: ignore[attr-defined]
        return {"echo": data}

    made.server.on("ev", on_ev)
    made.server.on("disconnect", lambda sid, reason: made.gone.append((sid, reason)))  # type: ignore[attr-defined]
    yield made
    made.close()


def event(n: Any, ack: int | None = None) -> str:
    return "42" + ("" if ack is None else str(ack)) + json.dumps(["ev", n])


def close_status(frame: Any) -> int:
    assert frame.opcode == CLOSE
    return struct.unpack("!H", frame.data[:2])[0]


def test_events_cut_anywhere_reach_their_handler_in_order(harness: Harness) -> None:
    client = harness.connect()
    data = b"".join(client_frame(event(n, ack=n)) for n in range(50))
    rng = random.Random(7)
    at = 0
    while at < len(data):  # pieces of 1-40 bytes, each read apart
        size = rng.randint(1, 40)
        client.send(data[at : at + size])
        at += size
        gevent.sleep(0.001)
    acks = client.texts(50)
    assert acks == [f'43{n}[{{"echo":{n}}}]' for n in range(50)]
    assert [n for _, n in harness.events] == list(range(50))  # type: ignore[attr-defined]


def test_a_fragmented_message_with_a_ping_between_its_fragments(harness: Harness) -> None:
    client = harness.connect()
    text = event("fragmented", ack=1)
    client.send(client_frame(text[:5], TEXT, fin=False))
    client.send(client_frame(b"mid", PING))
    pong = client.take(1)[0]
    assert (pong.opcode, pong.data) == (PONG, b"mid")
    client.send(client_frame(text[5:9], 0, fin=False) + client_frame(text[9:], 0))
    assert client.texts(1) == ['431[{"echo":"fragmented"}]']


def test_a_pong_is_taken_in_the_hub_and_schedules_the_next_ping(harness: Harness) -> None:
    client = harness.connect()
    eio = client.eio
    eio.last_ping = 1e18  # a PING is awaited (and not overdue)
    client.send_text("3")
    settle(lambda: eio.last_ping is None)
    assert client.transport.inbox is None  # no greenlet was started for it


def test_the_close_handshake_is_answered_and_ends_the_session(harness: Harness) -> None:
    client = harness.connect()
    eio_sid, sid = client.eio_sid, client.sid
    client.send(client_frame(struct.pack("!H", 1001) + b"bye", CLOSE))
    (answer,) = client.until_closed()
    assert close_status(answer) == 1001
    settle(lambda: harness.gone)  # type: ignore[attr-defined]
    assert harness.gone == [(sid, "transport close")]  # type: ignore[attr-defined]
    assert eio_sid not in harness.server.eio.sockets
    assert eio_sid not in harness.server.environ


def test_a_server_disconnect_closes_the_websocket_after_what_it_sent(harness: Harness) -> None:
    client = harness.connect()
    harness.server.emit("last", 1, to=client.sid)
    harness.server.eio.disconnect(client.eio_sid)
    *texts, closing = client.until_closed()
    assert [t.data for t in texts] == [b'42["last",1]', b"1"]  # the event, engine.io's CLOSE
    assert close_status(closing) == 1000
    assert client.eio_sid not in harness.server.eio.sockets


@pytest.mark.parametrize("reset", [False, True])
def test_a_peer_that_vanishes_ends_the_session(harness: Harness, reset: bool) -> None:
    client = harness.connect()
    other = harness.connect()
    if reset:
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    settle(lambda: harness.gone)  # type: ignore[attr-defined]
    assert harness.gone == [(client.sid, "transport close")]  # type: ignore[attr-defined]
    assert client.eio_sid not in harness.server.eio.sockets
    other.send_text(event("still", ack=2))
    assert other.texts(1) == ['432[{"echo":"still"}]']


def test_an_oversized_message_is_refused_from_its_header(harness: Harness) -> None:
    client = harness.connect()
    other = harness.connect()
    before = metrics.LIMIT_HITS.labels("message_size")._value.get()
    head = client_frame(b"x" * (LIMIT + 1))[:8]  # the header and mask only
    client.send(head)
    (answer,) = client.until_closed()
    assert close_status(answer) == 1009
    assert metrics.LIMIT_HITS.labels("message_size")._value.get() == before + 1
    settle(lambda: harness.gone)  # type: ignore[attr-defined]
    other.send_text(event("x" * (LIMIT - 100), ack=3))  # under the limit: fine
    assert other.texts(1)[0].startswith("433")


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (client_frame("42", masked=False), 1002),
        (client_frame(b"\xff", TEXT), 1007),
        (client_frame("4", 0x3), 1002),
    ],
)
def test_a_protocol_error_closes_with_its_status(harness: Harness, data: bytes, code: int) -> None:
    client = harness.connect()
    client.send(data)
    (answer,) = client.until_closed()
    assert close_status(answer) == code
    settle(lambda: harness.gone)  # type: ignore[attr-defined]


def test_binary_messages_reach_engine_io(harness: Harness) -> None:
    got: list[Any] = []
    harness.server.on("bin", lambda sid, data: got.append(data))
    client = harness.connect()
    client.send_text('451-["bin",{"_placeholder":true,"num":0}]')
    client.send(client_frame(b"\x00\x01", BINARY))
    settle(lambda: got)
    assert got == [b"\x00\x01"]


def test_a_slow_connect_handler_holds_its_connection_s_later_messages_only(
    harness: Harness,
) -> None:
    order: list[str] = []

    def connect(sid: str, environ: dict[str, Any], auth: Any) -> None:
        if auth == {"slow": True}:
            order.append("slow connect")
            gevent.sleep(0.3)  # a Redis round trip, say
            order.append("slow connected")

    harness.server.on("connect", connect)
    slow = harness.connect(namespace=False)
    # The connect and an event in one read: the event waits for the connect.
    slow.send(client_frame('40{"slow":true}') + client_frame(event("after", ack=4)))
    settle(lambda: order == ["slow connect"])
    quick = harness.connect()  # meanwhile, another connection is served
    quick.send_text(event("quick", ack=5))
    assert quick.texts(1) == ['435[{"echo":"quick"}]']
    assert order == ["slow connect"]
    connected, ack = slow.texts(2)
    assert connected.startswith("40{") and ack == '434[{"echo":"after"}]'


def test_bytes_sent_with_the_request_are_read(harness: Harness) -> None:
    sock = gevent.socket.create_connection(harness.address)
    # A client that does not wait for the 101 (and the OPEN) before sending.
    sock.sendall(handshake("/socket.io/?EIO=4&transport=websocket") + client_frame("40"))
    head, rest = read_head(sock)
    assert head.startswith(b"HTTP/1.1 101")
    browser = Browser(sock, rest)
    opening, connected = browser.texts(2)
    assert opening.startswith("0{") and connected.startswith("40{")
    browser.close()


def test_an_idle_connection_holds_no_greenlet_and_a_slim_environ(harness: Harness) -> None:
    harness.connect()  # warm: the service task and the like start once

    def live_greenlets() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, greenlet.greenlet) and o)

    before = live_greenlets()
    clients = [harness.connect() for _ in range(50)]
    gevent.sleep(0.05)
    assert live_greenlets() - before <= 2
    for client in clients:
        transport = client.transport
        assert transport.writer is None and transport.backlog is None
        assert transport.inbox is None and transport.frames.buffered == 0
        environ = harness.server.environ[client.eio_sid]
        assert set(environ) <= set(websockets.ENVIRON_KEYS) and "REMOTE_ADDR" in environ
    # Values that repeat are one string for every connection, not a copy each.
    first, last = (harness.server.environ[c.eio_sid] for c in (clients[0], clients[-1]))
    for key in ("REMOTE_ADDR", "PATH_INFO", "SERVER_NAME", "REQUEST_METHOD"):
        assert first[key] is last[key], key


def test_worker_connections_still_bound_open_websockets() -> None:
    harness = Harness(pool=3, queue=False)
    try:
        first = [harness.connect() for _ in range(3)]
        waiting = gevent.socket.create_connection(harness.address)
        waiting.sendall(handshake("/socket.io/?EIO=4&transport=websocket"))
        with pytest.raises(gevent.Timeout), gevent.Timeout(0.3):
            waiting.recv(1)  # in the accept queue: the pool is full
        first[0].close()
        head, _ = read_head(waiting)  # a slot came free
        assert head.startswith(b"HTTP/1.1 101")
        waiting.close()
    finally:
        harness.close()


# -- upgrades from long-polling -----------------------------------------------------------------


def http(harness: Harness, method: str, path: str, body: bytes = b"") -> bytes:
    """One HTTP/1.1 request on a connection of its own; return the response body."""
    sock = gevent.socket.create_connection(harness.address)
    try:
        sock.sendall(
            f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + body
        )
        data = b""
        with gevent.Timeout(10):
            while chunk := sock.recv(65536):
                data += chunk
    finally:
        sock.close()
    head, _, payload = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return payload


def polling_session(harness: Harness) -> tuple[str, str]:
    """Connect by long-polling and join `/`; return the engine.io and Socket.IO sids."""
    opening = http(harness, "GET", "/socket.io/?EIO=4&transport=polling").decode()
    eio_sid = json.loads(opening[1:])["sid"]
    path = f"/socket.io/?EIO=4&transport=polling&sid={eio_sid}"
    http(harness, "POST", path, b"40")
    answer = http(harness, "GET", path).decode()
    assert answer.startswith("40{"), answer
    return eio_sid, json.loads(answer[2:])["sid"]


def upgrade(harness: Harness, eio_sid: str) -> Browser:
    sock = gevent.socket.create_connection(harness.address)
    sock.sendall(handshake(f"/socket.io/?EIO=4&transport=websocket&sid={eio_sid}"))
    head, rest = read_head(sock)
    assert head.startswith(b"HTTP/1.1 101"), head
    return Browser(sock, rest)


def test_an_upgrade_sends_what_polling_had_queued_first(harness: Harness) -> None:
    eio_sid, sid = polling_session(harness)
    harness.server.emit("queued", 1, to=sid)  # waits for the next poll
    ws = upgrade(harness, eio_sid)
    eio = harness.server.eio.sockets[eio_sid]
    ws.send_text("2probe")
    assert ws.texts(1) == ["3probe"]
    assert eio.upgrading and not eio.upgraded
    # What polling had queued is still there, behind the NOOP that ends a poll.
    harness.server.emit("queued", 2, to=sid)
    ws.send_text("5")
    assert ws.texts(3) == ['42["queued",1]', "6", '42["queued",2]']
    assert eio.upgraded and not eio.upgrading
    assert websockets.transport_of(eio) is eio.queue
    harness.server.emit("live", 3, to=sid)
    assert ws.texts(1) == ['42["live",3]']
    ws.send_text(event("upgraded", ack=6))
    assert ws.texts(1) == ['436[{"echo":"upgraded"}]']
    ws.close()


def test_a_failed_upgrade_leaves_the_polling_session(harness: Harness) -> None:
    eio_sid, sid = polling_session(harness)
    ws = upgrade(harness, eio_sid)
    ws.send_text("2nope")
    assert ws.until_closed() == []
    eio = harness.server.eio.sockets[eio_sid]
    settle(lambda: not eio.upgrading)
    assert not eio.upgraded and not eio.closed
    harness.server.emit("still", 1, to=sid)
    answer = http(harness, "GET", f"/socket.io/?EIO=4&transport=polling&sid={eio_sid}")
    assert b'42["still",1]' in answer


def test_the_upgrade_answer_and_the_open_packet_go_out_in_one_send(harness: Harness) -> None:
    sock = gevent.socket.create_connection(harness.address)
    sock.sendall(handshake("/socket.io/?EIO=4&transport=websocket"))
    with gevent.Timeout(5):
        data = sock.recv(65536)  # one segment: everything of one send()
    head, _, rest = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101")
    assert Browser(sock, rest).texts(1)[0].startswith("0{")
    sock.close()
