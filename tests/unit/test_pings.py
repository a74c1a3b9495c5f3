"""One ping loop per server: every scheduled socket gets its PING, no thread per socket."""

from __future__ import annotations

import threading
import time

import engineio
import engineio.socket
import pytest
from engineio import packet

from tests.support import wait_for
from webapp import pings

INTERVAL = 0.3


@pytest.fixture
def server() -> engineio.Server:
    pings.install()
    return engineio.Server(async_mode="threading", ping_interval=INTERVAL)


def sent(sock: engineio.socket.Socket) -> list[int]:
    """The packet types queued for a socket, drained."""
    types = []
    while not sock.queue.empty():
        types.append(sock.queue.get_nowait().packet_type)
    return types


def test_each_socket_is_pinged_once_after_the_interval(server: engineio.Server) -> None:
    sockets = [engineio.socket.Socket(server, f"s{i}") for i in range(50)]
    gone = engineio.socket.Socket(server, "gone")
    threads = threading.active_count()
    started = time.monotonic()
    for sock in [*sockets, gone]:
        sock.schedule_ping()  # as engine.io does at connect
    gone.closed = True
    # One loop for all of them, not a thread (greenlet) each.
    assert threading.active_count() <= threads + 1
    wait_for(lambda: all(not sock.queue.empty() for sock in sockets), timeout=5)
    assert time.monotonic() - started >= INTERVAL
    assert all(sent(sock) == [packet.PING] for sock in sockets)
    assert all(sock.last_ping for sock in sockets)  # the PONG is now awaited
    time.sleep(INTERVAL / 2)
    assert sent(gone) == []


def test_a_pong_schedules_the_next_ping_and_a_second_pong_does_not(
    server: engineio.Server,
) -> None:
    sock = engineio.socket.Socket(server, "s")
    sock.schedule_ping()
    wait_for(lambda: not sock.queue.empty(), timeout=5)
    assert sent(sock) == [packet.PING]
    for _ in range(2):  # two PONGs for one PING
        sock.receive(packet.Packet(packet.PONG))
    assert len(server.tidings_pings.due) == 1
    wait_for(lambda: not sock.queue.empty(), timeout=5)
    assert sent(sock) == [packet.PING]


def test_the_loop_outlives_a_socket_that_fails(
    server: engineio.Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = engineio.socket.Socket(server, "broken")
    healthy = engineio.socket.Socket(server, "healthy")

    def refuse(pkt: packet.Packet) -> None:
        raise RuntimeError("a socket that cannot send")

    monkeypatch.setattr(broken, "send", refuse)
    broken.schedule_ping()
    healthy.schedule_ping()
    wait_for(lambda: not healthy.queue.empty(), timeout=5)
    assert sent(healthy) == [packet.PING]


def test_the_loop_pings_in_gevent_mode_too() -> None:
    """The serving worker's mode: the loop is a greenlet, idle on gevent's event between pings."""
    import gevent

    pings.install()
    server = engineio.Server(async_mode="gevent", ping_interval=INTERVAL)
    first, *others = [engineio.socket.Socket(server, f"s{i}") for i in range(20)]
    first.schedule_ping()
    gevent.sleep(INTERVAL * 1.5)
    assert sent(first) == [packet.PING]
    assert server.tidings_pings.idle  # nothing due: waiting to be woken
    for sock in others:
        sock.schedule_ping()
    gevent.sleep(INTERVAL * 2)
    assert all(sent(sock) == [packet.PING] for sock in others)
    assert not server.tidings_pings.due
