"""The kernel's accept-queue readers, against a real listening socket that overflows."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import wait_for
from tidings.listenqueue import (
    KernelLimits,
    ListenCounters,
    ListeningSocket,
    kernel_limits,
    listen_counters,
    listening_socket,
)

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's /proc")


@pytest.fixture
def never_accepts() -> Iterator[socket.socket]:
    """A listening socket with the shortest accept queue there is, never accepted from."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    yield server
    server.close()


@linux
def test_a_full_accept_queue_counts_overflows_and_shows_in_ss(
    never_accepts: socket.socket,
) -> None:
    port = never_accepts.getsockname()[1]
    before = listen_counters()
    assert before is not None
    clients = []
    for _ in range(4):
        client = socket.socket()
        client.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            client.connect(("127.0.0.1", port))
        clients.append(client)
    try:
        # backlog 0 holds one connection; the kernel drops the others' SYNs.
        grown = wait_for(
            lambda: (now := listen_counters()) and (now - before).overflows >= 3 and now,
            timeout=5,
        )
        assert (grown - before).drops >= (grown - before).overflows
        assert listening_socket(port) == ListeningSocket(queued=1, limit=0)
    finally:
        for client in clients:
            client.close()


@linux
def test_the_sysctls_are_read_as_the_kernel_has_them() -> None:
    limits = kernel_limits()
    assert limits is not None
    assert limits.somaxconn == int(Path("/proc/sys/net/core/somaxconn").read_text())
    assert limits.syncookies in (0, 1, 2)


def test_readers_parse_proc_files_and_return_none_without_them(tmp_path: Path) -> None:
    assert kernel_limits(tmp_path) is None
    assert listen_counters(tmp_path) is None
    (tmp_path / "sys/net/core").mkdir(parents=True)
    (tmp_path / "sys/net/ipv4").mkdir(parents=True)
    (tmp_path / "sys/net/core/somaxconn").write_text("4096\n")
    (tmp_path / "sys/net/ipv4/tcp_max_syn_backlog").write_text("512\n")
    (tmp_path / "sys/net/ipv4/tcp_syncookies").write_text("0\n")
    assert kernel_limits(tmp_path) == KernelLimits(4096, 512, 0)
    (tmp_path / "net").mkdir()
    (tmp_path / "net/netstat").write_text(
        "TcpExt: SyncookiesSent ListenOverflows ListenDrops TCPHPHits\n"
        "TcpExt: 1 17 19 3\n"
        "IpExt: InNoRoutes ListenOverflows\n"
        "IpExt: 0 99\n"
    )
    assert listen_counters(tmp_path) == ListenCounters(overflows=17, drops=19)
    assert ListenCounters(20, 25) - ListenCounters(17, 19) == ListenCounters(3, 6)


@linux
def test_a_listening_socket_reads_as_ss_shows_it() -> None:
    with socket.socket(socket.AF_INET6) as server:
        server.bind(("::1", 0))
        server.listen(77)
        port = server.getsockname()[1]
        assert listening_socket(port) == ListeningSocket(queued=0, limit=min(77, somaxconn()))
        if shutil.which("ss"):
            line = subprocess.run(
                ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True
            ).stdout.split()
            assert (int(line[1]), int(line[2])) == (0, min(77, somaxconn()))
    with socket.socket() as unbound:
        unbound.bind(("127.0.0.1", 0))
        assert listening_socket(unbound.getsockname()[1]) is None


def somaxconn() -> int:
    return int(Path("/proc/sys/net/core/somaxconn").read_text())
