"""Publishing from application code and Celery tasks: `publish(topic, data)`."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

import redis

from tidings.connection import connect
from tidings.forwarder import now_ms
from tidings.keys import INGEST_STREAM, topic_channel
from tidings.payloads import encode
from tidings.settings import Settings
from tidings.topics import is_valid_topic

_lock = threading.Lock()
_default: tuple[redis.Redis, Settings] | None = None


class PublishError(ValueError):
    """A publication rejected before it reached Redis (bad topic, too large)."""


def _default_client() -> tuple[redis.Redis, Settings]:
    global _default
    with _lock:
        if _default is None:
            settings = Settings.from_env()
            _default = (connect(settings.redis_url, "publisher"), settings)
        return _default


def _checked(topic: str, data: Any, max_payload: int) -> str:
    if not is_valid_topic(topic):
        raise PublishError(f"invalid topic {topic!r}: 1-128 characters of A-Z a-z 0-9 _ . -")
    try:
        payload = encode(data)
    except (TypeError, ValueError) as exc:
        raise PublishError(f"data is not JSON-serialisable: {exc}") from None
    if len(payload.encode("utf-8")) > max_payload:
        raise PublishError(f"payload of topic {topic!r} is over {max_payload} bytes")
    return payload


def publish_many(
    items: Iterable[tuple[str, Any]],
    *,
    durable: bool = True,
    client: redis.Redis | None = None,
    settings: Settings | None = None,
) -> list[str | int]:
    """Publish (topic, data) pairs in one round trip.

    Durable publications go to the `tidings:ingest` stream and survive a
    listener restart; the result is their ingest ids. Fast ones use
    `PUBLISH tidings:topic:<topic>` (lost while no listener runs); the result
    is each PUBLISH's receiver count. Everything is checked before anything
    is sent, so a bad item publishes nothing.
    """
    if client is None or settings is None:
        default_client, default_settings = _default_client()
        client = client or default_client
        settings = settings or default_settings
    checked = [(topic, _checked(topic, data, settings.max_payload)) for topic, data in items]
    pipe = client.pipeline(transaction=False)
    stamp = str(now_ms())
    for topic, payload in checked:
        if durable:
            pipe.xadd(INGEST_STREAM, {"topic": topic, "data": payload, "ts": stamp})
        else:
            pipe.publish(topic_channel(topic), payload)
    replies = pipe.execute()
    return [r.decode() if isinstance(r, bytes) else r for r in replies]


def publish(
    topic: str,
    data: Any,
    *,
    durable: bool = True,
    client: redis.Redis | None = None,
    settings: Settings | None = None,
) -> str | int:
    """Publish one JSON-serialisable value on a topic; see `publish_many`."""
    return publish_many([(topic, data)], durable=durable, client=client, settings=settings)[0]
