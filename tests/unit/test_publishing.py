import pytest
import redis

from tests.support import wait_for
from tidings.keys import INGEST_STREAM
from tidings.publishing import PublishError, publish, publish_many
from tidings.settings import Settings


def test_durable_publish_goes_to_the_ingest_stream(
    redis_client: redis.Redis, settings: Settings
) -> None:
    entry_id = publish("public.a", {"n": 1}, client=redis_client, settings=settings)
    [(stored_id, fields)] = redis_client.xrange(INGEST_STREAM)
    assert stored_id.decode() == entry_id
    assert fields[b"topic"] == b"public.a" and fields[b"data"] == b'{"n":1}'
    assert fields[b"ts"].isdigit()


def test_fast_publish_uses_the_topic_channel(redis_client: redis.Redis, settings: Settings) -> None:
    pubsub = redis_client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe("tidings:topic:public.b")
    assert publish("public.b", "hi", durable=False, client=redis_client, settings=settings) == 1
    message = wait_for(lambda: pubsub.get_message(timeout=0.1), timeout=2)
    assert message["data"] == b'"hi"'


@pytest.mark.parametrize(
    ("topic", "data"),
    [("bad topic", 1), ("ok", object()), ("ok", float("nan")), ("ok", "x" * 70000)],
)
def test_a_bad_item_publishes_nothing(
    redis_client: redis.Redis, settings: Settings, topic: str, data: object
) -> None:
    with pytest.raises(PublishError):
        publish_many([("fine", 1), (topic, data)], client=redis_client, settings=settings)
    assert redis_client.xlen(INGEST_STREAM) == 0
