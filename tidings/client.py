"""A small Python client for services and tests: subscribe, recover, de-duplicate.

It keeps the last offset of every topic, resubscribes with `since` after any
reconnect, delivers recovered publications before live ones, drops anything
at or below the last offset, and reports a history gap (`recovered: false`)
through `on_gap` so the application can resync. The same rules as
`clients/js` (the JavaScript client).
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import engineio
import socketio

from tidings.history import BEGINNING, parse_offset

log = logging.getLogger("tidings.client")

Handler = Callable[[dict[str, Any]], None]

# Resubscribe answers that are asked again after a backoff.
RETRIED_ERRORS = ("unavailable", "limit")
# Resubscribe retries wait 50 ms, doubling up to 2 s, each drawn from 50% to
# 150% of its step: clients refused together (a worker that is not yet
# subscribed to its queue answers all of them `unavailable` at once) must not
# all ask again together.
RESUBSCRIBE_DELAY = 0.05
RESUBSCRIBE_DELAY_MAX = 2.0


def resubscribe_delay(attempt: int) -> float:
    """Seconds before resubscribe retry `attempt` (0, 1, ...): doubling, capped, jittered."""
    step = min(RESUBSCRIBE_DELAY * 2**attempt, RESUBSCRIBE_DELAY_MAX)
    return step * random.uniform(0.5, 1.5)


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


@dataclass
class _Topic:
    last: tuple[int, int] | None = None
    last_offset: str | None = None
    pending: bool = False
    buffered: list[dict[str, Any]] = field(default_factory=list)


class TidingsClient:
    """Subscribes to topics on a Tidings server and calls `on_publication` once per offset."""

    def __init__(
        self,
        url: str,
        *,
        on_publication: Handler,
        on_gap: Callable[[str], None] | None = None,
        token: str | None = None,
        transports: list[str] | None = None,
        reconnection_delay: float = 0.2,
        ack_timeout: float = 10,
        on_raw: Handler | None = None,
        on_unsubscribed: Callable[[str], None] | None = None,
        **client_options: Any,
    ) -> None:
        self.url = url
        self.on_publication = on_publication
        self.on_gap = on_gap or (lambda topic: None)
        # Every publication as it arrives, before de-duplication (tests count these).
        self.on_raw = on_raw or (lambda pub: None)
        # The server unsubscribed this client from a topic (POST /api/unsubscribe).
        self.on_unsubscribed = on_unsubscribed or (lambda topic: None)
        self.token = token
        self.transports = transports or ["websocket"]
        self.ack_timeout = ack_timeout
        self.recovered = 0
        self.gaps = 0
        self.connects = 0
        self._lock = threading.RLock()
        self._closed = False
        self._topics: dict[str, _Topic] = {}
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
            auth={"token": self.token} if self.token else None,
            transports=self.transports,
            wait_timeout=timeout,
            retry=True,
        )

    def disconnect(self) -> None:
        """Close the connection for good."""
        self._closed = True
        self.sio.disconnect()

    def subscribe(self, topic: str, timeout: float | None = None) -> dict[str, Any]:
        """Subscribe (with `since` when this client has seen the topic) and return the ack."""
        with self._lock:
            state = self._topics.setdefault(topic, _Topic())
            state.pending = True
            payload: dict[str, Any] = {"topic": topic}
            if state.last_offset is not None:
                payload["since"] = state.last_offset
        ack = self.sio.call("subscribe", payload, timeout=timeout or self.ack_timeout)
        self._on_ack(topic, payload, ack)
        return ack

    def unsubscribe(self, topic: str, timeout: float = 10) -> dict[str, Any]:
        """Stop receiving a topic."""
        with self._lock:
            self._topics.pop(topic, None)
        return self.sio.call("unsubscribe", {"topic": topic}, timeout=timeout)

    def last_offset(self, topic: str) -> str | None:
        """Return the last offset delivered for `topic`."""
        with self._lock:
            state = self._topics.get(topic)
            return state.last_offset if state else None

    # -- internals -------------------------------------------------------------

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

    def _on_ack(self, topic: str, sent: dict[str, Any], ack: Any) -> None:
        with self._lock:
            state = self._topics.get(topic)
            if state is None:
                return
            state.pending = False
            buffered, state.buffered = state.buffered, []
            if not isinstance(ack, dict) or not ack.get("ok"):
                log.warning("subscribe %s refused: %s", topic, ack)
                return
            log.debug(
                "sid %s subscribed %s since %s: offset %s, recovered %s (%d), %d buffered",
                self.sio.get_sid(),
                topic,
                sent.get("since"),
                ack.get("offset"),
                ack.get("recovered"),
                len(ack.get("publications") or ()),
                len(buffered),
            )
            if "since" in sent:
                if ack.get("recovered"):
                    recovered = ack.get("publications", [])
                    self.recovered += len(recovered)
                    for pub in recovered:
                        self.on_raw(pub)
                        self._deliver(state, pub)
                else:
                    self.gaps += 1
                    self.on_gap(topic)
                    self._move_to(state, ack.get("offset"))
            else:
                self._move_to(state, ack.get("offset"))
            for pub in buffered:
                self._deliver(state, pub)

    def _move_to(self, state: _Topic, offset: str | None) -> None:
        # An empty topic: resume from its beginning after a reconnect.
        offset = offset or BEGINNING
        pair = parse_offset(offset)
        if pair is not None and (state.last is None or pair > state.last):
            state.last, state.last_offset = pair, offset

    def _on_unsubscribed(self, info: Any) -> None:
        """Forget a topic the server ended, so that no reconnect subscribes to it again."""
        topic = info.get("topic") if isinstance(info, dict) else None
        with self._lock:
            if self._topics.pop(topic, None) is None:  # type: ignore[arg-type]
                return
        self.on_unsubscribed(topic)  # type: ignore[arg-type]

    def _on_publications(self, publications: Any) -> None:
        if not isinstance(publications, list):
            return
        with self._lock:
            for pub in publications:
                self.on_raw(pub)
                state = self._topics.get(pub.get("topic")) if isinstance(pub, dict) else None
                if state is None:
                    continue
                if state.pending:
                    state.buffered.append(pub)
                else:
                    self._deliver(state, pub)

    def _deliver(self, state: _Topic, pub: dict[str, Any]) -> None:
        pair = parse_offset(pub.get("offset"))
        if pair is None or (state.last is not None and pair <= state.last):
            return
        state.last, state.last_offset = pair, pub["offset"]
        self.on_publication(pub)
