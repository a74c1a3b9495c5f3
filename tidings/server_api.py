"""The server API as Python functions, for application code and Celery tasks.

    from tidings.server_api import presence, disconnect, revoke

    presence("rooms.lobby")            # {"topic", "clients", "users": [{"sub", "clients"}]}
    disconnect("alice")                # {"disconnected": 2, "nodes": 2, "answered": 2}
    revoke(sub="alice")                # tokens of alice issued before now are refused

The HTTP routes (webapp/server_api.py) and the `flask --app webapp` commands
call these. Every function checks its input first and raises `ApiError`
(with the HTTP status and a short error name) before anything changes; Redis
errors pass through. Without `client`/`settings`, they use a client of
TIDINGS_REDIS_URL made on first use.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from tidings import control, revocation
from tidings.cluster import Cluster
from tidings.connection import connect
from tidings.history import newest, parse_offset, recover
from tidings.lease import current_holder
from tidings.settings import Settings
from tidings.topics import is_valid_pattern, is_valid_topic, matches_any

# Items one POST may carry (subs to disconnect, pairs to unsubscribe, revocations).
MAX_ITEMS = 100
DEFAULT_HISTORY_LIMIT = 100
MAX_HISTORY_LIMIT = 1000

_lock = threading.Lock()
_default: tuple[redis.Redis, Settings] | None = None


class ApiError(ValueError):
    """Input the API refuses: `status` (HTTP), `error` (a short name), a detail."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(f"{error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail


def _defaults(
    client: redis.Redis | None, settings: Settings | None
) -> tuple[redis.Redis, Settings]:
    global _default
    if client is not None and settings is not None:
        return client, settings
    with _lock:
        if _default is None:
            loaded = Settings.from_env()
            _default = (connect(loaded.redis_url, "operator"), loaded)
    return client or _default[0], settings or _default[1]


def _cluster(client: redis.Redis, settings: Settings) -> Cluster:
    return Cluster(client, webhooks=settings.webhook_url is not None)


def _topic(topic: object) -> str:
    if not is_valid_topic(topic):
        raise ApiError(400, "invalid_topic", "a topic is 1 to 128 characters of A-Z a-z 0-9 _ . -")
    return topic  # type: ignore[return-value]


def _sub(sub: object) -> str:
    if not revocation.valid_sub(sub):
        raise ApiError(
            400,
            "invalid_sub",
            f"sub must be a string of 1 to {revocation.MAX_SUB_LENGTH} characters",
        )
    return sub  # type: ignore[return-value]


def _presence_topic(topic: object, settings: Settings) -> str:
    checked = _topic(topic)
    if not matches_any(checked, settings.presence_topics):
        raise ApiError(
            404, "presence_off", "this topic keeps no presence (TIDINGS_PRESENCE_TOPICS)"
        )
    return checked


def topics(
    pattern: str | None = None,
    *,
    client: redis.Redis | None = None,
    settings: Settings | None = None,
) -> list[dict[str, Any]]:
    """Return the topics with at least one subscriber across nodes, sorted, and their clients."""
    client, settings = _defaults(client, settings)
    if pattern is not None and not is_valid_pattern(pattern):
        raise ApiError(
            400, "invalid_pattern", "a pattern is a topic glob (A-Z a-z 0-9 _ . - * ? [ ])"
        )
    counts = _cluster(client, settings).topics()
    return [
        {"topic": topic, "clients": counts[topic]}
        for topic in sorted(counts)
        if pattern is None or matches_any(topic, (pattern,))
    ]


def presence(
    topic: str, *, client: redis.Redis | None = None, settings: Settings | None = None
) -> dict[str, Any]:
    """Return who is subscribed to a presence topic: `{"topic", "clients", "users"}`."""
    return _presence_read(topic, client, settings, Cluster.members)


def presence_stats(
    topic: str, *, client: redis.Redis | None = None, settings: Settings | None = None
) -> dict[str, Any]:
    """Return how many connections and users a presence topic has (`users` is a count)."""
    return _presence_read(topic, client, settings, Cluster.stats)


def _presence_read(
    topic: str,
    client: redis.Redis | None,
    settings: Settings | None,
    read: Callable[[Cluster, str], tuple[int, Any]],
) -> dict[str, Any]:
    client, settings = _defaults(client, settings)
    checked = _presence_topic(topic, settings)
    clients, users = read(_cluster(client, settings), checked)
    return {"topic": checked, "clients": clients, "users": users}


def history(
    topic: str,
    since: str | None = None,
    limit: int = DEFAULT_HISTORY_LIMIT,
    *,
    client: redis.Redis | None = None,
    settings: Settings | None = None,
) -> dict[str, Any]:
    """Return a topic's history: after `since` (as a `subscribe` recovers), else the newest.

    At most `limit` publications, oldest first; with `since`, page on by
    asking again from the last offset returned.
    """
    client, settings = _defaults(client, settings)
    checked = _topic(topic)
    if since is not None and parse_offset(since) is None:
        raise ApiError(400, "invalid_offset", "since is an offset, <ms>-<seq>")
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_HISTORY_LIMIT:
        raise ApiError(
            400, "invalid_limit", f"limit is a whole number from 1 to {MAX_HISTORY_LIMIT}"
        )
    if since is None:
        publications = newest(client, checked, limit)
        offset = publications[-1]["offset"] if publications else None
        recovered = None
    else:
        recovery = recover(client, checked, since, history_size=settings.history_size)
        publications = recovery.publications[:limit]
        offset, recovered = recovery.offset, recovery.recovered
    if offset is None:
        raise ApiError(404, "unknown_topic", "this topic has no history")
    return {
        "topic": checked,
        "offset": offset,
        "recovered": recovered,
        "publications": publications,
    }


def _subs(subs: str | list[str]) -> list[str]:
    items = [subs] if isinstance(subs, str) else subs
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_ITEMS:
        raise ApiError(400, "invalid_batch", f"a batch holds 1 to {MAX_ITEMS} items")
    return [_sub(sub) for sub in items]


def disconnect(
    subs: str | list[str],
    *,
    timeout: float = control.DEFAULT_TIMEOUT,
    client: redis.Redis | None = None,
    settings: Settings | None = None,
) -> dict[str, int]:
    """Close every connection of a user (or of each user in a list), on every node."""
    client, _ = _defaults(client, settings)
    checked = _subs(subs)
    answer = control.send(client, "disconnect", {"subs": checked}, timeout)
    return {"disconnected": answer.count, "nodes": answer.nodes, "answered": answer.answered}


def unsubscribe(
    pairs: list[tuple[str, str]],
    *,
    timeout: float = control.DEFAULT_TIMEOUT,
    client: redis.Redis | None = None,
    settings: Settings | None = None,
) -> dict[str, int]:
    """Unsubscribe users' connections from topics, on every node: `[(sub, topic), ...]`."""
    client, _ = _defaults(client, settings)
    if not isinstance(pairs, list) or not 1 <= len(pairs) <= MAX_ITEMS:
        raise ApiError(400, "invalid_batch", f"a batch holds 1 to {MAX_ITEMS} items")
    checked = []
    for pair in pairs:
        if not isinstance(pair, list | tuple) or len(pair) != 2:
            raise ApiError(400, "invalid_body", 'expected {"sub": ..., "topic": ...}')
        checked.append([_sub(pair[0]), _topic(pair[1])])
    answer = control.send(client, "unsubscribe", {"pairs": checked}, timeout)
    return {"unsubscribed": answer.count, "nodes": answer.nodes, "answered": answer.answered}


def revoke(
    items: list[dict[str, Any]],
    *,
    timeout: float = control.DEFAULT_TIMEOUT,
    client: redis.Redis | None = None,
    settings: Settings | None = None,
) -> dict[str, int]:
    """Revoke tokens: each item `{"sub", "before"?}` (before defaults to now) or `{"jti"}`.

    Tokens of that user issued before `before` (their `iat`), or with that
    `jti`, are refused at connect and their live connections closed.
    """
    client, settings = _defaults(client, settings)
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_ITEMS:
        raise ApiError(400, "invalid_batch", f"a batch holds 1 to {MAX_ITEMS} items")
    now = time.time()
    ttl = settings.revocation_ttl
    entries: list[tuple[str, float] | str] = []
    for item in items:
        if not isinstance(item, dict) or not ({"sub", "jti"} & set(item)):
            raise ApiError(
                400, "invalid_body", 'expected {"sub": ..., "before"?: ...} or {"jti": ...}'
            )
        if set(item) - {"sub", "before", "jti"} or ("jti" in item and set(item) != {"jti"}):
            raise ApiError(400, "invalid_body", 'give {"sub", "before"?} or {"jti"}, not both')
        if "jti" in item:
            if not revocation.valid_token_id(item["jti"]):
                raise ApiError(
                    400,
                    "invalid_jti",
                    f"jti must be a string of 1 to {revocation.MAX_TOKEN_ID_LENGTH} characters",
                )
            entries.append(item["jti"])
            continue
        before = item.get("before", now)
        if not revocation.valid_before(before, ttl, now):
            raise ApiError(
                400, "invalid_before", "before is a unix time, at most TIDINGS_REVOCATION_TTL ahead"
            )
        entries.append((_sub(item["sub"]), float(before)))
    revocation.store(client, entries, ttl, now)
    answer = control.send(client, "revoke", {}, timeout)
    return {
        "revoked": len(entries),
        "disconnected": answer.count,
        "nodes": answer.nodes,
        "answered": answer.answered,
    }


def info(*, client: redis.Redis | None = None, settings: Settings | None = None) -> dict[str, Any]:
    """Return the live web nodes and the listener."""
    client, settings = _defaults(client, settings)
    nodes = []
    for facts in _cluster(client, settings).nodes():
        nodes.append(
            {
                "node": facts["node"],
                "pid": _int(facts.get("pid")),
                "connections": _int(facts.get("connections")),
                "topics": _int(facts.get("topics")),
                "started": _int(facts.get("started")),
                "seen": _int(facts.get("seen")),
            }
        )
    holder = current_holder(client)
    listener: dict[str, Any] = {"running": holder is not None}
    if holder is not None:
        listener.update(host=holder.host, pid=holder.pid, since=holder.since_ms)
    return {"nodes": nodes, "listener": listener}


def _int(raw: str | None) -> int | None:
    try:
        return int(raw) if raw is not None else None
    except ValueError:
        return None
