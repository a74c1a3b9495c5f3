"""Per-topic history streams: offsets and recovery with `since`."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import redis

from tidings.keys import history_key

_OFFSET = re.compile(r"(\d{1,20})-(\d{1,20})")


def parse_offset(offset: object) -> tuple[int, int] | None:
    """Return an offset `<ms>-<seq>` as a sortable pair, or None when malformed."""
    if not isinstance(offset, str):
        return None
    match = _OFFSET.fullmatch(offset)
    return (int(match[1]), int(match[2])) if match else None


@dataclass
class Recovery:
    """What a `subscribe` ack reports: latest offset, recovered flag, publications."""

    offset: str | None
    recovered: bool
    publications: list[dict[str, Any]] = field(default_factory=list)


def _publication(topic: str, entry_id: bytes, fields: dict[bytes, bytes]) -> dict[str, Any]:
    return {"topic": topic, "offset": entry_id.decode(), "data": json.loads(fields[b"d"])}


# What a client says when it subscribed while the topic had no history yet.
BEGINNING = "0-0"


def recover(client: redis.Redis, topic: str, since: str | None, *, history_size: int) -> Recovery:
    """Read the topic's latest offset and, with `since`, everything after it.

    `since` is recoverable while history has not been trimmed past it:
    trimming removes the oldest entries first, so `since` still present, or
    an entry older than it still present, proves nothing after it was
    trimmed. (`since` itself can be missing after a Redis failover: the new
    master may never have had it.) `since` = "0-0" (the client
    saw the topic empty) is recoverable while the stream was never trimmed,
    that is while it holds fewer than `history_size` entries (the cap is
    exact). One round trip, two when `since` is gone.
    """
    return recover_many(client, [(topic, since)], history_size=history_size)[0]


def recover_many(
    client: redis.Redis, wanted: list[tuple[str, str | None]], *, history_size: int
) -> list[Recovery]:
    """`recover` for several (topic, since) pairs, pipelined: one or two round trips in all."""
    pipe = client.pipeline(transaction=False)
    for topic, since in wanted:
        key = history_key(topic)
        pipe.xrevrange(key, count=1)
        if parse_offset(since) is not None:
            pipe.xrange(key, min=since)
    replies = iter(pipe.execute())
    results: list[Recovery] = []
    unsure: list[tuple[int, str, tuple[int, int], list]] = []
    for topic, since in wanted:
        newest = next(replies)
        latest = newest[0][0].decode() if newest else None
        since_pair = parse_offset(since)
        if since_pair is None:
            results.append(Recovery(offset=latest, recovered=False))
            continue
        entries = next(replies)
        if since_pair == (0, 0):
            if len(entries) >= history_size:
                results.append(Recovery(offset=latest, recovered=False))
                continue
        elif entries and entries[0][0].decode() == since:
            entries = entries[1:]
        else:
            # `since` is not in history: recoverable only if an older entry
            # still is (trimming, oldest first, has not passed it). After a
            # Redis failover, a client may hold an offset the new master never had.
            unsure.append((len(results), topic, since_pair, entries))
            results.append(Recovery(offset=latest, recovered=False))
            continue
        results.append(_recovered(topic, latest, entries))
    if unsure:
        pipe = client.pipeline(transaction=False)
        for _, topic, _, _ in unsure:
            pipe.xrange(history_key(topic), count=1)
        for (index, topic, since_pair, entries), oldest in zip(unsure, pipe.execute(), strict=True):
            if oldest and parse_offset(oldest[0][0].decode()) < since_pair:
                results[index] = _recovered(topic, results[index].offset, entries)
    return results


def _recovered(topic: str, latest: str | None, entries: list) -> Recovery:
    publications = [_publication(topic, entry_id, fields) for entry_id, fields in entries]
    return Recovery(offset=latest, recovered=True, publications=publications)


def newest(client: redis.Redis, topic: str, count: int) -> list[dict[str, Any]]:
    """Return the newest `count` publications of a topic's history, oldest first."""
    entries = client.xrevrange(history_key(topic), count=count)
    return [_publication(topic, entry_id, fields) for entry_id, fields in reversed(entries)]
