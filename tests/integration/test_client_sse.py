"""The Python client over Server-Sent Events on a real stack: order, resume, gaps, topic changes."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import requests

from tests.support import Stack, SteadyPublisher, wait_for
from tidings.client import SseClient
from tidings.keys import history_key
from webapp.grants import make_token

pytestmark = pytest.mark.integration

SECRET = "an-sse-client-test-secret-of-32-bytes"
API_KEY = "sse-client-key"


class Recorder:
    """An SseClient whose deliveries, raw arrivals, gaps and ended topics are kept for checks."""

    def __init__(self, stack: Stack, **options: Any) -> None:
        self.delivered: list[dict[str, Any]] = []
        self.raw: list[dict[str, Any]] = []
        self.gaps: list[str] = []
        self.ended: list[str] = []
        self.client = SseClient(
            stack.url,
            on_publication=self.delivered.append,
            on_raw=self.raw.append,
            on_gap=self.gaps.append,
            on_unsubscribed=self.ended.append,
            **options,
        )
        self.client.connect()

    def of(self, topic: str, field: str = "n") -> list[Any]:
        """Return what was delivered of `topic`, each publication's data[field], in order."""
        return [p["data"][field] for p in list(self.delivered) if p["topic"] == topic]

    def raw_of(self, topic: str) -> int:
        """Return how many publications of `topic` arrived, duplicates included."""
        return sum(1 for p in list(self.raw) if p.get("topic") == topic)


@pytest.fixture
def sse_stack(make_stack: Callable[..., Stack]) -> Stack:
    stack = make_stack(
        TIDINGS_SECRET=SECRET,
        TIDINGS_API_KEY=API_KEY,
        TIDINGS_HISTORY_SIZE="500",
        # A keep-alive comment every second: every stream carries comments to skip.
        TIDINGS_SSE_KEEPALIVE="1",
    )
    stack.start_worker()
    stack.start_web()
    stack.wait_ready()
    return stack


@pytest.fixture
def recorders(sse_stack: Stack) -> Iterator[Callable[..., Recorder]]:
    made: list[Recorder] = []

    def make(**options: Any) -> Recorder:
        made.append(Recorder(sse_stack, **options))
        return made[-1]

    yield make
    for recorder in made:
        recorder.client.disconnect()


def test_publications_arrive_once_in_order_on_one_stream(
    sse_stack: Stack, recorders: Callable[..., Recorder]
) -> None:
    sse_stack.publish("public.order.a", {"n": -1})  # before the subscribe: not delivered
    wait_for(lambda: sse_stack.redis().xlen(history_key("public.order.a")) == 1)
    rec = recorders()
    ack = rec.client.subscribe("public.order.a")
    assert ack["ok"] and ack["recovered"] is False and ack["offset"] is not None
    empty = rec.client.subscribe("public.order.b")
    assert empty == {
        "ok": True,
        "topic": "public.order.b",
        "offset": None,
        "recovered": False,
        "publications": [],
    }
    sse_stack.publish_many(
        [(topic, {"n": n}) for n in range(50) for topic in ("public.order.a", "public.order.b")]
    )
    wait_for(lambda: len(rec.delivered) == 100)
    assert rec.of("public.order.a") == list(range(50))
    assert rec.of("public.order.b") == list(range(50))
    # One stream carries both topics.
    stream = rec.client._stream
    assert stream is not None and stream.topics == ["public.order.a", "public.order.b"]
    assert rec.client.connected
    last_a = [p["offset"] for p in rec.delivered if p["topic"] == "public.order.a"][-1]
    assert rec.client.last_offset("public.order.a") == last_a
    # Subscribing again to a topic held changes nothing.
    again = rec.client.subscribe("public.order.a")
    assert again["ok"] and again["recovered"] is True and rec.client._stream is stream


def test_a_cut_stream_and_a_web_restart_resume_with_nothing_lost_or_twice(
    sse_stack: Stack, recorders: Callable[..., Recorder]
) -> None:
    topic = "public.resume"
    rec = recorders()
    assert rec.client.subscribe(topic)["ok"]
    publisher = SteadyPublisher(sse_stack, topic, rate=100)
    publisher.start()
    try:
        for cut in range(1, 4):
            wait_for(lambda cut=cut: len(rec.of(topic)) >= 20 * cut)
            stream = rec.client._stream
            assert stream is not None
            stream.cut()  # the connection drops, as a network failure would end it
            wait_for(lambda cut=cut: rec.client.connects == 1 + cut)
        sse_stack.restart_web()
        wait_for(lambda: rec.client.connects == 5, timeout=20)
        restarted = publisher.sent
        wait_for(lambda: len(rec.of(topic)) > restarted)
    finally:
        sent = publisher.halt()
    wait_for(lambda: len(rec.of(topic)) == sent)
    assert rec.of(topic) == list(range(sent))
    assert rec.gaps == [] and rec.client.gaps == 0
    assert rec.raw_of(topic) >= sent


