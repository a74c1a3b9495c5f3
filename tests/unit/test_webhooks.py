"""Webhook delivery against a real receiver on loopback and a real Redis."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tests.webhook_receiver import Receiver
from tidings.keys import WEBHOOK_DISPATCH, WEBHOOK_LOCK, WEBHOOK_STATE, WEBHOOK_STREAM
from tidings.settings import Settings
from tidings.webhooks import Deliverer, backoff, read_stats, should_dispatch, sign, verify

SECRET = "a-webhook-secret-for-tests"


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver(SECRET)
    running.start()
    yield running
    running.stop()


def deliverer(redis_client: redis.Redis, receiver: Receiver, attempts: int = 3) -> Deliverer:
    settings = Settings.from_env(
        {
            "TIDINGS_WEBHOOK_URL": receiver.url,
            "TIDINGS_WEBHOOK_SECRET": SECRET,
            "TIDINGS_WEBHOOK_MAX_ATTEMPTS": str(attempts),
            "TIDINGS_WEBHOOK_TIMEOUT": "2",
        }
    )
    return Deliverer(redis_client, settings)


def add(client: redis.Redis, *events: tuple[str, ...]) -> None:
    for name, topic, *sub in events:
        fields = {"name": name, "topic": topic, **({"sub": sub[0]} if sub else {})}
        client.xadd(WEBHOOK_STREAM, fields)


def test_signature_is_hmac_sha256_of_the_body() -> None:
    signature = sign(SECRET, b'{"events":[]}')
    assert signature.startswith("sha256=") and len(signature) == 7 + 64
    assert verify(SECRET, b'{"events":[]}', signature)
    assert not verify(SECRET, b'{"events":[1]}', signature)
    assert not verify("another-secret-of-enough-bytes", b'{"events":[]}', signature)


def test_events_are_posted_in_order_signed_and_then_removed(
    redis_client: redis.Redis, receiver: Receiver
) -> None:
    add(
        redis_client,
        ("topic.occupied", "room.1"),
        ("member.added", "room.1", "alice"),
        ("topic.vacated", "room.2"),
    )
    assert deliverer(redis_client, receiver).run(budget_seconds=5) == "idle"
    [batch] = receiver.batches()  # signature checked
    assert isinstance(batch["time"], int)
    assert [(e["name"], e["topic"], e.get("sub")) for e in batch["events"]] == [
        ("topic.occupied", "room.1", None),
        ("member.added", "room.1", "alice"),
        ("topic.vacated", "room.2", None),
    ]
    assert redis_client.xlen(WEBHOOK_STREAM) == 0
    assert not redis_client.exists(WEBHOOK_LOCK)  # released
    assert read_stats(redis_client).delivered == 3


def test_a_refusing_receiver_is_retried_with_backoff_then_given_up_on(
    redis_client: redis.Redis, receiver: Receiver
) -> None:
    receiver.status = 503
    add(redis_client, ("topic.occupied", "room.1"))
    sender = deliverer(redis_client, receiver, attempts=2)
    assert sender.run(budget_seconds=5) == "failed"
    assert int(redis_client.hget(WEBHOOK_STATE, "attempts")) == 1
    # The backoff holds the next attempt back, and no task is dispatched meanwhile.
    assert sender.run(budget_seconds=5) == "waiting"
    assert not should_dispatch(redis_client)
    redis_client.hset(WEBHOOK_STATE, "next_ms", 0)  # the backoff is over
    assert sender.run(budget_seconds=5) == "failed"
    assert len(receiver.posts) == 2
    assert redis_client.xlen(WEBHOOK_STREAM) == 0  # given up on: dropped
    stats = read_stats(redis_client)
    assert (stats.refused, stats.dropped, stats.delivered) == (2, 1, 0)
    assert (backoff(1), backoff(2), backoff(10)) == (1.0, 2.0, 60.0)


def test_a_receiver_that_is_down_is_an_error_and_delivery_resumes(
    redis_client: redis.Redis, receiver: Receiver
) -> None:
    receiver.stop()
    add(redis_client, ("topic.occupied", "room.1"), ("topic.vacated", "room.1"))
    sender = deliverer(redis_client, receiver)
    assert sender.run(budget_seconds=5) == "failed"
    assert read_stats(redis_client).errors == 1
    receiver.start()
    redis_client.hset(WEBHOOK_STATE, "next_ms", 0)
    assert sender.run(budget_seconds=5) == "idle"
    assert [e["name"] for e in receiver.events()] == ["topic.occupied", "topic.vacated"]
    assert not redis_client.exists(WEBHOOK_STATE)


def test_one_deliverer_at_a_time_and_one_dispatch_at_a_time(
    redis_client: redis.Redis, receiver: Receiver
) -> None:
    assert not should_dispatch(redis_client)  # nothing waits
    add(redis_client, ("topic.occupied", "room.1"))
    assert should_dispatch(redis_client)
    assert not should_dispatch(redis_client)  # sent, not started yet
    redis_client.delete(WEBHOOK_DISPATCH)
    redis_client.set(WEBHOOK_LOCK, "someone else", px=10_000)
    assert not should_dispatch(redis_client)
    assert deliverer(redis_client, receiver).run(budget_seconds=5) == "busy"
    assert receiver.posts == []
