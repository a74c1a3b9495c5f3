"""What both Python clients share: per-topic offsets, acks, de-duplication, gaps, backoff.

A client keeps the last offset of every topic it holds, asks to resume from
it, delivers recovered publications before live ones, drops anything at or
below the last offset, and reports a history gap (`recovered: false`) through
`on_gap` so the application can resync. The transports (Socket.IO in
`tidings.client`, Server-Sent Events in `tidings.client_sse`) turn their wire
into the same acks and publications and hand them to `ClientCore`.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tidings.history import BEGINNING, parse_offset

log = logging.getLogger("tidings.client")

Handler = Callable[[dict[str, Any]], None]
# A token, or a function returning one: asked again at every (re)connection,
# so a long-lived client can hand over a fresh token before the old expires.
Token = str | Callable[[], str | None] | None

# Subscribe answers that are asked again after a backoff.
RETRIED_ERRORS = ("unavailable", "limit")
# Resubscribe retries wait 50 ms, doubling up to 2 s, each drawn from 50% to
# 150% of its step: clients refused together (a worker that is not yet
# subscribed to its queue answers all of them `unavailable` at once) must not
# all ask again together.
RESUBSCRIBE_DELAY = 0.05
RESUBSCRIBE_DELAY_MAX = 2.0


def backoff_delay(attempt: int, first: float, most: float) -> float:
    """Seconds before retry `attempt` (0, 1, ...): `first` doubling up to `most`, +-50%."""
    step = min(first * 2**attempt, most)
    return step * random.uniform(0.5, 1.5)


def resubscribe_delay(attempt: int) -> float:
    """Seconds before resubscribe retry `attempt` (0, 1, ...): doubling, capped, jittered."""
    return backoff_delay(attempt, RESUBSCRIBE_DELAY, RESUBSCRIBE_DELAY_MAX)


@dataclass
class _Topic:
    last: tuple[int, int] | None = None
    last_offset: str | None = None
    pending: bool = False
    buffered: list[dict[str, Any]] = field(default_factory=list)


class ClientCore:
    """The topics a client holds, and the rules that hand each publication over once, in order."""

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
    ) -> None:
        self.url = url
        self.on_publication = on_publication
        self.on_gap = on_gap or (lambda topic: None)
        # Every publication as it arrives, before de-duplication (tests count these).
        self.on_raw = on_raw or (lambda pub: None)
        # The server unsubscribed this client from a topic (POST /api/unsubscribe).
        self.on_unsubscribed = on_unsubscribed or (lambda topic: None)
        self.token = token
        self.ack_timeout = ack_timeout
        self.recovered = 0
        self.gaps = 0
        self.connects = 0
        self._lock = threading.RLock()
        self._closed = False
        self._topics: dict[str, _Topic] = {}

    def last_offset(self, topic: str) -> str | None:
        """Return the last offset delivered for `topic`."""
        with self._lock:
            state = self._topics.get(topic)
            return state.last_offset if state else None

    def current_token(self) -> str | None:
        """Return the token to connect with now (calling the token function, if one was given)."""
        return self.token() if callable(self.token) else self.token

    def _begin_subscribe(self, topic: str, since: str | None) -> dict[str, Any]:
        """Mark `topic` pending and return the subscribe payload (`since` when there is one)."""
        pair = parse_offset(since) if since is not None else None
        if since is not None and pair is None:
            raise ValueError(f"not an offset: {since!r}")
        with self._lock:
            state = self._topics.setdefault(topic, _Topic())
            # An offset the application kept (say, in its database): resume
            # from it, unless this client has delivered beyond it already.
            if pair is not None and (state.last is None or pair > state.last):
                state.last, state.last_offset = pair, since
            state.pending = True
            payload: dict[str, Any] = {"topic": topic}
            if state.last_offset is not None:
                payload["since"] = state.last_offset
            return payload

    def _on_ack(self, topic: str, sent: dict[str, Any], ack: Any, *, where: str = "") -> None:
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
                "%s subscribed %s since %s: offset %s, recovered %s (%d), %d buffered",
                where,
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
