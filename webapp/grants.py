"""Who may subscribe to what: public patterns and connection tokens (JWT)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import jwt

from tidings.topics import is_valid_pattern, matches_any


class InvalidToken(Exception):
    """A token that is malformed, wrongly signed, expired or not HS256."""


@dataclass
class Grant:
    """What one connection may read: its user and topic patterns."""

    sub: str | None = None
    patterns: tuple[str, ...] = ()
    expires_at: float | None = None
    topics: set[str] = field(default_factory=set)

    def allows(self, topic: str, public: tuple[str, ...]) -> bool:
        """Tell whether this connection may subscribe to `topic`."""
        return matches_any(topic, public) or matches_any(topic, self.patterns)


def decode_token(token: object, secret: str | None) -> Grant:
    """Check a connection token and return its grant; raise InvalidToken otherwise."""
    if not secret or not isinstance(token, str) or len(token) > 8192:
        raise InvalidToken("no secret configured" if not secret else "not a token")
    try:
        claims = jwt.decode(
            token, secret, algorithms=["HS256"], options={"require": ["exp", "sub"]}
        )
    except jwt.PyJWTError as exc:
        raise InvalidToken(str(exc)) from None
    topics = claims.get("topics", [])
    if not isinstance(topics, list) or not all(is_valid_pattern(p) for p in topics):
        raise InvalidToken("claim 'topics' must be a list of topic patterns")
    return Grant(sub=str(claims["sub"]), patterns=tuple(topics), expires_at=float(claims["exp"]))


def make_token(secret: str, sub: str, topics: list[str], ttl: int) -> str:
    """Sign a connection token for `sub` granting `topics` for `ttl` seconds."""
    claims = {"sub": sub, "topics": topics, "exp": int(time.time()) + ttl}
    return jwt.encode(claims, secret, algorithm="HS256")
