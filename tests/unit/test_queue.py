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
