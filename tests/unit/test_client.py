"""The Python client's ordering and de-duplication rules, without a server."""

from __future__ import annotations

import threading

import pytest

from tidings.client import TidingsClient
from tidings.client_core import _Topic, resubscribe_delay


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


def test_resubscribe_retries_back_off_with_jitter() -> None:
    for attempt in range(8):
        step = min(0.05 * 2**attempt, 2.0)
        delays = [resubscribe_delay(attempt) for _ in range(200)]
        assert all(0.5 * step <= d <= 1.5 * step for d in delays)
        # Spread over the whole range, not one value for everybody.
        assert max(delays) - min(delays) > 0.8 * step


def test_a_refused_resubscribe_is_asked_again_after_jittered_delays(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client = TidingsClient("http://127.0.0.1:1", on_publication=lambda pub: None)
    client._topics["a"] = _Topic()
    client.connects = 2  # a reconnect
    monkeypatch.setattr(client.sio, "connected", True)
    answers = iter([{"ok": False, "error": "unavailable"}] * 5 + [{"ok": True}])
    monkeypatch.setattr(client, "subscribe", lambda topic: next(answers))
    slept: list[float] = []
    monkeypatch.setattr("tidings.client.time.sleep", slept.append)
    client._resubscribe_all()
    assert len(slept) == 5
    for attempt, delay in enumerate(slept):
        step = 0.05 * 2**attempt
        assert 0.5 * step <= delay <= 1.5 * step
    # Not the bare doubling sequence every client would share.
    assert slept != [0.05 * 2**attempt for attempt in range(5)]


class _RecordedWaits:
    """Stands in for the reconnect task's abort event: records each delay, never waits."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    def clear(self) -> None:
        pass

    def wait(self, delay: float) -> bool:
        self.delays.append(delay)
        return False  # not aborted: the loop goes on to its attempt


def test_reconnection_attempts_are_jittered() -> None:
    """python-socketio's own reconnect loop, as this client configures it, against a closed port."""
    first: list[float] = []
    later: list[float] = []
    for _ in range(30):
        client = TidingsClient("http://127.0.0.1:1", on_publication=lambda pub: None)
        sio = client.sio
        sio.connection_url = "http://127.0.0.1:1"
        sio.connection_headers, sio.connection_auth = {}, None
        sio.connection_transports, sio.connection_namespaces = ["websocket"], ["/"]
        sio.socketio_path = "socket.io"
        sio.reconnection_attempts = 5
        waits = _RecordedWaits()
        sio._reconnect_abort = waits
        sio._handle_reconnect()
        assert len(waits.delays) == 5
        first.append(waits.delays[0])
        later += waits.delays[3:]
    assert all(0 <= d <= 0.4 for d in first) and max(first) - min(first) > 0.2
    assert all(0.8 <= d <= 1.2 for d in later) and max(later) - min(later) > 0.2