def test_history_that_no_longer_covers_a_drop_is_reported_as_a_gap(
    sse_stack: Stack, recorders: Callable[..., Recorder]
) -> None:
    rec = recorders()
    assert rec.client.subscribe("public.gap.a")["ok"]
    assert rec.client.subscribe("public.gap.b")["ok"]
    sse_stack.publish_many([("public.gap.a", {"n": n}) for n in range(5)])
    wait_for(lambda: len(rec.of("public.gap.a")) == 5)
    sse_stack.stop_web()
    # More than history keeps (500) on one topic, a few on the other.
    sse_stack.publish_many([("public.gap.a", {"n": n}) for n in range(5, 605)])
    sse_stack.publish_many([("public.gap.b", {"n": n}) for n in range(3)])
    sse_stack.start_web()
    wait_for(lambda: rec.gaps, timeout=20)
    assert rec.gaps == ["public.gap.a"]
    wait_for(lambda: len(rec.of("public.gap.b")) == 3)
    sse_stack.publish_many([("public.gap.a", {"n": 605})])
    wait_for(lambda: rec.of("public.gap.a")[-1:] == [605])
    # Nothing of what history lost; after the gap, live again from the latest offset.
    assert rec.of("public.gap.a") == [0, 1, 2, 3, 4, 605]


