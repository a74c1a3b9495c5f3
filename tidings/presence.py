"""One web node's share of presence, kept in memory: who is connected, subscribed to what.

Every connect, subscribe, unsubscribe and disconnect changes only this
bookkeeping (no Redis round trip); what changed since the last flush is
taken as one `Batch` of net deltas, which `tidings.cluster` applies to the
cluster-wide state in one script every FLUSH_SECONDS. Join and leave events
of the topics that want them are collected here too and sent once per flush.

Thread-safe (one lock, no I/O under it): Flask-SocketIO's threading mode
runs handlers on several threads; under gevent it costs next to nothing.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tidings.topics import matches_any

# The cache of pattern lookups is cleared past this many topics.
_MAX_CACHED = 10_000


@dataclass
class Member:
    """One connection of this node, as presence sees it."""

    sub: str | None
    issued_at: float | None = None
    token_id: str | None = None
    # Counted in tidings:users (TIDINGS_MAX_CONNECTIONS_PER_USER is set).
    counted: bool = False
    topics: set[str] = field(default_factory=set)


@dataclass
class Batch:
    """What changed on this node since the last flush (or, for a sync, all of it)."""

    topics: dict[str, int] = field(default_factory=dict)
    members: dict[tuple[str, str], int] = field(default_factory=dict)
    users: dict[str, int] = field(default_factory=dict)
    # topic -> [(event, {"topic", "sub", "client"}), ...] in the order they happened
    events: dict[str, list[tuple[str, dict[str, Any]]]] = field(default_factory=dict)

    def empty(self) -> bool:
        """Tell whether there is nothing to apply (events aside)."""
        return not (self.topics or self.members or self.users)

    def as_script_args(self) -> dict[str, list]:
        """Return the deltas in the JSON shape the cluster script reads."""
        return {
            "t": [[topic, n] for topic, n in self.topics.items()],
            "m": [[topic, sub, n] for (topic, sub), n in self.members.items()],
            "u": [[sub, n] for sub, n in self.users.items()],
        }


class LocalPresence:
    """This node's connections, topics and members, and the deltas not yet flushed."""

    def __init__(
        self, presence_topics: tuple[str, ...] = (), join_leave_topics: tuple[str, ...] = ()
    ) -> None:
        self.presence_topics = presence_topics
        self.join_leave_topics = join_leave_topics
        self._lock = threading.Lock()
        self.members: dict[str, Member] = {}
        self._by_sub: dict[str, set[str]] = {}
        self._topics: Counter[str] = Counter()
        self._topic_members: dict[str, Counter[str]] = {}
        self._users: Counter[str] = Counter()
        self._pending = Batch()
        self._kinds: dict[str, tuple[bool, bool]] = {}

    # -- what topics keep ---------------------------------------------------------

    def _kind(self, topic: str) -> tuple[bool, bool]:
        """Return (keeps presence, sends join/leave events) for a topic, cached."""
        kind = self._kinds.get(topic)
        if kind is None:
            presence = matches_any(topic, self.presence_topics)
            # Join/leave events need presence on: the contract says so.
            kind = (presence, presence and matches_any(topic, self.join_leave_topics))
            if len(self._kinds) >= _MAX_CACHED:
                self._kinds.clear()
            self._kinds[topic] = kind
        return kind

    def keeps_presence(self, topic: str) -> bool:
        """Tell whether `topic` keeps presence (TIDINGS_PRESENCE_TOPICS)."""
        return self._kind(topic)[0]

    # -- events of the Socket.IO handlers ----------------------------------------

    def connect(
        self,
        sid: str,
        sub: str | None,
        *,
        issued_at: float | None = None,
        token_id: str | None = None,
        counted: bool = False,
    ) -> None:
        """Record a new connection (`counted`: already added to tidings:users)."""
        with self._lock:
            self.members[sid] = Member(sub, issued_at, token_id, counted)
            if sub is not None:
                self._by_sub.setdefault(sub, set()).add(sid)
                if counted:
                    self._users[sub] += 1

    def refresh(self, sid: str, issued_at: float | None, token_id: str | None) -> None:
        """Record the claims of a connection's new token."""
        with self._lock:
            member = self.members.get(sid)
            if member is not None:
                member.issued_at, member.token_id = issued_at, token_id

    def subscribe(self, sid: str, topic: str) -> None:
        """Record that a connection subscribed to `topic` (again is a no-op)."""
        with self._lock:
            member = self.members.get(sid)
            if member is None or topic in member.topics:
                return
            member.topics.add(topic)
            self._change(sid, member.sub, topic, 1)

    def unsubscribe(self, sid: str, topic: str) -> None:
        """Record that a connection left `topic` (not subscribed: a no-op)."""
        with self._lock:
            member = self.members.get(sid)
            if member is None or topic not in member.topics:
                return
            member.topics.discard(topic)
            self._change(sid, member.sub, topic, -1)

    def disconnect(self, sid: str) -> Member | None:
        """Record that a connection closed: it leaves every topic."""
        with self._lock:
            member = self.members.pop(sid, None)
            if member is None:
                return None
            for topic in member.topics:
                self._change(sid, member.sub, topic, -1)
            if member.sub is not None:
                sids = self._by_sub.get(member.sub)
                if sids is not None:
                    sids.discard(sid)
                    if not sids:
                        del self._by_sub[member.sub]
                if member.counted:
                    self._users[member.sub] -= 1
                    if self._users[member.sub] <= 0:
                        del self._users[member.sub]
                    self._add(self._pending.users, member.sub, -1)
            return member

    def _change(self, sid: str, sub: str | None, topic: str, delta: int) -> None:
        pending = self._pending
        self._topics[topic] += delta
        if self._topics[topic] <= 0:
            del self._topics[topic]
        self._add(pending.topics, topic, delta)
        presence, join_leave = self._kind(topic)
        if presence and sub is not None:
            counts = self._topic_members.setdefault(topic, Counter())
            counts[sub] += delta
            if counts[sub] <= 0:
                del counts[sub]
                if not counts:
                    del self._topic_members[topic]
            self._add(pending.members, (topic, sub), delta)
        if join_leave:
            event = "joins" if delta > 0 else "leaves"
            pending.events.setdefault(topic, []).append(
                (event, {"topic": topic, "sub": sub, "client": sid})
            )

    @staticmethod
    def _add(deltas: dict, key: Any, delta: int) -> None:
        value = deltas.get(key, 0) + delta
        if value:
            deltas[key] = value
        else:
            deltas.pop(key, None)  # net nothing since the last flush

    # -- flushing -------------------------------------------------------------------

    def take(self) -> Batch:
        """Return what changed since the last call, and start afresh."""
        with self._lock:
            batch, self._pending = self._pending, Batch()
            return batch

    def snapshot(self) -> Batch:
        """Return this node's whole share (for a sync), with the pending events; start afresh."""
        with self._lock:
            events, self._pending = self._pending.events, Batch()
            return Batch(
                topics=dict(self._topics),
                members={
                    (topic, sub): n
                    for topic, counts in self._topic_members.items()
                    for sub, n in counts.items()
                },
                users=dict(self._users),
                events=events,
            )

    # -- lookups ----------------------------------------------------------------------

    def sids_of(self, sub: str) -> list[str]:
        """Return the sids of a user's connections on this node."""
        with self._lock:
            return list(self._by_sub.get(sub, ()))

    def matching(self, predicate: Any) -> list[str]:
        """Return the sids whose Member satisfies `predicate` (a revocation check)."""
        with self._lock:
            return [sid for sid, member in self.members.items() if predicate(member)]

    def local_counts(self) -> tuple[int, int]:
        """Return (connections, topics with a subscriber) on this node."""
        with self._lock:
            return len(self.members), len(self._topics)

    def is_subscribed(self, sid: str, topic: str) -> bool:
        """Tell whether a connection of this node is subscribed to `topic`."""
        with self._lock:
            member = self.members.get(sid)
            return member is not None and topic in member.topics

    def pending(self) -> bool:
        """Tell whether deltas or join/leave events wait for a flush."""
        return not self._pending.empty() or bool(self._pending.events)
