"""The Python client over Socket.IO: subscribe, recover, de-duplicate.

It keeps the last offset of every topic, resubscribes with `since` after any
reconnect, delivers recovered publications before live ones, drops anything
at or below the last offset, and reports a history gap (`recovered: false`)
through `on_gap` so the application can resync: the rules of
`tidings.client_core`, shared with the Server-Sent Events client
(`tidings.client_sse.SseClient`) and the same as `clients/js` (the
JavaScript client).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import engineio
import socketio

from tidings.client_core import RETRIED_ERRORS, ClientCore, Handler, Token, resubscribe_delay
from tidings.client_sse import SseClient

log = logging.getLogger("tidings.client")

# Both clients from one import: `from tidings.client import SseClient, TidingsClient`.
__all__ = ["SseClient", "TidingsClient"]


class _InOrderEngineIO(engineio.Client):
    """An engine.io client that hands messages over one by one, in arrival order.

    python-engineio's client starts a thread per message, so two
    `publications` events can be handled out of order, and the second one
    would then be dropped as "at or below the last offset": a silent loss.
    """

    def _trigger_event(self, event: str, *args: Any, **kwargs: Any) -> Any:
        if event == "message":
            kwargs["run_async"] = False
        return super()._trigger_event(event, *args, **kwargs)


class _InOrderClient(socketio.Client):
    def _engineio_client_class(self) -> type[engineio.Client]:
        return _InOrderEngineIO


class TidingsClient(ClientCore):
    """Subscribes to topics over Socket.IO and calls `on_publication` once per offset."""

    def __init__(
        self,
        url: str,
        *,
        on_publication: Handler,
        on_gap: Callable[[str], None] | None = None,
        token: Token = None,
        transports: list[str] | None = None,
        reconnection_delay: float = 0.2,
        ack_timeout: float = 10,
        on_raw: Handler | None = None,
        on_unsubscribed: Callable[[str], None] | None = None,
        **client_options: Any,
    ) -> None:
        super().__init__(
            url,
            on_publication=on_publication,
            on_gap=on_gap,
            token=token,
            ack_timeout=ack_timeout,
            on_raw=on_raw,
            on_unsubscribed=on_unsubscribed,
        )
        self.transports = transports or ["websocket"]
        # websocket-client checks every text frame's UTF-8 in pure Python:
        # ~170 us per 1 KB frame, a thousand times `bytes.decode`, which checks
        # it again anyway (bench/python_client.py: 20x the client's CPU).
        # Twenty busy clients in one process then fell so far behind that they
        # read the server's PING too late, and engine.io's write loop dropped
        # the connection (the chaos test's silent clients).
        websocket_options = {
            "skip_utf8_validation": True,
            **(client_options.pop("websocket_extra_options", None) or {}),
        }
        self.sio = _InOrderClient(
            websocket_extra_options=websocket_options,
            reconnection=True,
            reconnection_delay=reconnection_delay,
            reconnection_delay_max=1,
            # python-socketio adds +-randomization_factor *seconds* to each
            # delay (not a fraction of it): with the default delays the first
            # attempt comes 0-0.4 s after a drop, later ones every 0.8-1.2 s,
            # so the clients of a dead worker do not all come back at once.
            randomization_factor=0.2,
            **client_options,
        )
        self.sio.on("connect", self._on_connect)
        self.sio.on("disconnect", self._on_disconnect)
        self.sio.on("publications", self._on_publications)
        self.sio.on("unsubscribed", self._on_unsubscribed)

    # -- public --------------------------------------------------------------

    def connect(self, timeout: float = 10) -> None:
        """Connect (and keep reconnecting on loss)."""
        self.sio.connect(
            self.url,
            # A function: python-socketio calls it at every (re)connection.
            auth=self._auth,
            transports=self.transports,
            wait_timeout=timeout,
            retry=True,
        )

    def disconnect(self) -> None:
        """Close the connection for good."""
        self._closed = True
        self.sio.disconnect()

    def subscribe(
        self, topic: str, *, since: str | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        """Subscribe (from `since`, or where this client stopped) and return the ack."""
        payload = self._begin_subscribe(topic, since)
        ack = self.sio.call("subscribe", payload, timeout=timeout or self.ack_timeout)
        self._on_ack(topic, payload, ack, where=f"sid {self.sio.get_sid()}")
        return ack

    def unsubscribe(self, topic: str, timeout: float = 10) -> dict[str, Any]:
        """Stop receiving a topic."""
        with self._lock:
            self._topics.pop(topic, None)
        return self.sio.call("unsubscribe", {"topic": topic}, timeout=timeout)

    # -- internals -------------------------------------------------------------

    def _auth(self) -> dict[str, str] | None:
        token = self.current_token()
        return {"token": token} if token else None

    def _on_disconnect(self, reason: Any = None) -> None:
        log.debug("connection %d disconnected (%s)", self.connects, reason)

    def _on_connect(self) -> None:
        self.connects += 1
        log.debug("connected (connection %d, sid %s)", self.connects, self.sio.get_sid())
        if self.connects == 1:
            return
        # A reconnect: resubscribe everything from where it stopped. Not from
        # inside this handler, which runs on the client's event thread.
        threading.Thread(target=self._resubscribe_all, daemon=True).start()

    def _resubscribe_all(self) -> None:
        generation = self.connects
        with self._lock:
            topics = list(self._topics)
        for topic in topics:
            attempt = 0
            # Until it takes: a resubscribe that times out or finds Redis
            # unavailable would otherwise leave the topic silent on a live
            # connection. Subscribing twice is harmless (offsets de-duplicate).
            # A newer connection resubscribes for itself.
            while topic in self._topics and self.connects == generation and not self._closed:
                try:
                    if self.sio.connected:
                        ack = self.subscribe(topic)
                        # `limit` here is the subscribe rate (a topic accepted
                        # before), met when many topics resubscribe at once.
                        if not (isinstance(ack, dict) and ack.get("error") in RETRIED_ERRORS):
                            break
                except socketio.exceptions.TimeoutError:
                    if self.connects == generation and self.sio.connected:
                        # No answer on a connection that looks up: it is not
                        # (a half-open TCP path, a wedged server). Asking again
                        # on it would leave the topic silent; a new connection
                        # resubscribes everything.
                        log.warning(
                            "resubscribe %s: no answer in %gs; reconnecting",
                            topic,
                            self.ack_timeout,
                        )
                        self._break_transport()
                    return
                except (socketio.exceptions.SocketIOError, OSError) as exc:
                    log.warning("resubscribe %s failed (%s); retrying", topic, exc)
                time.sleep(resubscribe_delay(attempt))  # backoff before the next attempt
                attempt += 1

    def _break_transport(self) -> None:
        """Drop the websocket as a network failure would: the client then reconnects."""
        ws = getattr(self.sio.eio, "ws", None)
        sock = getattr(ws, "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
