"""Revoked tokens: by user (`sub`, tokens issued before a time) or by token id (`jti`).

Revocations live in Redis (two sorted sets and a version counter, see
tidings/keys.py) and every web node keeps a copy in memory, so that a
connect is checked without a round trip; a node reloads its copy when the
version moves (its heartbeat reads it every second) or when told at once
on the control channel.

How long an entry is kept: TIDINGS_REVOCATION_TTL (30 days by default),
which must be no shorter than the longest lifetime of the tokens you issue
(`flask token --ttl` is capped at it). A `jti` entry is kept that long after
the revocation; a `sub` entry that long after its `before`, when every token
issued before it has expired.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import redis

from tidings.keys import REVOKED_JTIS, REVOKED_SUBS, REVOKED_VERSION

MAX_SUB_LENGTH = 1024
MAX_TOKEN_ID_LENGTH = 256


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass
class Revocations:
    """A node's copy of the revocations."""

    subs: dict[str, float] = field(default_factory=dict)
    token_ids: set[str] = field(default_factory=set)
    version: str | None = None

    def refuses(self, sub: str | None, issued_at: float | None, token_id: str | None) -> bool:
        """Tell whether a token with these claims is revoked.

        A token of a revoked user without `iat` cannot prove it is newer: refused.
        """
        if token_id is not None and token_id in self.token_ids:
            return True
        if sub is None:
            return False
        before = self.subs.get(sub)
        return before is not None and (issued_at is None or issued_at < before)


def load(client: redis.Redis, ttl: int, now: float | None = None) -> Revocations:
    """Read the revocations still in force (one round trip)."""
    now = time.time() if now is None else now
    pipe = client.pipeline(transaction=False)
    pipe.get(REVOKED_VERSION)
    pipe.zrangebyscore(REVOKED_SUBS, now - ttl, "+inf", withscores=True)
    pipe.zrangebyscore(REVOKED_JTIS, now, "+inf")
    version, subs, token_ids = pipe.execute()
    return Revocations(
        subs={_text(sub): float(before) for sub, before in subs},
        token_ids={_text(token_id) for token_id in token_ids},
        version=_text(version) if version is not None else "0",
    )


def store(
    client: redis.Redis,
    entries: list[tuple[str, float] | str],
    ttl: int,
    now: float | None = None,
) -> None:
    """Record revocations: (sub, before) pairs and token ids; drop the expired ones.

    A `sub` keeps its latest `before` (ZADD GT): revoking again never
    weakens an earlier revocation.
    """
    now = time.time() if now is None else now
    pipe = client.pipeline(transaction=True)
    for entry in entries:
        if isinstance(entry, tuple):
            sub, before = entry
            pipe.zadd(REVOKED_SUBS, {sub: before}, gt=True)
        else:
            pipe.zadd(REVOKED_JTIS, {entry: now + ttl}, gt=True)
    pipe.zremrangebyscore(REVOKED_SUBS, "-inf", f"({now - ttl}")
    pipe.zremrangebyscore(REVOKED_JTIS, "-inf", f"({now}")
    pipe.incr(REVOKED_VERSION)
    pipe.execute()


def valid_sub(sub: object) -> bool:
    """Tell whether `sub` can be a user id (a non-empty string of at most MAX_SUB_LENGTH)."""
    return isinstance(sub, str) and 0 < len(sub) <= MAX_SUB_LENGTH


def valid_token_id(token_id: object) -> bool:
    """Tell whether `token_id` can be a `jti`."""
    return isinstance(token_id, str) and 0 < len(token_id) <= MAX_TOKEN_ID_LENGTH


def valid_before(before: object, ttl: int, now: float | None = None) -> bool:
    """Tell whether `before` is a unix time a revocation may name (up to `ttl` ahead)."""
    now = time.time() if now is None else now
    return (
        isinstance(before, int | float)
        and not isinstance(before, bool)
        and math.isfinite(before)
        and 0 <= before <= now + ttl
    )
