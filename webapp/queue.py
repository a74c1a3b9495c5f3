"""The web worker's end of the Socket.IO message queue (`tidings:socketio`).

python-socketio's RedisManager backs off up to 60 s between reconnects and
blocks in a bare `listen()`; Tidings needs deliveries back within seconds of
Redis returning and a readiness check that knows whether this worker is
really subscribed. This subclass owns the loop: a bounded `get_message`, a
capped backoff, one log line per outage, and the state `/readyz` reads.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

import socketio

from tidings.connection import SOCKET_TIMEOUT, client_name
from tidings.keys import SOCKETIO_CHANNEL

log = logging.getLogger("tidings.queue")

POLL_SECONDS = 1.0
BACKOFF_START = 0.05
BACKOFF_MAX = 1.0
# The loop wakes at least every POLL_SECONDS; older than this means it is stuck.
STALE_AFTER_SECONDS = 5.0


class QueueManager(socketio.RedisManager):
    """Socket.IO client manager on `tidings:socketio` with a loop Tidings controls."""

    def __init__(self, url: str) -> None:
        super().__init__(
            url,
            channel=SOCKETIO_CHANNEL,
            redis_options={
                "client_name": client_name("web"),
                "socket_timeout": SOCKET_TIMEOUT,
                "socket_connect_timeout": SOCKET_TIMEOUT,
                "health_check_interval": 10,
            },
        )
        self.subscribed = False
        self.last_poll = 0.0
        self.reconnects = 0
        self._closed = False

    def close(self) -> None:
        """End the listening loop (tests; a worker simply exits)."""
        self._closed = True

    def ready(self) -> tuple[bool, str]:
        """Tell whether this worker receives the message queue, and why not."""
        if not self.subscribed:
            return False, "not subscribed to " + SOCKETIO_CHANNEL
        if time.monotonic() - self.last_poll > STALE_AFTER_SECONDS:
            return False, "message queue loop stalled"
        return True, "subscribed to " + SOCKETIO_CHANNEL

    def _listen(self) -> Iterator[bytes]:
        channel = self.channel.encode()
        for message in self._redis_listen_with_retries():
            if message["type"] == "message" and message["channel"] == channel:
                yield message["data"]

    def _redis_listen_with_retries(self) -> Iterator[dict]:
        backoff = BACKOFF_START
        down = False
        while not self._closed:
            try:
                self._redis_connect()
                self.pubsub.subscribe(self.channel)
                self.subscribed = True
                backoff = BACKOFF_START
                if down:
                    log.info("message queue: Redis is back; resubscribed")
                    down = False
                else:
                    log.info("message queue: subscribed to %s", self.channel)
                while not self._closed:
                    message = self.pubsub.get_message(timeout=POLL_SECONDS)
                    self.last_poll = time.monotonic()
                    if message is not None:
                        yield message
            except Exception as exc:  # any failure: drop the connection and start over
                self.subscribed = False
                if self._closed:
                    return
                self.reconnects += 1
                if not down:
                    log.warning("message queue: Redis unavailable (%s); reconnecting", exc)
                    down = True
                with contextlib.suppress(Exception):  # the connection is already gone
                    self.redis.close()
                time.sleep(backoff)  # gevent-patched: yields to the hub
                backoff = min(backoff * 2, BACKOFF_MAX)
