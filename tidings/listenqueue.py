"""The kernel's accept queues: what sizes them, what overflowed, what one socket holds now.

A listening socket's accept queue holds connections whose handshake is done
and that no worker has accepted yet; its length is min(backlog, somaxconn),
fixed when the socket starts listening. Linux only (/proc and `ss`);
elsewhere every reader returns None.
"""

from __future__ import annotations

import shutil
import subprocess
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
    """One listening TCP socket as `ss -ltn` shows it."""

    # Recv-Q: connections waiting in the accept queue right now.
    queued: int
    # Send-Q: the accept queue's length, min(backlog, somaxconn) when listen() ran.
    limit: int


def listening_socket(port: int) -> ListeningSocket | None:
    """Ask `ss` about the TCP socket listening on `port` (any address); None if none or no ss."""
    ss = shutil.which("ss")
    if ss is None:
        return None
    try:
        out = subprocess.run(
            [ss, "-ltnH", f"sport = :{port}"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for line in out.splitlines():
        fields = line.split()
        # State Recv-Q Send-Q Local:Port Peer:Port
        if len(fields) >= 5 and fields[0] == "LISTEN":
            return ListeningSocket(queued=int(fields[1]), limit=int(fields[2]))
    return None
