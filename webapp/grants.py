"""Who may subscribe to what: public patterns and connection tokens (JWT).

A token is a JWT with claims `sub` (user id), `topics` (glob patterns) and
`exp`, signed HS256 with TIDINGS_SECRET, or RS256/ES256 with the private key
whose public half is TIDINGS_JWT_PUBLIC_KEY (the issuing service then never
shares a secret with Tidings). Only those algorithms are accepted: a token
with `alg: none` or any other algorithm is invalid, and so is one whose
signature, expiry or claims do not check.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

import jwt

from tidings.revocation import MAX_TOKEN_ID_LENGTH
from tidings.settings import Settings
from tidings.topics import is_valid_pattern, matches_any

MAX_TOKEN_LENGTH = 8192


class InvalidToken(Exception):
    """A token that is malformed, wrongly signed, expired or of another algorithm."""


@dataclass
class Grant:
    """What one connection may read, and until when."""

    sub: str | None = None
    patterns: tuple[str, ...] = ()
    expires_at: float | None = None
    # Topics subscribed, with the expiry of the channel token that allowed
    # each one when the connection's own grant did not (None: no expiry).
    topics: dict[str, float | None] = field(default_factory=dict)
    # When this connection was told its token expired (None: not yet).
    expiry_notified_at: float | None = None
    # The token's `iat` and `jti` claims, checked against revocations.
    issued_at: float | None = None
    token_id: str | None = None

    def allows(self, topic: str, public: tuple[str, ...]) -> bool:
        """Tell whether this connection may subscribe to `topic` by itself."""
        return matches_any(topic, public) or matches_any(topic, self.patterns)


@dataclass(frozen=True)
class Claims:
    """A checked token's claims."""

    sub: str
    patterns: tuple[str, ...]
    expires_at: float
    issued_at: float | None = None
    token_id: str | None = None


def _keys(settings: Settings) -> list[tuple[str, list[str]]]:
    keys = []
    if settings.secret:
        keys.append((settings.secret, ["HS256"]))
    if settings.jwt_public_key:
        keys.append((settings.jwt_public_key, ["RS256", "ES256"]))
    return keys


def decode_token(token: object, settings: Settings) -> Claims:
    """Check a token against the configured keys; raise InvalidToken otherwise."""
    keys = _keys(settings)
    if not keys:
        raise InvalidToken("no key configured (TIDINGS_SECRET or TIDINGS_JWT_PUBLIC_KEY)")
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_LENGTH:
        raise InvalidToken("not a token")
    try:
        algorithm = jwt.get_unverified_header(token).get("alg")
    except jwt.PyJWTError as exc:
        raise InvalidToken(str(exc)) from None
    for key, algorithms in keys:
        if algorithm in algorithms:
            try:
                claims = jwt.decode(
                    token, key, algorithms=algorithms, options={"require": ["exp", "sub"]}
                )
            except jwt.PyJWTError as exc:
                raise InvalidToken(str(exc)) from None
            break
    else:
        raise InvalidToken(f"algorithm {algorithm!r} is not accepted")
    topics = claims.get("topics", [])
    if not isinstance(topics, list) or not all(is_valid_pattern(p) for p in topics):
        raise InvalidToken("claim 'topics' must be a list of topic patterns")
    token_id = claims.get("jti")
    if token_id is not None and (
        not isinstance(token_id, str) or not token_id or len(token_id) > MAX_TOKEN_ID_LENGTH
    ):
        raise InvalidToken(f"claim 'jti' must be a string of 1 to {MAX_TOKEN_ID_LENGTH} characters")
    issued_at = claims.get("iat")  # PyJWT checked that it is a number, if present
    return Claims(
        sub=str(claims["sub"]),
        patterns=tuple(topics),
        expires_at=float(claims["exp"]),
        issued_at=float(issued_at) if issued_at is not None else None,
        token_id=token_id,
    )


def grant_for(claims: Claims) -> Grant:
    """Return a connection's grant from its token's claims."""
    return Grant(
        sub=claims.sub,
        patterns=claims.patterns,
        expires_at=claims.expires_at,
        issued_at=claims.issued_at,
        token_id=claims.token_id,
    )


def make_token(secret: str, sub: str, topics: list[str], ttl: int) -> str:
    """Sign an HS256 connection token for `sub` granting `topics` for `ttl` seconds.

    It carries `iat` and a random `jti`, so that it can be revoked by time
    or by id (POST /api/revoke).
    """
    now = int(time.time())
    claims = {
        "sub": sub,
        "topics": topics,
        "iat": now,
        "exp": now + ttl,
        "jti": secrets.token_urlsafe(12),
    }
    return jwt.encode(claims, secret, algorithm="HS256")
