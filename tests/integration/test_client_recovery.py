"""The Python clients on a real stack: `since`, token functions, unanswered resubscribes, CPU."""

from __future__ import annotations

from typing import Any

import pytest
import websocket._abnf

from tests.support import Stack, wait_for
from tidings.client import SseClient, TidingsClient
from tidings.keys import history_key
from webapp.grants import make_token

pytestmark = pytest.mark.integration

TOPIC = "public.unanswered"
SECRET = "a-client-recovery-secret-of-32-bytes-or-more"
CLIENTS = {"websocket": TidingsClient, "sse": SseClient}


@pytest.fixture
def history_stack(make_stack) -> Stack:
    stack = make_stack(TIDINGS_SECRET=SECRET, TIDINGS_HISTORY_SIZE="50")
    stack.start_worker()
    stack.start_web()
    stack.wait_ready()
    return stack


@pytest.mark.parametrize("transport", sorted(CLIENTS))
def test_subscribe_since_an_offset_resumes_from_it(history_stack: Stack, transport: str) -> None:
    redis = history_stack.redis()
    history_stack.publish_many([("public.since", {"n": n}) for n in range(10)])
    history_stack.publish_many([("public.since.old", {"n": n}) for n in range(60)])
    wait_for(lambda: redis.xlen(history_key("public.since")) == 10)
    wait_for(lambda: redis.xlen(history_key("public.since.old")) == 50)
    offsets = [entry_id.decode() for entry_id, _ in redis.xrange(history_key("public.since"))]
    got: list[dict[str, Any]] = []
    gaps: list[str] = []
    client = CLIENTS[transport](history_stack.url, on_publication=got.append, on_gap=gaps.append)
    client.connect()
    try:
        assert client.subscribe("public.since.other")["ok"]  # one topic held already
        ack = client.subscribe("public.since", since=offsets[4])
        assert ack["ok"] and ack["recovered"] is True
        wait_for(lambda: len(got) == 5)
        assert [p["data"]["n"] for p in got] == [5, 6, 7, 8, 9]
        assert client.last_offset("public.since") == offsets[-1]
        # Older than history keeps: a gap, then live from the latest offset.
        ack = client.subscribe("public.since.old", since="1-0")
        assert ack["ok"] and ack["recovered"] is False and gaps == ["public.since.old"]
        history_stack.publish("public.since.old", {"n": 60})
        wait_for(lambda: len(got) == 6)
        assert got[-1]["data"] == {"n": 60}
        with pytest.raises(ValueError):
            client.subscribe("public.since.bad", since="yesterday")
    finally:
        client.disconnect()


@pytest.mark.parametrize("transport", sorted(CLIENTS))
def test_a_token_function_is_asked_again_at_every_reconnection(
    history_stack: Stack, transport: str
) -> None:
    issued: list[str] = []

    def token() -> str:
        issued.append(make_token(SECRET, "erin", ["private.erin.*"], 60))
        return issued[-1]

    got: list[dict[str, Any]] = []
    client = CLIENTS[transport](history_stack.url, on_publication=got.append, token=token)
    client.connect()
    try:
        assert client.subscribe("private.erin.1")["ok"]
        asked = len(issued)
        assert asked >= 1
        if isinstance(client, TidingsClient):
            client._break_transport()
        else:
            assert client._stream is not None
            client._stream.cut()
        wait_for(lambda: client.connects == 2)
        assert len(issued) > asked
        history_stack.publish("private.erin.1", {"n": 1})
        wait_for(lambda: got)
    finally:
        client.disconnect()


def test_a_resubscribe_without_an_answer_reconnects_and_loses_nothing(make_stack) -> None:
    stack = make_stack()
    stack.start_worker()
    stack.start_web()
    stack.wait_ready()
    got: list[dict[str, Any]] = []
    client = TidingsClient(stack.url, on_publication=got.append, ack_timeout=1.0)
    client.connect()
    assert client.subscribe(TOPIC)["ok"]
    stack.publish_many([(TOPIC, {"n": n}) for n in range(10)])
    wait_for(lambda: len(got) == 10)

    # On the next connection no answer ever arrives, as on a wedged path.
    handle_ack = client.sio._handle_ack
    lost: list[int] = []

    def lose_acks_of_the_second_connection(namespace: str, id: int, data: Any) -> None:
        if client.connects == 2:
            lost.append(id)
            return
        handle_ack(namespace, id, data)

    client.sio._handle_ack = lose_acks_of_the_second_connection  # type: ignore[method-assign]
    client._break_transport()
    wait_for(lambda: client.connects == 2 and lost)
    stack.publish_many([(TOPIC, {"n": n}) for n in range(10, 30)])
    # Without its own reconnect the client would stay silent on topic TOPIC.
    wait_for(lambda: client.connects >= 3, timeout=15)
    wait_for(lambda: len(got) == 30, timeout=15)
    assert [p["data"]["n"] for p in got] == list(range(30))
    assert client.gaps == 0
    client.disconnect()


def test_many_topics_resubscribe_past_the_subscribe_rate(make_stack) -> None:
    stack = make_stack(TIDINGS_SUBSCRIBE_RATE="3")
    stack.start_worker()
    stack.start_web()
    stack.wait_ready()
    topics = [f"public.many.{i}" for i in range(8)]
    got: list[dict[str, Any]] = []
    client = TidingsClient(stack.url, on_publication=got.append)
    client.connect()
    for topic in topics:  # at the allowed pace
        wait_for(lambda topic=topic: client.subscribe(topic)["ok"])
    client._break_transport()
    # All eight resubscribe at once: five meet the rate of 3/s and must be asked again.
    wait_for(lambda: client.connects == 2)
    stack.publish_many([(topic, {"n": n}) for topic in topics for n in range(5)])
    wait_for(lambda: len(got) == 40, timeout=20)
    for topic in topics:
        assert [p["data"]["n"] for p in got if p["topic"] == topic] == list(range(5))
    client.disconnect()


def test_the_client_leaves_utf8_checks_to_bytes_decode(make_stack, monkeypatch) -> None:
    # websocket-client's own check is pure Python, ~170 us per 1 KB frame:
    # twenty clients in one process fell behind their PINGs and were dropped.
    checked: list[int] = []
    check = websocket._abnf.validate_utf8
    monkeypatch.setattr(
        websocket._abnf, "validate_utf8", lambda data: checked.append(len(data)) or check(data)
    )
    stack = make_stack()
    stack.start_worker()
    stack.start_web()
    stack.wait_ready()
    got: list[dict[str, Any]] = []
    client = TidingsClient(stack.url, on_publication=got.append)
    client.connect()
    assert client.subscribe(TOPIC)["ok"]
    stack.publish_many([(TOPIC, {"text": "é" * 1000, "n": n}) for n in range(5)])
    wait_for(lambda: len(got) == 5)
    assert [p["data"]["text"] for p in got] == ["é" * 1000] * 5
    assert checked == []
    client.disconnect()
