"""The Python client over Server-Sent Events: one `GET /sse` stream carries every topic.

The same API and rules as the Socket.IO client (`tidings.client_core`), on a
receive-only transport whose topics are fixed per stream. What it makes of
that:

- Subscribing or unsubscribing opens a new stream of the new topic list
  while the old one still delivers; the new one resumes every topic the
  client holds from the client's own offsets (a `Last-Event-ID` built from
  them), so nothing published between the two is lost, and what both carry
  is dropped by offset. Only once it is open is the old one cut: a refused
  topic leaves the others streaming.
- A stream that drops, ends (`token_expired`, a server restart) or stays
  silent past `read_timeout` (the server sends a comment every 15 s) is
  opened again after a jittered backoff, resuming from the client's offsets;
  the stream's first event (`recovered`) says per topic whether history
  covered the gap, and a topic it did not cover is reported to `on_gap`.
- A refusal (`GET /sse` answers 4xx/503 with a named JSON error before the
  stream starts) becomes the ack a Socket.IO subscribe gives:
  `{"ok": false, "error": ...}`; `unavailable` and `limit` are asked again
  with backoff until the ack timeout.

One read thread per client reads the stream and runs every callback, in order.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.client import HTTPException
from typing import Any

import requests
import urllib3

from tidings.client_core import (
    RETRIED_ERRORS,
    ClientCore,
    Handler,
    Token,
    backoff_delay,
    resubscribe_delay,
)
from tidings.event_stream import Event, EventParser, event_id, read_event_id
from tidings.history import BEGINNING

log = logging.getLogger("tidings.client.sse")

# A refusal without a JSON body naming it (a proxy's error page, say).
_STATUS_ERRORS = {401: "invalid_token", 403: "forbidden", 429: "limit"}
_READ_SIZE = 65536


class _Waiter:
    """A subscribe waiting for the first event of a stream that carries its topic."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.ack: dict[str, Any] = {}

    def answer(self, ack: dict[str, Any]) -> None:
        self.ack = ack
        self.done.set()


class _Stream:
    """One `GET /sse` response: its topics (query order), the offsets it resumes, its parser."""

    def __init__(
        self, response: requests.Response, topics: list[str], sent: dict[str, str | None]
    ) -> None:
        self.response = response
        self.topics = topics
        self.sent = sent
        self.parser = EventParser()
        self.started = False  # its first event (`subscribed` or `recovered`) was handled
        self.replaced = False  # cut because a newer stream (or none) takes over

    def events(self) -> Iterator[Event]:
        """Yield the stream's events as they arrive, until it ends, fails or is cut."""
        while True:
            try:
                chunk = self.response.raw.read1(_READ_SIZE)
            except (OSError, ValueError, HTTPException, urllib3.exceptions.HTTPError) as exc:
                log.debug("stream of %s ended: %s", ",".join(self.topics), exc)
                return
            if not chunk:
                return
            yield from self.parser.feed(chunk)

    def cut(self) -> None:
        """End the stream from any thread: a read blocked on it returns at once."""
        # Closing the socket would not wake a thread blocked in recv on it;
        # shutting it down does.
        sock = getattr(self.response.raw.connection, "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Release the connection (from the thread that reads the stream, or owns it)."""
        self.cut()
        with contextlib.suppress(OSError, ValueError, HTTPException, urllib3.exceptions.HTTPError):
            self.response.close()


def refusal(response: requests.Response) -> str:
    """Return the error a refused `GET /sse` names (`{"error": ...}`), or one its status implies."""
    if response.status_code == 404:
        return "sse_unavailable"  # no /sse here (an older server, or not Tidings)
    try:
        body = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, str) and error:
        return error
    return _STATUS_ERRORS.get(response.status_code, "unavailable")


