"""Outgoing queue bounds on a real python-socketio server whose client never reads."""

from __future__ import annotations

import contextlib
import socket
import time

import engineio.socket
import pytest
import socketio
from engineio import packet

from tests.support import wait_for
from webapp import backpressure
from webapp.backpressure import Bounds

MAX_BYTES = 1000


def stalled(**bounds: int) -> tuple[socketio.Server, engineio.socket.Socket, list[str]]:
    """A server with bounded queues and one connection nobody drains; and the cut sids."""
    server = socketio.Server(async_mode="threading")
    cuts: list[str] = []
    backpressure.install(
        server,
        max_packets=bounds.get("max_packets", 100),
        max_bytes=bounds.get("max_bytes", MAX_BYTES),
        on_cut=cuts.append,
    )
    sock = engineio.socket.Socket(server.eio, "sid1")
    sock.last_ping = None  # no ping timeout for a socket that never pinged
    server.eio.sockets["sid1"] = sock
    return server, sock, cuts


def event(size: int) -> packet.Packet:
    return packet.Packet(packet.MESSAGE, data="2" + '["publications","' + "x" * size + '"]')


def reply(size: int) -> packet.Packet:
    return packet.Packet(packet.MESSAGE, data="31" + '[{"ok":true,"p":"' + "x" * size + '"}]')


def test_a_backlog_over_the_byte_bound_is_cut() -> None:
    server, sock, cuts = stalled()
    for _ in range(3):
        server.eio.send_packet("sid1", event(400))
    wait_for(lambda: cuts == ["sid1"])
    assert sock.queue.pending_bytes == 2 * len(event(400).data)  # the third was never queued


def test_a_backlog_over_the_packet_bound_is_cut() -> None:
    server, _, cuts = stalled(max_packets=5)
    for _ in range(6):
        server.eio.send_packet("sid1", event(1))
    wait_for(lambda: cuts == ["sid1"])


def test_one_large_reply_passes_a_backlog_and_live_traffic_is_measured_without_it() -> None:
    server, sock, cuts = stalled()
    server.eio.send_packet("sid1", event(400))
    server.eio.send_packet("sid1", reply(50 * MAX_BYTES))  # a recovery far over the bound
    server.eio.send_packet("sid1", event(400))
    assert sock.queue.qsize() == 3 and not sock.queue.cut and cuts == []
    server.eio.send_packet("sid1", event(400))  # live traffic past the bound is still cut
    wait_for(lambda: cuts == ["sid1"])


def test_a_second_reply_while_one_waits_is_measured() -> None:
    server, sock, cuts = stalled()
    server.eio.send_packet("sid1", reply(5 * MAX_BYTES))
    server.eio.send_packet("sid1", reply(5 * MAX_BYTES))
    wait_for(lambda: cuts == ["sid1"])
    assert sock.queue.reply_bytes == len(reply(5 * MAX_BYTES).data)  # the second was not queued


def test_a_drained_queue_forgets_what_it_held() -> None:
    server, sock, cuts = stalled()
    server.eio.send_packet("sid1", reply(5 * MAX_BYTES))
    server.eio.send_packet("sid1", event(300))
    sock.queue.get()
    sock.queue.get()
    assert sock.queue.pending_bytes == 0 and sock.queue.reply_bytes == 0
    server.eio.send_packet("sid1", reply(5 * MAX_BYTES))
    assert cuts == [] and sock.queue.qsize() == 1


@pytest.mark.parametrize(
    ("packets", "held", "replies", "size", "reply", "admitted"),
    [
        (0, 0, 0, 50 * MAX_BYTES, False, True),  # one packet always goes through
        (1, 900, 0, 100, False, True),
        (1, 900, 0, 101, False, False),
        (1, 400, 0, 50 * MAX_BYTES, True, True),  # the one reply in flight
        (2, 400 + 50 * MAX_BYTES, 50 * MAX_BYTES, 400, False, True),  # live, without it
        (2, 400 + 5 * MAX_BYTES, 5 * MAX_BYTES, 5 * MAX_BYTES, True, False),  # a second
        (99, 0, 0, 1, False, True),
        (100, 0, 0, 1, False, False),  # the packet bound
    ],
)
def test_websocket_backlogs_are_measured_by_the_same_rule(
    packets: int, held: int, replies: int, size: int, reply: bool, admitted: bool
) -> None:
    # `webapp.transport` asks `Bounds` with its backlog's numbers, as the queue path does.
    assert Bounds(100, MAX_BYTES).admits(packets, held, replies, size, reply) is admitted


def _connected_pair(rcvbuf: int | None = None) -> tuple[socket.socket, socket.socket]:
    """A server-side and a client-side TCP socket over loopback."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.socket()
    if rcvbuf is not None:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    client.connect(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    return server, client


def _fill(server: socket.socket) -> int:
    """Write until the kernel takes no more; return how much it took."""
    server.setblocking(False)
    sent = 0
    with contextlib.suppress(BlockingIOError):
        while True:
            sent += server.send(b"x" * 65536)
    return sent


def _cut(server: socket.socket, seconds: float) -> None:
    """What abort_connection does to the raw socket, then the handler's own close."""
    backpressure.reset_if_undrained(server, seconds)
    server.shutdown(socket.SHUT_RDWR)
    server.close()


def test_a_cut_client_that_reads_on_gets_the_rest_and_then_the_end() -> None:
    server, client = _connected_pair()
    with client:
        sent = _fill(server)
        _cut(server, 2.0)
        client.settimeout(5)
        received = 0
        while chunk := client.recv(1 << 20):
            received += len(chunk)
        assert received == sent  # then a clean end: no reset


def test_a_cut_client_that_does_not_read_is_reset_after_the_drain_time() -> None:
    # A window this small leaves the sender to probe it: the kernel holds the
    # rest of what was written, and a FIN behind it would take minutes to arrive.
    server, client = _connected_pair(rcvbuf=4096)
    with client:
        sent = _fill(server)
        assert backpressure.unsent_bytes(server) > 0
        started = time.monotonic()
        _cut(server, 0.3)
        time.sleep(0.6)  # the client reads nothing while the drain time runs out
        client.settimeout(5)
        received = 0
        with pytest.raises(ConnectionResetError):
            while chunk := client.recv(1 << 20):
                received += len(chunk)
        assert received < sent
        assert time.monotonic() - started < 5
