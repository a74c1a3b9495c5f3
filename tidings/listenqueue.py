"""The kernel's accept queues: what sizes them, what overflowed, what one socket holds now.

A listening socket's accept queue holds connections whose handshake is done
and that no worker has accepted yet; its length is min(backlog, somaxconn),
fixed when the socket starts listening. Linux only (/proc and netlink's
sock_diag, as `ss` reads them); elsewhere every reader returns None.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class KernelLimits:
    """The sysctls that bound a listening socket's queues."""

    # net.core.somaxconn: the cap on any listen() backlog.
    somaxconn: int
    # net.ipv4.tcp_max_syn_backlog: half-open connections (SYN received), without syncookies.
    max_syn_backlog: int
    # net.ipv4.tcp_syncookies: 0 off, 1 when the SYN queue is full, 2 always.
    syncookies: int


def kernel_limits(proc: Path = PROC) -> KernelLimits | None:
    """Read the sysctls, or None where there is no /proc/sys/net."""
    try:
        return KernelLimits(
            somaxconn=int((proc / "sys/net/core/somaxconn").read_text()),
            max_syn_backlog=int((proc / "sys/net/ipv4/tcp_max_syn_backlog").read_text()),
            syncookies=int((proc / "sys/net/ipv4/tcp_syncookies").read_text()),
        )
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class ListenCounters:
    """TcpExt counters of this network namespace since boot, every listening socket's."""

    # ListenOverflows: handshakes dropped because an accept queue was full.
    overflows: int
    # ListenDrops: every connection a listening socket dropped, overflows included.
    drops: int

    def __sub__(self, earlier: ListenCounters) -> ListenCounters:
        return ListenCounters(self.overflows - earlier.overflows, self.drops - earlier.drops)


def listen_counters(proc: Path = PROC) -> ListenCounters | None:
    """Read ListenOverflows and ListenDrops from /proc/net/netstat, or None."""
    try:
        lines = (proc / "net/netstat").read_text().splitlines()
    except OSError:
        return None
    # Pairs of lines: "TcpExt: Name1 Name2 ..." then "TcpExt: 1 2 ...".
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            counters = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            try:
                return ListenCounters(
                    int(counters["ListenOverflows"]), int(counters["ListenDrops"])
                )
            except (KeyError, ValueError):
                return None
    return None


@dataclass(frozen=True)
class ListeningSocket:
    """One listening TCP socket as the kernel reports it (`ss -ltn` shows the same)."""

    # Recv-Q: connections waiting in the accept queue right now.
    queued: int
    # Send-Q: the accept queue's length, min(backlog, somaxconn) when listen() ran.
    limit: int


# Netlink sock_diag (linux/sock_diag.h, linux/inet_diag.h): what `ss` asks,
# without a process per question (a sampling loop spent 6 ms of CPU on each ss).
NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST_DUMP = 0x301
NLMSG_ERROR, NLMSG_DONE = 2, 3
TCP_LISTEN = 10
_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, seq, pid
# inet_diag_req_v2: family, protocol, ext, pad, states; then a zeroed inet_diag_sockid.
_REQUEST = struct.Struct("=BBBBI48x")
# inet_diag_msg: family, state, timer, retrans, then the sockid (source port
# first, big-endian, 48 bytes in all), expires, rqueue, wqueue.
_SPORT = struct.Struct(">H")
_QUEUES = struct.Struct("=II")
_QUEUES_AT = 4 + 48 + 4


def listening_socket(port: int) -> ListeningSocket | None:
    """Ask the kernel about the TCP socket listening on `port` (any address); None if none."""
    if not hasattr(socket, "AF_NETLINK"):
        return None
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as diag:
            for family in (socket.AF_INET, socket.AF_INET6):
                request = _REQUEST.pack(family, socket.IPPROTO_TCP, 0, 0, 1 << TCP_LISTEN)
                header = _HEADER.pack(
                    _HEADER.size + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST_DUMP, 1, 0
                )
                diag.send(header + request)
                found = _read_dump(diag, port)
                if found is not None:
                    return found
    except OSError:
        return None
    return None


def _read_dump(diag: socket.socket, port: int) -> ListeningSocket | None:
    """Read one dump to its end; return the listener on `port` if it was in it."""
    found = None
    while True:
        data = diag.recv(65536)
        offset = 0
        while offset < len(data):
            length, kind, _, _, _ = _HEADER.unpack_from(data, offset)
            if kind == NLMSG_DONE:
                return found
            if kind == NLMSG_ERROR:
                raise OSError("sock_diag refused the request")
            body = offset + _HEADER.size
            (sport,) = _SPORT.unpack_from(data, body + 4)
            if sport == port and found is None:
                queued, limit = _QUEUES.unpack_from(data, body + _QUEUES_AT)
                found = ListeningSocket(queued=queued, limit=limit)
            offset += (length + 3) & ~3
