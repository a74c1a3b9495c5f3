"""The watcher-driven transport over real socket pairs: reads, direct writes, backlogs, closes."""

from __future__ import annotations

import _socket
import socket
import struct
import time
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import gevent.socket
import pytest

from webapp import transport as transport_module
from webapp.backpressure import Bounds
from webapp.transport import CLOSED, CLOSING, OPEN, Transport
from webapp.worker import KeepingPool


def settle(condition: Callable[[], Any], timeout: float = 5) -> None:
    """Yield to the hub until `condition` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        gevent.sleep(0.005)


class Recorder(Transport):
    """A transport that keeps what it reads and what happened to it."""

    __slots__ = ("cuts", "data", "ended", "losses")

    def __init__(self, sock: _socket.socket, bounds: Bounds | None = None, pool: Any = None):
        super().__init__(sock, bounds, pool)
        self.data = bytearray()
        self.losses: list[OSError | None] = []
        self.cuts: list[tuple[int, int]] = []
        self.ended = 0

    def received(self, data: memoryview) -> None:
        self.data += data

    def lost(self, exc: OSError | None) -> None:
        self.losses.append(exc)
        super().lost(exc)

    def over_bounds(self, packets: int, size: int) -> None:
        self.cuts.append((packets, size))
        super().over_bounds(packets, size)

    def finished(self) -> None:
        self.ended += 1


def pair(*, small: bool = False) -> tuple[gevent.socket.socket, _socket.socket]:
    """A connected TCP pair: the peer's end (gevent) and a raw one for the transport."""
    listener = gevent.socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    peer = gevent.socket.socket()
    if small:
        # Set before connecting: a receive buffer shrunk later leaves loopback
        # TCP crawling through zero-window probes.
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    peer.connect(listener.getsockname())
    accepted, _ = listener.accept()
    listener.close()
    if small:
        accepted.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return peer, _socket.socket(fileno=accepted.detach())


@pytest.fixture
def conn() -> Iterator[tuple[gevent.socket.socket, Recorder]]:
    peer, raw = pair()
    made = Recorder(raw)
    made.start_reading()
    yield peer, made
    made.abort()
    peer.close()


def read_exactly(peer: gevent.socket.socket, size: int) -> bytes:
    data = bytearray()
    with gevent.Timeout(10):
        while len(data) < size:
            chunk = peer.recv(min(65536, size - len(data)))
            assert chunk, "closed early"
            data += chunk
    return bytes(data)


def test_bytes_are_read_when_they_arrive(conn: tuple[gevent.socket.socket, Recorder]) -> None:
    peer, made = conn
    for chunk in (b"a", b"bc" * 1000, b"d" * 200_000):
        peer.sendall(chunk)
    settle(lambda: len(made.data) == 1 + 2000 + 200_000)
    assert bytes(made.data) == b"a" + b"bc" * 1000 + b"d" * 200_000


def test_a_write_the_kernel_takes_needs_no_backlog_and_no_watcher(
    conn: tuple[gevent.socket.socket, Recorder],
) -> None:
    peer, made = conn
    assert made.write(b"hello")
    assert made.backlog is None and made.writer is None
    assert read_exactly(peer, 5) == b"hello"


def test_a_slow_reader_gets_a_backlog_and_a_writer_only_while_it_lasts() -> None:
    peer, raw = pair(small=True)
    made = Recorder(raw)
    try:
        chunks = [bytes([i]) * 50_000 for i in range(20)]  # 1 MB, far over the buffers
        for chunk in chunks:
            assert made.write(chunk)
        assert made.backlogged > 1 and made.writer is not None
        assert 0 < made.pending_bytes < 1_000_000
        assert read_exactly(peer, 1_000_000) == b"".join(chunks)  # whole and in order
        settle(lambda: made.backlog is None)
        assert made.writer is None and made.pending_bytes == 0
        assert made.write(b"again") and made.backlog is None
        assert read_exactly(peer, 5) == b"again"
    finally:
        made.abort()
        peer.close()


