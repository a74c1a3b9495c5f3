"""A web node's subscription to operator commands (`tidings:control`, see tidings/control.py).

A loop of its own, the way webapp/queue.py owns the message queue's: a
bounded poll, reconnects with a capped backoff, one log line per outage.
After an outage it reloads the revocations, the one kind of command that
must not be missed (a disconnect or unsubscribe sent meanwhile was answered
by the other nodes only, and its sender was told so).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import redis

from tidings import control
from tidings.keys import CONTROL_CHANNEL

log = logging.getLogger("tidings.control")

POLL_SECONDS = 1.0
CONFIRM_SECONDS = 5.0
BACKOFF_START = 0.05
BACKOFF_MAX = 1.0


class Handler(Protocol):
    """What acts on commands: webapp.presence.Presence."""

    def handle(self, command: dict[str, Any]) -> int: ...

    def reload_revocations(self) -> int: ...


class ControlListener:
    """Hears operator commands and answers each one with the connections it touched."""

    def __init__(
        self, client: redis.Redis, handler: Handler, *, closed: Callable[[], bool]
    ) -> None:
        self.client = client
        self.handler = handler
        self.closed = closed
        self.subscribed = False

    def run(self) -> None:
        """Listen until `closed()`, reconnecting for as long as it takes."""
        backoff = BACKOFF_START
        down = False
        while not self.closed():
            pubsub = self.client.pubsub()
            try:
                pubsub.subscribe(CONTROL_CHANNEL)
                self._confirm(pubsub)
                self.subscribed = True
                if down:
                    log.info("control channel: Redis is back; resubscribed")
                    self.handler.reload_revocations()
                    down = False
                backoff = BACKOFF_START
                while not self.closed():
                    message = pubsub.get_message(timeout=POLL_SECONDS)
                    if message is not None and message.get("type") == "message":
                        self.dispatch(message["data"])
            except redis.RedisError as exc:
                self.subscribed = False
                if not down:
                    log.warning("control channel: Redis unavailable (%s); reconnecting", exc)
                    down = True
                time.sleep(backoff)  # gevent-patched: yields to the hub
                backoff = min(backoff * 2, BACKOFF_MAX)
            finally:
                with contextlib.suppress(Exception):  # the connection may be gone already
                    pubsub.close()

    @staticmethod
    def _confirm(pubsub: redis.client.PubSub) -> None:
        """Read until Redis confirms the SUBSCRIBE (a refusal raises here)."""
        deadline = time.monotonic() + CONFIRM_SECONDS
        while time.monotonic() < deadline:
            reply = pubsub.get_message(timeout=POLL_SECONDS)
            if reply is not None and reply.get("type") == "subscribe":
                return
        raise redis.TimeoutError("no confirmation of SUBSCRIBE " + CONTROL_CHANNEL)

    def dispatch(self, raw: bytes | str) -> None:
        """Act on one message of the channel; anything malformed is ignored."""
        command = control.parse(raw)
        if command is None:
            log.warning("control channel: ignored a malformed command")
            return
        count = self.handler.handle(command)
        control.answer(self.client, command["reply"], count)
