"""The web tier in-process (Flask and Flask-SocketIO test clients) on a real Redis."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import jwt
import pytest
import redis
from flask import Flask

from tidings.keys import INGEST_STREAM, LEASE_KEY
from tidings.settings import Settings
from webapp import create_app
from webapp.extensions import socketio

SECRET = "a-test-secret-of-at-least-32-bytes!"


@pytest.fixture
def app(redis_client: redis.Redis, redis_server) -> Iterator[Flask]:
    settings = Settings.from_env(
        {
            "TIDINGS_REDIS_URL": redis_server.url(0),
            "TIDINGS_API_KEY": "k3y",
            "TIDINGS_SECRET": SECRET,
            "TIDINGS_MAX_SUBSCRIPTIONS": "3",
        }
    )
    app = create_app({"SETTINGS": settings, "SUBSCRIBE_QUEUE": True, "TESTING": True})
    yield app
    app.extensions["tidings.queue"].close()


@pytest.fixture
def socket_app(redis_client: redis.Redis, redis_server) -> Flask:
    """The app without the queue, for Flask-SocketIO's in-process test client."""
    settings = Settings.from_env(
        {
            "TIDINGS_REDIS_URL": redis_server.url(0),
            "TIDINGS_SECRET": SECRET,
            "TIDINGS_MAX_SUBSCRIPTIONS": "3",
        }
    )
    return create_app({"SETTINGS": settings, "QUEUE": False})


def test_healthz(app: Flask) -> None:
    assert app.test_client().get("/healthz").status_code == 200


def test_readyz_names_the_missing_listener_then_turns_ready(
    app: Flask, redis_client: redis.Redis
) -> None:
    from tests.support import wait_for

    client = app.test_client()
    wait_for(lambda: app.extensions["tidings.queue"].subscribed, timeout=5)
    answer = client.get("/readyz")
    assert answer.status_code == 503 and answer.json["failing"] == ["listener"]
    redis_client.set(LEASE_KEY, "x", px=5000)
    assert client.get("/readyz").status_code == 200


def test_publish_api_auth(app: Flask, redis_client: redis.Redis) -> None:
    client = app.test_client()
    body = {"topic": "public.a", "data": {"x": 1}}
    assert client.post("/api/publish", json=body).status_code == 401
    wrong = {"Authorization": "Bearer nope"}
    assert client.post("/api/publish", json=body, headers=wrong).status_code == 401
    right = {"Authorization": "Bearer k3y"}
    answer = client.post("/api/publish", json=body, headers=right)
    assert answer.status_code == 202 and answer.json["id"]
    batch = client.post("/api/publish", json=[body, body], headers=right)
    assert batch.status_code == 202 and len(batch.json["ids"]) == 2
    assert redis_client.xlen(INGEST_STREAM) == 3


@pytest.mark.parametrize(
    "body",
    [None, [], {"topic": "bad topic", "data": 1}, {"topic": "a"}, [{"topic": "a", "data": 1}, 5]],
)
def test_publish_api_bad_input_is_a_400_and_publishes_nothing(
    app: Flask, redis_client: redis.Redis, body: object
) -> None:
    answer = app.test_client().post(
        "/api/publish", json=body, headers={"Authorization": "Bearer k3y"}
    )
    assert answer.status_code == 400 and answer.json["ok"] is False
    assert redis_client.exists(INGEST_STREAM) == 0


def test_publish_api_is_disabled_without_a_key(redis_server) -> None:
    settings = Settings.from_env({"TIDINGS_REDIS_URL": redis_server.url(0)})
    app = create_app({"SETTINGS": settings})
    answer = app.test_client().post("/api/publish", json={"topic": "a", "data": 1})
    assert answer.status_code == 403


