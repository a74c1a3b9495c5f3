"""The Python client on a real stack: unanswered resubscribes, the subscribe rate, its CPU."""

from __future__ import annotations

from typing import Any

import pytest
import websocket._abnf

from tests.support import wait_for
from tidings.client import TidingsClient

pytestmark = pytest.mark.integration

TOPIC = "public.unanswered"


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
