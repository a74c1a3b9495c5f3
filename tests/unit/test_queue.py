"""The web worker's message-queue manager on a real Redis, in threading mode."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis
from flask import Flask

from tests.support import wait_for
from tidings.settings import Settings
from webapp import create_app


@pytest.fixture
def app(redis_client: redis.Redis, redis_server) -> Iterator[Flask]:
    settings = Settings.from_env({"TIDINGS_REDIS_URL": redis_server.url(0)})
    app = create_app({"SETTINGS": settings, "SUBSCRIBE_QUEUE": True, "TESTING": True})
    yield app
    app.extensions["tidings.queue"].close()


def test_a_publish_after_a_failure_does_not_replace_the_listening_subscription(
    app: Flask,
) -> None:
    manager = app.extensions["tidings.queue"]
    wait_for(lambda: manager.subscribed, timeout=5)
    listening = manager.pubsub
    manager.connected = False  # what python-socketio leaves after a failed publish
    manager._publish({"method": "emit", "event": "x", "namespace": "/", "host_id": "other"})
    # python-socketio would reconnect here, handing the loop a pub/sub subscribed to nothing.
    assert manager.pubsub is listening and listening.subscribed


def test_a_live_batch_the_catch_up_already_replayed_is_not_sent_again(
    app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = app.extensions["tidings.queue"]
    sent: list[list[str]] = []
    monkeypatch.setattr(
        manager, "_emit_here", lambda event, data, *_: sent.append([p["offset"] for p in data])
    )

    def live(*offsets: str) -> None:
        pubs = [{"topic": "a", "offset": o, "data": 1} for o in offsets]
        manager._handle_emit(
            {
                "method": "emit",
                "event": "publications",
                "data": [pubs],
                "namespace": "/",
                "room": "t:a",
                "tidings": {"path": "ingest", "n": 1, "t": [0] * len(pubs)},
            }
        )

    manager._replayed["a"] = (5, 1)  # the catch-up replayed up to 5-1
    live("5-0", "5-1")  # forwarded between the resubscribe and the catch-up's read
    live("5-1", "6-0")  # overlapping
    live("7-0")
    live("4-0")  # after the first newer message, nothing is trimmed any more
    assert sent == [["6-0"], ["7-0"], ["4-0"]]
