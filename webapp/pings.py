"""One ping loop per worker instead of engine.io's ping greenlet per connection.

python-engineio 4.15 pings each client from a greenlet of its own
(`Socket.schedule_ping` starts `_send_ping`, which sleeps `ping_interval`
and sends a PING; the client's PONG schedules the next one). That greenlet
lives for nearly the whole connection: ~5 KB of every idle connection
(bench/PROFILE.md, finding 3), and a greenlet start per ping. Here every
schedule goes into one deque per engine.io server, and one loop sends the
PINGs that fell due. Every wait has the same length, so the deque stays in
due order and the loop only ever looks at its head.

What a client sees is unchanged: a PING `ping_interval` after the connect
and after each PONG (up to `GRANULARITY` later), and none to a closing
socket.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

import engineio.socket
from engineio import packet

log = logging.getLogger("tidings.pings")

# Seconds. PINGs falling due this close together go out in one wake-up; the
# client tolerates a PING up to its pingTimeout (20 s) late.
GRANULARITY = 0.1
# PINGs sent before letting other greenlets run, when many fall due at once.
BATCH = 256

_installed = False


class PingLoop:
    """Sends each scheduled socket its PING once `ping_interval` has passed."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.due: deque[tuple[float, engineio.socket.Socket]] = deque()
        self.wake = server.create_event()
        self.idle = False
        self.started = False
        self._start_lock = threading.Lock()  # threading mode: one loop, not two

    def schedule(self, sock: engineio.socket.Socket) -> None:
        """Ping `sock` after the server's `ping_interval`."""
        self.due.append((time.monotonic() + self.server.ping_interval, sock))
        if self.idle:
            self.wake.set()
        elif not self.started:
            with self._start_lock:
                if not self.started:
                    self.started = True
                    self.server.start_background_task(self.run)

    def run(self) -> None:
        """Ping whatever falls due, for the life of the process."""
        while True:
            try:
                self._wait_and_ping()
            except Exception:  # one bad socket must not stop the pings of all
                log.exception("ping loop failed; going on")

    def _wait_and_ping(self) -> None:
        if not self.due:
            self.wake.clear()
            self.idle = True
            try:
                if not self.due:  # appended between the check and `idle`
                    self.wake.wait()
            finally:
                self.idle = False
            return
        delay = self.due[0][0] - time.monotonic()
        if delay > 0:
            self.server.sleep(max(delay, GRANULARITY))
            return
        now = time.monotonic()
        sent = 0
        while self.due and self.due[0][0] <= now:
            _, sock = self.due.popleft()
            ping(sock)
            sent += 1
            if sent % BATCH == 0:
                self.server.sleep(0)
                now = time.monotonic()


def ping(sock: engineio.socket.Socket) -> None:
    """Send one PING, as engine.io's `_send_ping` does after its sleep."""
    if sock.closing or sock.closed:
        return
    sock.last_ping = time.time()
    sock.send(packet.Packet(packet.PING))


def _loop_for(server: Any) -> PingLoop:
    loop = getattr(server, "tidings_pings", None)
    if loop is None:
        loop = server.tidings_pings = PingLoop(server)
    return loop


def _schedule_ping(self: engineio.socket.Socket) -> None:
    # engine.io's condition, kept: schedule only once the previous PING was
    # answered (`last_ping` set), so a second PONG cannot double the pings.
    if self.last_ping:
        self.last_ping = None
        _loop_for(self.server).schedule(self)


def install() -> None:
    """Replace engine.io's per-connection ping greenlets with one loop per server."""
    global _installed
    if _installed:
        return
    engineio.socket.Socket.schedule_ping = _schedule_ping  # type: ignore[method-assign]
    _installed = True