class SseClient(ClientCore):
    """Subscribes to topics over Server-Sent Events and calls `on_publication` once per offset."""

    def __init__(
        self,
        url: str,
        *,
        on_publication: Handler,
        on_gap: Callable[[str], None] | None = None,
        token: Token = None,
        ack_timeout: float = 10,
        on_raw: Handler | None = None,
        on_unsubscribed: Callable[[str], None] | None = None,
        reconnection_delay: float = 0.2,
        reconnection_delay_max: float = 5.0,
        connect_timeout: float = 5.0,
        read_timeout: float = 45.0,
        path: str = "/sse",
        session: requests.Session | None = None,
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
        self.endpoint = url.rstrip("/") + path
        self.reconnection_delay = reconnection_delay
        self.reconnection_delay_max = reconnection_delay_max
        # Three keep-alive comments missed: the path is dead though TCP says nothing.
        self.timeouts = (connect_timeout, read_timeout)
        # Yours to configure (TLS verification, proxies, cookies) before connect().
        self.http = session or requests.Session()
        self._stream: _Stream | None = None  # the one the read thread reads
        self._handed: _Stream | None = None  # opened for it to read next
        self._waiters: dict[str, _Waiter] = {}
        # Serialises opening streams: a subscribe and the read thread's reconnect.
        self._open_lock = threading.Lock()
        self._wake = threading.Event()  # a stream was handed over, or disconnect()
        self._stopping = threading.Event()
        self._reader: threading.Thread | None = None

    # -- public --------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Tell whether a stream is open and started (False while there is none to read)."""
        stream = self._stream
        return stream is not None and stream.started

    def connect(self, timeout: float = 10) -> None:
        """Check that the server has `/sse` (retrying until `timeout`); start the read thread."""
        deadline = time.monotonic() + timeout
        attempt = 0
        while True:
            error = self._probe()
            if error is None:
                break
            if error == "sse_unavailable" or time.monotonic() > deadline:
                raise ConnectionError(f"{self.endpoint}: {error}")
            time.sleep(backoff_delay(attempt, self.reconnection_delay, 1.0))  # server starting
            attempt += 1
        if self._reader is None:
            self._reader = threading.Thread(target=self._run, name="tidings-sse", daemon=True)
            self._reader.start()

    def disconnect(self) -> None:
        """Close the stream for good and end the read thread."""
        with self._lock:
            self._closed = True
            streams = [self._stream, self._handed]
            waiters, self._waiters = list(self._waiters.items()), {}
        self._stopping.set()
        self._wake.set()
        for stream in streams:
            if stream is not None:
                stream.cut()
        for topic, waiter in waiters:
            waiter.answer({"ok": False, "topic": topic, "error": "disconnected"})
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(timeout=10)
        self.http.close()

    def subscribe(
        self, topic: str, *, since: str | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        """Subscribe (from `since`, or where this client stopped) and return the ack."""
        # The ack is built from the first event of a stream carrying the topic;
        # what it recovers follows on the stream, so `publications` stays empty.
        # No such stream in time: TimeoutError, and the topic stays wanted (the
        # next stream carries it), as a Socket.IO reconnect resubscribes it.
        if self._reader is None or self._closed:
            raise RuntimeError("connect() first (and not after disconnect())")
        deadline = time.monotonic() + (timeout or self.ack_timeout)
        with self._lock:
            state = self._topics.get(topic)
            if state is not None and not state.pending:
                # Held already: the stream carries it (or will, once reconnected).
                offset = state.last_offset if state.last_offset != BEGINNING else None
                return {
                    "ok": True,
                    "topic": topic,
                    "offset": offset,
                    "recovered": True,
                    "publications": [],
                }
            self._begin_subscribe(topic, since)
            waiter = self._waiters.setdefault(topic, _Waiter())
        error = self._reshape(deadline)
        if error is not None:
            with self._lock:
                state = self._topics.get(topic)
                if state is not None and state.pending:
                    del self._topics[topic]
                if self._waiters.get(topic) is waiter:
                    del self._waiters[topic]
            log.warning("subscribe %s refused: %s", topic, error)
            return {"ok": False, "topic": topic, "error": error}
        if not waiter.done.wait(max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"subscribe {topic}: no stream started in time")
        return waiter.ack

    def unsubscribe(self, topic: str, timeout: float = 10) -> dict[str, Any]:
        """Stop receiving a topic (a new stream without it replaces the current one)."""
        with self._lock:
            state = self._topics.pop(topic, None)
            waiter = self._waiters.pop(topic, None)
        if waiter is not None:
            waiter.answer({"ok": False, "topic": topic, "error": "unsubscribed"})
        # Should no new stream open, the current one goes on carrying the topic
        # until it is replaced; its publications are no longer delivered.
        if state is not None and self._reader is not None and not self._closed:
            self._reshape(time.monotonic() + timeout)
        return {"ok": True}

    # -- opening streams ---------------------------------------------------------

    def _probe(self) -> str | None:
        """GET /sse without a topic: a Tidings server names the missing topic (`no_topic`)."""
        try:
            with self.http.get(self.endpoint, timeout=self.timeouts) as response:
                error = refusal(response)
        except requests.RequestException as exc:
            log.warning("%s: %s", self.endpoint, exc)
            return "unavailable"
        return None if error == "no_topic" else error

    def _open(self, topics: list[str]) -> _Stream | str:
        """Open a stream of `topics`, each resuming from this client's offset; or the refusal."""
        with self._lock:
            sent = {t: (self._topics[t].last_offset if t in self._topics else None) for t in topics}
        headers = {"Accept": "text/event-stream"}
        token = self.current_token()
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if any(sent.values()):
            headers["Last-Event-ID"] = event_id([sent[topic] for topic in topics])
        try:
            response = self.http.get(
                self.endpoint,
                params=[("topic", topic) for topic in topics],
                headers=headers,
                stream=True,
                timeout=self.timeouts,
            )
        except requests.RequestException as exc:
            log.warning("stream of %s: %s", ",".join(topics), exc)
            return "unavailable"
        if response.status_code == 200:
            return _Stream(response, topics, sent)
        error = refusal(response)
        response.close()
        return error

    def _reshape(self, deadline: float) -> str | None:
        """Open a stream of the topics held now and hand it to the read thread; or the refusal."""
        attempt = 0
        with self._open_lock:
            while True:
                with self._lock:
                    topics = list(self._topics)
                    # Another subscribe's stream, opened meanwhile, may carry them
                    # all: its first event, still to come, answers every waiter.
                    upcoming = self._handed or self._stream
                if upcoming and not upcoming.started and set(upcoming.topics) == set(topics):
                    return None
                if not topics:
                    self._hand_over(None)
                    return None
                opened = self._open(topics)
                if isinstance(opened, _Stream):
                    self._hand_over(opened)
                    return None
                delay = resubscribe_delay(attempt)
                if opened not in RETRIED_ERRORS or time.monotonic() + delay > deadline:
                    return opened
                if self._stopping.wait(delay):
                    return "disconnected"
                attempt += 1

    def _hand_over(self, stream: _Stream | None) -> None:
        """Make `stream` the next one the read thread reads, cutting the one it reads now."""
        with self._lock:
            if self._closed:
                if stream is not None:
                    stream.close()
                return
            if self._handed is not None:
                self._handed.close()  # never read: `stream` carries its topics too
            self._handed = stream
            if self._stream is not None:
                self._stream.replaced = True
                self._stream.cut()
                self._stream = None
        self._wake.set()

    def _reconnect(self) -> _Stream | None:
        """Open a stream of every held topic from its offset; None if refused (logged)."""
        while True:
            with self._lock:
                topics = list(self._topics)
            if not topics:
                return None
            opened = self._open(topics)
            if isinstance(opened, _Stream):
                return opened
            if opened != "forbidden" or not self._drop_forbidden(topics):
                log.warning("stream of %s refused: %s; retrying", ",".join(topics), opened)
                return None

    def _drop_forbidden(self, topics: list[str]) -> bool:
        """Forget the topics refused on their own (the grant changed); False if none was."""
        dropped = False
        for topic in topics:
            opened = self._open([topic])
            if isinstance(opened, _Stream):
                opened.close()
            elif opened == "forbidden":
                log.warning("stream of %s refused: forbidden; forgetting the topic", topic)
                self._forget(topic, "forbidden")
                dropped = True
        return dropped

    def _forget(self, topic: str, error: str) -> None:
        with self._lock:
            state = self._topics.pop(topic, None)
            waiter = self._waiters.pop(topic, None)
        if waiter is not None:
            waiter.answer({"ok": False, "topic": topic, "error": error})
        elif state is not None:
            self.on_unsubscribed(topic)

    # -- the read thread -----------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while not self._closed:
            try:
                with self._open_lock:
                    self._wake.clear()
                    stream, self._handed = self._handed, None
                    if stream is None and not self._closed:
                        stream = self._reconnect()
                    with self._lock:
                        if self._closed:
                            if stream is not None:
                                stream.close()
                            return
                        self._stream = stream
                if stream is None:
                    with self._lock:
                        idle = not self._topics
                    # Nothing to read until a subscribe hands a stream over; or
                    # refused: ask again after a backoff (or once handed one).
                    self._wake.wait(
                        None
                        if idle
                        else backoff_delay(
                            failures, self.reconnection_delay, self.reconnection_delay_max
                        )
                    )
                    failures += 0 if idle else 1
                    continue
                expired = self._read(stream)
                stream.close()
                with self._lock:
                    if self._stream is stream:
                        self._stream = None
                if stream.started:
                    failures = 0
                if stream.replaced or expired or self._closed:
                    continue  # at once: the next stream is there, or wanted with a new token
                log.info("stream of %s dropped; reconnecting", ",".join(stream.topics))
                self._wake.wait(
                    backoff_delay(failures, self.reconnection_delay, self.reconnection_delay_max)
                )
                failures += 1
            except Exception:  # the token function failed: ask again later
                log.exception("SSE read thread: unexpected error; reconnecting")
                self._wake.wait(self.reconnection_delay_max)

    def _read(self, stream: _Stream) -> bool:
        """Handle a stream's events until it ends; True if the server said the token expired."""
        for event in stream.events():
            if self._closed:
                return False
            name = event.event
            if name == "token_expired":
                log.info("stream of %s: token expired", ",".join(stream.topics))
                return True
            if name not in ("publication", "subscribed", "recovered", "unsubscribed"):
                continue  # an event this client does not know: a newer server's
            try:
                data = json.loads(event.data)
            except ValueError:
                log.warning("stream of %s: unreadable %s event", ",".join(stream.topics), name)
                continue
            try:
                if name == "publication":
                    self._on_publications([data])
                elif name == "unsubscribed":
                    self._on_unsubscribed(data)
                elif not self._on_start(stream, event, data):
                    return False
            except Exception:  # the application's callback: its error is not the stream's
                log.exception("stream of %s: a callback failed", ",".join(stream.topics))
        return False

    def _on_start(self, stream: _Stream, event: Event, data: Any) -> bool:
        """Turn a stream's first event into each topic's ack; False if it cannot be read."""
        try:
            offsets = read_event_id(event.id, len(stream.topics))
        except ValueError as exc:
            log.warning("stream of %s: %s", ",".join(stream.topics), exc)
            return False
        resumed = event.event == "recovered"
        flags = data.get("topics") if isinstance(data, dict) else None
        flags = flags if isinstance(flags, dict) else {}
        stream.started = True
        self.connects += 1
        for topic, offset in zip(stream.topics, offsets, strict=True):
            since = stream.sent.get(topic)
            sent: dict[str, Any] = {"topic": topic}
            if since is not None:
                sent["since"] = since
            ack = {
                "ok": True,
                "topic": topic,
                # Where the stream starts: the topic's latest offset, or `since` when recovered.
                "offset": None if offset in (None, BEGINNING) else offset,
                "recovered": bool(resumed and since is not None and flags.get(topic) is True),
                "publications": [],
            }
            self._on_ack(topic, sent, ack, where=f"stream {self.connects}")
            with self._lock:
                waiter = self._waiters.pop(topic, None)
            if waiter is not None:
                waiter.answer(ack)
        return True