def test_cli_publish_and_token(app: Flask, redis_client: redis.Redis) -> None:
    runner = app.test_cli_runner()
    result = runner.invoke(args=["publish", "public.a", '{"n": 1}'])
    assert result.exit_code == 0, result.output
    assert redis_client.xlen(INGEST_STREAM) == 1
    result = runner.invoke(args=["publish", "public.a", "not json"])
    assert result.exit_code != 0 and "not JSON" in result.output
    result = runner.invoke(args=["publish", "bad topic", "1"])
    assert result.exit_code != 0 and "invalid topic" in result.output
    result = runner.invoke(args=["token", "--sub", "alice", "--topic", "orders.*", "--ttl", "60"])
    assert result.exit_code == 0, result.output
    claims = jwt.decode(result.output.strip(), SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice" and claims["topics"] == ["orders.*"]
    assert claims["exp"] > time.time()


def connect(app: Flask, auth: dict | None = None):
    return socketio.test_client(app, auth=auth)


def test_subscribe_acks(socket_app: Flask) -> None:
    client = connect(socket_app)
    ok = client.emit("subscribe", {"topic": "public.a"}, callback=True)
    assert ok == {
        "ok": True,
        "topic": "public.a",
        "offset": None,
        "recovered": False,
        "publications": [],
    }
    assert client.emit("subscribe", {"topic": "private.a"}, callback=True) == {
        "ok": False,
        "error": "forbidden",
    }
    assert client.emit("unsubscribe", {"topic": "public.a"}, callback=True) == {"ok": True}


@pytest.mark.parametrize(
    "payload",
    [None, "public.a", 5, [], {}, {"topic": None}, {"topic": 5}, {"topic": "x" * 10_000}],
)
def test_malformed_subscribe_gets_invalid_topic(socket_app: Flask, payload: object) -> None:
    client = connect(socket_app)
    args = () if payload is None else (payload,)
    assert client.emit("subscribe", *args, callback=True) == {
        "ok": False,
        "error": "invalid_topic",
    }
    assert client.is_connected()


def test_subscription_limit(socket_app: Flask) -> None:
    client = connect(socket_app)
    for i in range(3):
        assert client.emit("subscribe", {"topic": f"public.{i}"}, callback=True)["ok"]
    # Re-subscribing to a topic already held does not count twice.
    assert client.emit("subscribe", {"topic": "public.0"}, callback=True)["ok"]
    assert client.emit("subscribe", {"topic": "public.9"}, callback=True) == {
        "ok": False,
        "error": "limit",
    }


def test_tokens_grant_topics_and_bad_tokens_are_refused(socket_app: Flask) -> None:
    good = jwt.encode(
        {"sub": "alice", "topics": ["orders.*"], "exp": int(time.time()) + 60},
        SECRET,
        algorithm="HS256",
    )
    client = connect(socket_app, {"token": good})
    assert client.emit("subscribe", {"topic": "orders.eu"}, callback=True)["ok"]
    assert client.emit("subscribe", {"topic": "invoices.eu"}, callback=True)["error"] == (
        "forbidden"
    )
    expired = jwt.encode(
        {"sub": "a", "topics": ["*"], "exp": int(time.time()) - 10}, SECRET, algorithm="HS256"
    )
    forged = jwt.encode(
        {"sub": "a", "topics": ["*"], "exp": int(time.time()) + 60},
        "another-secret-of-at-least-32-bytes",
        algorithm="HS256",
    )
    unsigned = jwt.encode(
        {"sub": "a", "topics": ["*"], "exp": int(time.time()) + 60}, None, algorithm="none"
    )
    for token in [expired, forged, unsigned, "garbage", 42]:
        refused = connect(socket_app, {"token": token})
        assert not refused.is_connected()


def test_publish_api_wait_times_out_without_a_listener(app: Flask) -> None:
    answer = app.test_client().post(
        "/api/publish?wait=1&timeout=0.3",
        json={"topic": "public.a", "data": 1},
        headers={"Authorization": "Bearer k3y"},
    )
    assert answer.status_code == 504
    assert answer.json["error"] == "timeout" and answer.json["id"]


def test_subscribe_waits_for_the_workers_queue_subscription(
    socket_app: Flask, redis_server, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """History is read only once Redis has confirmed this worker hears the topic's channel."""
    from tests.support import wait_for
    from webapp import realtime
    from webapp.queue import QueueManager

    monkeypatch.setattr(realtime, "SUBSCRIBED_WAIT_SECONDS", 0.2)
    manager = QueueManager(redis_server.url(0), history=redis_client, history_size=1000)
    socket_app.extensions["tidings.queue"] = manager
    client = connect(socket_app)
    assert client.emit("subscribe", {"topic": "public.a"}, callback=True) == {
        "ok": False,
        "error": "unavailable",
    }
    assert "t:public.a" not in socketio.server.manager.rooms.get("/", {})  # never joined
    loops = [
        threading.Thread(target=manager._thread, daemon=True),
        threading.Thread(target=manager._write_commands, daemon=True),
    ]
    for loop in loops:
        loop.start()
    try:
        wait_for(lambda: manager.subscribed, timeout=5)
        assert client.emit("subscribe", {"topic": "public.a"}, callback=True)["ok"]
        # Acked only once Redis confirmed the topic's own queue channel.
        assert redis_client.pubsub_numsub("tidings:socketio:public.a") == [
            (b"tidings:socketio:public.a", 1)
        ]
    finally:
        manager.close()
        for loop in loops:
            loop.join(timeout=5)


def test_handlers_are_called_by_python_socketio_directly(socket_app: Flask) -> None:
    """No Flask-SocketIO wrapper: it would push a request context for every event."""
    handlers = socket_app.extensions["tidings.realtime"]
    registered = socketio.server.handlers["/"]
    for event in ("connect", "disconnect", "subscribe", "unsubscribe", "refresh"):
        assert registered[event] == getattr(handlers, event)
    client = socketio.test_client(
        socket_app,
        headers={"X-Forwarded-For": "10.0.0.9"},
        flask_test_client=socket_app.test_client(),  # its environ has a REMOTE_ADDR
    )
    # The connect handler has the environ: its REMOTE_ADDR, 127.0.0.1, is a
    # trusted proxy by default, so the client it names counts.
    assert set(handlers.connections.per_ip) == {"10.0.0.9"}
    client.disconnect()
    assert not handlers.connections.per_ip and not handlers.connections.by_sid


def test_the_socketio_middleware_keeps_no_copy_of_the_environ(socket_app: Flask) -> None:
    """A websocket's environ lives as long as it does: one per connection, not two."""
    from werkzeug.test import EnvironBuilder

    environ = EnvironBuilder(path="/healthz").get_environ()
    statuses: list[str] = []
    body = socket_app.wsgi_app(environ, lambda status, headers: statuses.append(status))
    assert b"".join(body) and statuses == ["200 OK"]
    assert environ["flask.app"] is socket_app
