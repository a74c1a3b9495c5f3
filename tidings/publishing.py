"""Publishing from application code and Celery tasks: `publish(topic, data)`."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any

import redis

from tidings.connection import connect
from tidings.forwarder import now_ms
from tidings.keys import INGEST_STREAM, RECEIPT_PREFIX, topic_channel
from tidings.payloads import encode
from tidings.settings import Settings
from tidings.topics import is_valid_topic

_lock = threading.Lock()
_default: tuple[redis.Redis, Settings] | None = None


class PublishError(ValueError):
    """A publication rejected (bad topic, too large, or dropped by the listener)."""


class PublishTimeout(TimeoutError):
    """A waited-for publication was not forwarded in time (is a listener running?)."""


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


def send(
    items: Iterable[tuple[str, Any]],
    *,
    durable: bool = True,
    receipts: bool = False,
    client: redis.Redis | None = None,
    settings: Settings | None = None,
) -> list[str | int]:
    """Check every item, then send them all in one round trip; return ingest ids or counts.

    Durable items are XADDed to `tidings:ingest` (with `receipts`, the
    listener pushes each one's offset for `await_receipts`); fast ones are
    PUBLISHed on their topic channel and the result is the receiver count.
    """
    if receipts and not durable:
        raise PublishError("receipts need durable publications: pub/sub gives none")
    if client is None or settings is None:
        default_client, default_settings = _default_client()
        client = client or default_client
        settings = settings or default_settings
    checked = [(topic, _checked(topic, data, settings.max_payload)) for topic, data in items]
    pipe = client.pipeline(transaction=False)
    stamp = str(now_ms())
    for topic, payload in checked:
        if durable:
            fields = {"topic": topic, "data": payload, "ts": stamp}
            if receipts:
                fields["receipt"] = "1"
            pipe.xadd(INGEST_STREAM, fields)
        else:
            pipe.publish(topic_channel(topic), payload)
    return [r.decode() if isinstance(r, bytes) else r for r in pipe.execute()]


def await_receipts(
    ingest_ids: Iterable[str], *, timeout: float = 10.0, client: redis.Redis | None = None
) -> list[str]:
    """Wait until the listener forwarded each publication; return their topic offsets.

    Raises PublishTimeout after `timeout` seconds in all, PublishError for
    one the listener dropped.
    """
    client = client or _default_client()[0]
    deadline = time.monotonic() + timeout
    return [_receipt(client, str(ingest_id), deadline) for ingest_id in ingest_ids]


def publish_many(
    items: Iterable[tuple[str, Any]],
    *,
    durable: bool = True,
    wait: bool = False,
    timeout: float = 10.0,
    client: redis.Redis | None = None,
    settings: Settings | None = None,
) -> list[str | int]:
    """Publish (topic, data) pairs in one round trip.

    Durable publications go to the `tidings:ingest` stream and survive a
    listener restart; the result is their ingest ids, or with `wait=True`
    their topic offsets once forwarded. Fast ones (`durable=False`) are lost
    while no listener runs; the result is each PUBLISH's receiver count. A
    bad item publishes nothing.
    """
    ids = send(items, durable=durable, receipts=wait, client=client, settings=settings)
    if not wait:
        return ids
    return list(await_receipts([str(i) for i in ids], timeout=timeout, client=client))


def _receipt(client: redis.Redis, ingest_id: str, deadline: float) -> str:
    key = RECEIPT_PREFIX + ingest_id
    while (remaining := deadline - time.monotonic()) > 0:
        # Short BLPOPs: each stays inside the connection's socket timeout.
        reply = client.blpop([key], timeout=max(0.01, min(remaining, 1.0)))
        if reply is None:
            continue
        client.delete(key)
        value = reply[1].decode()
        if value.startswith("dropped:"):
            raise PublishError(f"publication {ingest_id} was dropped: {value[8:]}")
        return value
    raise PublishTimeout(f"publication {ingest_id} not forwarded in time (is a listener running?)")


def publish(
    topic: str,
    data: Any,
    *,
    durable: bool = True,
    wait: bool = False,
    timeout: float = 10.0,
    client: redis.Redis | None = None,
    settings: Settings | None = None,
) -> str | int:
    """Publish one JSON-serialisable value on a topic; see `publish_many`."""
    return publish_many(
        [(topic, data)],
        durable=durable,
        wait=wait,
        timeout=timeout,
        client=client,
        settings=settings,
    )[0]
