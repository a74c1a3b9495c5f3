"""The SSE client's pieces without a Tidings server: refusals, a stream's first event, reading."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.support import ChunkedServer
from tidings.client_core import _Topic
from tidings.client_sse import SseClient, _Stream, _Waiter, refusal
from tidings.event_stream import Event, event_id


def answer(status: int, body: bytes) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    response._content = body
    return response


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        (401, b'{"error": "invalid_token", "detail": "expired"}', "invalid_token"),
        (403, b'{"error": "forbidden"}', "forbidden"),
        (400, b'{"error": "too_many_topics"}', "too_many_topics"),
        (503, b'{"error": "unavailable"}', "unavailable"),
        (429, b"<html>Too Many Requests</html>", "limit"),  # a proxy's page
        (502, b"<html>Bad Gateway</html>", "unavailable"),
        (404, b'{"error": "not_found"}', "sse_unavailable"),
    ],
)
def test_a_refused_stream_names_its_error(status: int, body: bytes, error: str) -> None:
    assert refusal(answer(status, body)) == error


def test_the_first_event_answers_each_topic_as_a_subscribe_ack() -> None:
    gaps: list[str] = []
    client = SseClient("http://127.0.0.1:1", on_publication=lambda pub: None, on_gap=gaps.append)
    client._topics = {
        "held": _Topic(last=(5, 0), last_offset="5-0"),
        "trimmed": _Topic(last=(6, 0), last_offset="6-0"),
        "new": _Topic(pending=True),
        "since": _Topic(last=(3, 0), last_offset="3-0", pending=True),
    }
    waiters = {topic: _Waiter() for topic in ("new", "since")}
    client._waiters = dict(waiters)
    topics = list(client._topics)
    sent = {"held": "5-0", "trimmed": "6-0", "new": None, "since": "3-0"}
    stream = _Stream(None, topics, sent)  # type: ignore[arg-type]  # never read here
    # The server's positions: where it resumed each topic, or its latest offset.
    start = event_id(["5-0", "9-0", "7-0", "3-0"])
    flags = {"held": True, "trimmed": False, "new": False, "since": True}
    data = {"recovered": False, "topics": flags}
    assert client._on_start(stream, Event("recovered", json.dumps(data), start), data)
    assert stream.started and client.connects == 1
    assert gaps == ["trimmed"] and client.last_offset("trimmed") == "9-0"
    assert waiters["new"].ack == {
        "ok": True,
        "topic": "new",
        "offset": "7-0",
        "recovered": False,
        "publications": [],
    }
    assert waiters["since"].ack["recovered"] is True and waiters["since"].ack["offset"] == "3-0"
    assert client.last_offset("new") == "7-0" and client._waiters == {}
    assert not any(state.pending for state in client._topics.values())
    # An id that is not the stream's: the stream is given up, nothing changes.
    other = _Stream(None, topics, sent)  # type: ignore[arg-type]
    assert not client._on_start(other, Event("recovered", "{}", "1:0"), {})
    assert not other.started


@pytest.fixture
def sources() -> Iterator[list[ChunkedServer]]:
    made: list[ChunkedServer] = []
    yield made
    for source in made:
        source.close()


def open_stream(source: ChunkedServer) -> _Stream:
    response = requests.get(source.url + "/sse", stream=True, timeout=(5, 30))
    return _Stream(response, ["t"], {"t": None})


def test_a_stream_cut_by_the_server_mid_event_yields_only_whole_events(
    sources: list[ChunkedServer],
) -> None:
    sources.append(
        ChunkedServer(
            [
                b"retry: 1000\n: tidings\n\n",
                b"event: subscribed\r\ndata: {}\r\n\r\nevent: pub",
                b'lication\ndata: {"n"',
            ],
            hang_up=True,
        )
    )
    stream = open_stream(sources[0])
    assert [e.event for e in stream.events()] == ["subscribed"]
    stream.close()


def test_cut_ends_a_read_blocked_on_a_silent_stream(sources: list[ChunkedServer]) -> None:
    sources.append(ChunkedServer([b"event: subscribed\ndata: {}\n\n"], hang_up=False))
    stream = open_stream(sources[0])
    seen: list[Any] = []
    first = threading.Event()

    def read() -> None:
        for event in stream.events():
            seen.append(event.event)
            first.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert first.wait(5)
    stream.cut()  # from another thread, as a subscribe's new stream or disconnect() does
    reader.join(timeout=5)
    assert not reader.is_alive() and seen == ["subscribed"]
    stream.close()


def publication(n: int) -> bytes:
    data = json.dumps({"topic": "t", "offset": f"{n}-0", "data": {"n": n}})
    return f"id: 1:{n}.0\nevent: publication\ndata: {data}\n\n".encode()


def test_reading_skips_what_it_does_not_know_and_outlives_a_failing_callback(
    sources: list[ChunkedServer], caplog: pytest.LogCaptureFixture
) -> None:
    sources.append(
        ChunkedServer(
            [
                b"retry: 1000\n: tidings\n\n",
                b'id: 1:0\nevent: subscribed\ndata: {"topics": {"t": null}}\n\n',
                b": keep-alive\n\nevent: surprise\ndata: {}\n\nevent: publication\ndata: [oops\n\n",
                publication(1) + publication(2),
                b'event: token_expired\ndata: {"grace":0}\n\n' + publication(3),
            ],
            hang_up=False,
        )
    )
    delivered: list[int] = []

    def handle(pub: dict[str, Any]) -> None:
        if pub["data"]["n"] == 1:
            raise RuntimeError("the application's bug")
        delivered.append(pub["data"]["n"])

    client = SseClient("http://127.0.0.1:1", on_publication=handle)
    client._topics["t"] = _Topic(pending=True)
    client._waiters["t"] = waiter = _Waiter()
    stream = open_stream(sources[0])
    assert client._read(stream) is True  # ended by token_expired: what follows is not read
    stream.close()
    assert waiter.ack == {
        "ok": True,
        "topic": "t",
        "offset": None,
        "recovered": False,
        "publications": [],
    }
    assert delivered == [2] and client.last_offset("t") == "2-0"
    assert "a callback failed" in caplog.text