def test_adding_and_removing_topics_loses_nothing_of_the_others(
    sse_stack: Stack, recorders: Callable[..., Recorder]
) -> None:
    steady = "public.steady"
    rec = recorders()
    assert rec.client.subscribe(steady)["ok"]
    publisher = SteadyPublisher(sse_stack, steady, rate=300)
    publisher.start()
    added = [f"public.added.{i}" for i in range(6)]
    try:
        for i, topic in enumerate(added):
            wait_for(lambda i=i: len(rec.of(steady)) >= 30 * (i + 1))
            ack = rec.client.subscribe(topic)
            assert ack["ok"] and ack["recovered"] is False, ack
            if i % 2:
                assert rec.client.unsubscribe(added[i - 1]) == {"ok": True}
        # Ten streams: the first, one per subscribe, one per unsubscribe.
        wait_for(lambda: rec.client.connects == 1 + len(added) + len(added) // 2)
        stream = rec.client._stream
        assert stream is not None and stream.topics == [steady, *added[1::2]]
    finally:
        sent = publisher.halt()
    wait_for(lambda: len(rec.of(steady)) == sent)
    assert rec.of(steady) == list(range(sent))
    assert rec.gaps == []
    sse_stack.publish_many([(topic, {"n": 0}) for topic in added])
    wait_for(lambda: all(rec.of(topic) == [0] for topic in added[1::2]))
    assert all(rec.of(topic) == [] for topic in added[::2])


def test_refusals_are_acks_and_leave_the_stream_alone(
    sse_stack: Stack, recorders: Callable[..., Recorder]
) -> None:
    forged = recorders(token="forged")
    assert forged.client.subscribe("public.refused") == {
        "ok": False,
        "topic": "public.refused",
        "error": "invalid_token",
    }
    assert forged.client._stream is None and forged.client._topics == {}
    rec = recorders(token=make_token(SECRET, "alice", ["private.alice.*"], 60))
    assert rec.client.subscribe("private.alice.1")["ok"]
    stream = rec.client._stream
    assert rec.client.subscribe("private.bob.1")["error"] == "forbidden"
    assert rec.client.subscribe("not a topic")["error"] == "invalid_topic"
    for n in range(2, 33):
        assert rec.client.subscribe(f"public.many.{n}")["ok"]
    assert rec.client.subscribe("public.many.33")["error"] == "too_many_topics"
    assert rec.client.unsubscribe("public.many.32") == {"ok": True}
    assert rec.client.subscribe("public.many.33")["ok"]
    assert stream is not None and rec.client._stream is not stream
    sse_stack.publish("private.alice.1", {"n": 1})
    wait_for(lambda: rec.of("private.alice.1") == [1])
    assert set(rec.client._topics) == {
        "private.alice.1",
        *(f"public.many.{n}" for n in range(2, 32)),
        "public.many.33",
    }
    assert rec.gaps == []


def test_an_operator_unsubscribe_forgets_the_topic(
    sse_stack: Stack, recorders: Callable[..., Recorder]
) -> None:
    rec = recorders(token=make_token(SECRET, "carol", ["private.carol.*"], 60))
    assert rec.client.subscribe("private.carol.1")["ok"]
    assert rec.client.subscribe("private.carol.2")["ok"]
    answer = requests.post(
        sse_stack.url + "/api/unsubscribe",
        json={"sub": "carol", "topic": "private.carol.1"},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=5,
    )
    assert answer.status_code == 200
    wait_for(lambda: rec.ended == ["private.carol.1"])
    assert set(rec.client._topics) == {"private.carol.2"}
    stream = rec.client._stream
    assert stream is not None
    assert rec.client.connects == 2  # one stream, then one of both topics
    stream.cut()  # the next stream no longer asks for it
    wait_for(lambda: rec.client.connects == 3)
    assert rec.client._stream is not None and rec.client._stream.topics == ["private.carol.2"]
    sse_stack.publish_many([("private.carol.1", {"n": 1}), ("private.carol.2", {"n": 2})])
    wait_for(lambda: rec.of("private.carol.2") == [2])
    assert rec.of("private.carol.1") == []


def test_an_expired_token_ends_the_stream_and_a_fresh_one_resumes_it(
    sse_stack: Stack, recorders: Callable[..., Recorder]
) -> None:
    topic = "private.dave.1"
    issued: list[str] = []

    def fresh_token() -> str:
        issued.append(make_token(SECRET, "dave", ["private.dave.*"], 2))
        return issued[-1]

    rec = recorders(token=fresh_token)
    assert rec.client.subscribe(topic)["ok"]
    publisher = SteadyPublisher(sse_stack, topic, rate=50)
    publisher.start()
    try:
        # Each token lasts two seconds: the server ends the stream, the client asks for another.
        wait_for(lambda: rec.client.connects >= 3, timeout=15)
    finally:
        sent = publisher.halt()
    wait_for(lambda: len(rec.of(topic)) == sent)
    assert rec.of(topic) == list(range(sent))
    assert len(issued) >= 3 and rec.gaps == []


def test_a_reconnect_refused_for_one_topic_forgets_only_that_one(
    sse_stack: Stack, recorders: Callable[..., Recorder]
) -> None:
    grants = [["private.fay.*"]]
    rec = recorders(token=lambda: make_token(SECRET, "fay", grants[-1], 60))
    assert rec.client.subscribe("private.fay.1")["ok"]
    assert rec.client.subscribe("public.fay")["ok"]
    grants.append([])  # the next token no longer grants private.fay.*
    stream = rec.client._stream
    assert stream is not None
    stream.cut()
    wait_for(lambda: rec.client.connects == 3)
    assert rec.ended == ["private.fay.1"] and set(rec.client._topics) == {"public.fay"}
    sse_stack.publish("public.fay", {"n": 1})
    wait_for(lambda: rec.of("public.fay") == [1])


def test_a_subscribe_while_the_web_tier_is_down_is_retried_until_it_is_back(
    sse_stack: Stack, recorders: Callable[..., Recorder]
) -> None:
    rec = recorders()
    assert rec.client.subscribe("public.down.a")["ok"]
    sse_stack.stop_web()
    acks: list[dict[str, Any]] = []
    late = threading.Thread(
        target=lambda: acks.append(rec.client.subscribe("public.down.b", timeout=60))
    )
    late.start()
    sse_stack.publish("public.down.a", {"n": 1})
    sse_stack.start_web()
    late.join(timeout=60)
    assert acks and acks[0]["ok"], acks
    sse_stack.publish_many([("public.down.a", {"n": 2}), ("public.down.b", {"n": 2})])
    wait_for(lambda: rec.of("public.down.a") == [1, 2] and rec.of("public.down.b") == [2])


def test_disconnect_ends_the_read_thread_and_the_stream(
    sse_stack: Stack, recorders: Callable[..., Recorder]
) -> None:
    rec = recorders()
    assert rec.client.subscribe("public.bye")["ok"]
    reader = rec.client._reader
    assert reader is not None and reader.is_alive()

    def subscribers() -> int:
        answer = sse_stack.get("/api/topics", headers={"Authorization": f"Bearer {API_KEY}"})
        return sum(t["clients"] for t in answer.json()["topics"] if t["topic"] == "public.bye")

    wait_for(lambda: subscribers() == 1)
    rec.client.disconnect()
    assert not reader.is_alive() and not rec.client.connected
    wait_for(lambda: subscribers() == 0, timeout=5)
    with pytest.raises(RuntimeError):
        rec.client.subscribe("public.bye")
