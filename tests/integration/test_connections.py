"""Thousands of idle websockets on one real gunicorn worker: cheap, all served, all bounded.

The connection layer of issue 16 (`webapp.websockets`): an idle connection
holds no greenlet, its socket is read by a hub watcher, and the pool slot of
its handler passes to it, so `worker_connections` still bounds a worker.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from bench.load import Generators, Publisher
from bench.systems import ensure_node_modules
from tests.support import Stack, wait_for
from tests.websocket_support import client_frame

pytestmark = pytest.mark.integration

TOPIC = "public.idle"


def worker_of(stack: Stack) -> psutil.Process:
    """The gunicorn worker of a one-worker stack."""
    assert stack.web is not None
    children = wait_for(lambda: psutil.Process(stack.web.pid).children(), timeout=10)
    return children[0]


def test_thousands_of_idle_websockets_cost_a_few_kilobytes_each_and_all_get_a_publication(
    node: None, make_stack: Callable[..., Stack], tmp_path: Path
) -> None:
    ensure_node_modules()
    stack = make_stack(TIDINGS_MAX_CONNECTIONS_PER_IP="1000000")
    stack.start_worker()
    stack.start_web()
    stack.wait_ready()
    worker = worker_of(stack)
    warm = Generators(stack.url, 50, processes=1, topics=[TOPIC], workdir=tmp_path / "warm")
    clients = 3000
    try:
        warm.wait_ready()  # the first connections and subscribe pay one-time costs
        before = worker.memory_info().rss
        cpu_before = sum(worker.cpu_times()[:2])
        gens = Generators(
            stack.url, clients, processes=2, topics=[TOPIC], workdir=tmp_path / "gens"
        )
        try:
            seconds, failed, errors = gens.wait_ready()
            assert failed == 0, errors[:3]
            cpu = sum(worker.cpu_times()[:2]) - cpu_before
            grown = worker.memory_info().rss - before
            # 39 KB each with a greenlet reading and one writing per connection
            # (the Node peer: 11-14 KB); about 4 KB here.
            assert grown / clients < 12 * 1024, f"{grown / clients / 1024:.1f} KB per connection"
            assert worker.num_threads() < 50  # gevent's resolver pool, not a thread per connection
            publisher = Publisher(stack.settings.redis_url)
            try:
                publisher.send([TOPIC])
                gens.wait_received(clients + 50, idle=5, deadline=time.monotonic() + 30)
                warm_report = warm.report(publisher.expected())
                report = gens.report(publisher.expected())
            finally:
                publisher.close()
            assert (report.delivered, report.lost, report.duplicated) == (clients, 0, 0)
            assert warm_report.delivered == 50
            assert gens.stat()["open"] == clients  # nobody was dropped while idle
            print(
                f"{clients} connected in {seconds:.1f}s, {grown / clients / 1024:.1f} KB and "
                f"{cpu / clients * 1e3:.2f} ms of worker CPU each"
            )
        finally:
            gens.close()
    finally:
        warm.close()


def handshake() -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        "GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: x\r\n"
        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


def answered(sock: socket.socket, timeout: float) -> bool:
    """Tell whether the upgrade was answered (101 and OPEN) within `timeout`."""
    sock.settimeout(timeout)
    try:
        data = sock.recv(4096)
    except TimeoutError:
        return False
    assert data.startswith(b"HTTP/1.1 101"), data[:100]
    return True


def test_worker_connections_bounds_open_websockets_of_a_worker(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack(TIDINGS_MAX_CONNECTIONS_PER_IP="1000", TIDINGS_WORKER_CONNECTIONS="20")
    stack.start_worker()
    stack.start_web()
    stack.wait_ready()
    host, port = "127.0.0.1", stack.port
    held = [socket.create_connection((host, port)) for _ in range(20)]
    try:
        for sock in held:
            sock.sendall(handshake())
            assert answered(sock, 10)
        # The 21st waits in the accept queue: every slot is held by an idle websocket.
        extra = socket.create_connection((host, port))
        held.append(extra)
        extra.sendall(handshake())
        assert not answered(extra, 1.0)
        held.pop(0).close()  # one leaves: its slot frees
        assert answered(extra, 10)
    finally:
        for sock in held:
            sock.close()


@pytest.mark.slow
def test_pings_come_at_engine_io_s_interval_and_a_pong_keeps_the_connection(
    make_stack: Callable[..., Stack],
) -> None:
    stack = make_stack()
    stack.start_worker()
    stack.start_web()
    stack.wait_ready()
    sock = socket.create_connection(("127.0.0.1", stack.port))
    try:
        sock.sendall(handshake())
        data = b""
        while b"\r\n\r\n" not in data or not data.endswith(b"}"):
            data += sock.recv(4096)
        opened = time.monotonic()
        _, _, frame = data.partition(b"\r\n\r\n")
        settings = json.loads(frame[2:].decode()[1:])  # unmasked text frame, < 126 bytes
        interval = settings["pingInterval"] / 1000
        assert (interval, settings["pingTimeout"]) == (25, 20000)
        sock.settimeout(interval + 5)
        assert sock.recv(16) == b"\x81\x012"  # a PING, one interval after the open
        assert interval - 0.5 < time.monotonic() - opened < interval + 1
        sock.sendall(client_frame("3"))  # PONG
        sock.sendall(client_frame("40"))
        assert sock.recv(4096).startswith(b"\x81")  # the namespace answer: still served
    finally:
        sock.close()