def test_a_backlog_over_its_bounds_is_cut_and_dropped() -> None:
    peer, raw = pair(small=True)
    made = Recorder(raw, Bounds(max_packets=1000, max_bytes=100_000))
    try:
        taken = 0
        while made.write(b"x" * 5000):
            taken += 1
            assert taken < 1000, "never cut"
        assert made.cuts and made.cuts[0][1] > 100_000
        assert made.state == CLOSED and made.backlog is None and made.ended == 1
        assert not made.write(b"more")
        # What went out before the cut is a prefix of what was written.
        received = b""
        with gevent.Timeout(5):
            while chunk := peer.recv(65536):
                received += chunk
        assert received == b"x" * len(received) and len(received) < taken * 5000
    finally:
        peer.close()


def test_the_packet_bound_counts_items_waiting() -> None:
    peer, raw = pair(small=True)
    made = Recorder(raw, Bounds(max_packets=3, max_bytes=10**9))
    try:
        made.write(b"x" * 2_000_000)  # the kernel takes part: one item waits
        for _ in range(2):
            assert made.write(b"y")
        assert not made.write(b"z")
        assert made.cuts == [(4, made.cuts[0][1])]
    finally:
        made.abort()
        peer.close()


def test_a_control_item_never_cuts() -> None:
    peer, raw = pair(small=True)
    made = Recorder(raw, Bounds(max_packets=1, max_bytes=10))
    try:
        made.write(b"x" * 2_000_000)
        assert made.write(b"ping", bounded=False)
        assert not made.cuts and made.backlogged == 2
    finally:
        made.abort()
        peer.close()


def test_close_sends_the_backlog_then_ends_the_stream() -> None:
    peer, raw = pair(small=True)
    made = Recorder(raw)
    made.write(b"z" * 1_000_000)
    made.close()
    assert made.state == CLOSING and made.reader is None
    received = b""
    with gevent.Timeout(10):
        while chunk := peer.recv(65536):
            received += chunk
    assert received == b"z" * 1_000_000
    settle(lambda: made.state == CLOSED)
    assert made.ended == 1
    peer.close()


def test_a_close_whose_backlog_never_drains_gives_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transport_module, "FLUSH_SECONDS", 0.2)
    peer, raw = pair(small=True)
    made = Recorder(raw)
    try:
        made.write(b"z" * 2_000_000)
        made.close()
        settle(lambda: made.state == CLOSED)  # the peer never read
        assert made.ended == 1
    finally:
        peer.close()


def test_a_peer_that_closes_is_noticed(conn: tuple[gevent.socket.socket, Recorder]) -> None:
    peer, made = conn
    peer.close()
    settle(lambda: made.state == CLOSED)
    assert made.losses == [None] and made.ended == 1


def test_a_peer_that_resets_is_noticed_by_the_reader_or_a_write(
    conn: tuple[gevent.socket.socket, Recorder],
) -> None:
    peer, made = conn
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()
    settle(lambda: made.state == CLOSED or not made.write(b"x"))
    settle(lambda: made.state == CLOSED)
    assert made.losses and made.ended == 1


def test_a_closed_connection_frees_its_pool_slot() -> None:
    pool = KeepingPool(2)
    # A handler that detaches its connection keeps its slot when it ends.
    pool.spawn(lambda: pool.keep(gevent.getcurrent())).join()
    settle(lambda: pool.kept == 1)
    assert len(pool) == 0 and pool.free_count() == 1
    pool.spawn(lambda: None).join()  # an ordinary handler frees its own
    settle(lambda: len(pool) == 0)
    assert pool.free_count() == 1 and pool._semaphore.counter == 1
    peer, raw = pair()
    made = Recorder(raw, pool=pool)
    made.abort()
    made.abort()  # once only
    assert pool.kept == 0 and pool.free_count() == 2
    peer.close()


def test_open_state_reads_until_stopped(conn: tuple[gevent.socket.socket, Recorder]) -> None:
    peer, made = conn
    assert made.state == OPEN and made.reader is not None
    made.stop_reading()
    peer.sendall(b"unread")
    gevent.sleep(0.05)
    assert made.data == b""
