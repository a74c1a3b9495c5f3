"""The Python client's ordering and de-duplication rules, without a server."""

from __future__ import annotations

import threading

from tidings.client import TidingsClient, _Topic


def test_messages_are_handled_in_arrival_order_on_the_reading_thread() -> None:
    client = TidingsClient("http://127.0.0.1:1", on_publication=lambda pub: None)
    seen: list[tuple[int, str]] = []
    client.sio.eio.on("message", lambda data: seen.append((data, threading.current_thread().name)))
    for n in range(50):
        client.sio.eio._trigger_event("message", n, run_async=True)
    # python-engineio would start a thread per message, in any order.
    assert [n for n, _ in seen] == list(range(50))
    assert {name for _, name in seen} == {threading.current_thread().name}


def test_publications_at_or_below_the_last_offset_are_dropped() -> None:
    got: list[dict] = []
    client = TidingsClient("http://127.0.0.1:1", on_publication=got.append)
    client._topics["a"] = _Topic(pending=True)
    client._on_ack("a", {"topic": "a"}, {"ok": True, "offset": "5-0", "publications": []})
    client._on_publications(
        [
            {"topic": "a", "offset": "4-9", "data": "old"},
            {"topic": "a", "offset": "5-1", "data": "new"},
            {"topic": "a", "offset": "5-1", "data": "again"},
            {"topic": "b", "offset": "9-0", "data": "not subscribed"},
        ]
    )
    assert [p["data"] for p in got] == ["new"]


def test_websocket_options_keep_the_utf8_check_off_unless_told_otherwise() -> None:
    def options(**kwargs: object) -> dict:
        client = TidingsClient("http://127.0.0.1:1", on_publication=lambda pub: None, **kwargs)
        return client.sio.eio.websocket_extra_options

    sockopt = [(1, 2, 3)]
    assert options() == {"skip_utf8_validation": True}
    assert options(websocket_extra_options=None) == {"skip_utf8_validation": True}
    assert options(websocket_extra_options={"sockopt": sockopt}) == {
        "skip_utf8_validation": True,
        "sockopt": sockopt,
    }
    assert options(websocket_extra_options={"skip_utf8_validation": False}) == {
        "skip_utf8_validation": False
    }


def test_a_topic_the_server_unsubscribed_is_forgotten() -> None:
    ended: list[str] = []
    client = TidingsClient(
        "http://127.0.0.1:1", on_publication=lambda pub: None, on_unsubscribed=ended.append
    )
    client._topics["a"] = _Topic()
    client._on_unsubscribed({"topic": "a"})
    client._on_unsubscribed({"topic": "never"})
    client._on_unsubscribed("garbage")
    assert ended == ["a"] and "a" not in client._topics
