"""The server API in-process: HTTP routes, `presence` events, operator commands, bad input."""

from __future__ import annotations

import time

import jwt
import pytest
import redis
from flask import Flask

from tidings import server_api
from tidings.settings import Settings
from webapp import create_app
from webapp.extensions import socketio

SECRET = "a-test-secret-of-at-least-32-bytes!"
KEY = {"Authorization": "Bearer k3y"}


@pytest.fixture
def app(redis_client: redis.Redis, redis_server) -> Flask:
    settings = Settings.from_env(
        {
            "TIDINGS_REDIS_URL": redis_server.url(0),
            "TIDINGS_API_KEY": "k3y",
            "TIDINGS_SECRET": SECRET,
            "TIDINGS_PRESENCE_TOPICS": "room.*,public.room.*",
        }
    )
    return create_app({"SETTINGS": settings, "QUEUE": False})


def token(sub: str, topics: list[str], **claims: object) -> str:
    now = int(time.time())
    body = {"sub": sub, "topics": topics, "iat": now, "exp": now + 60, **claims}
    return jwt.encode(body, SECRET, algorithm="HS256")


def connect(app: Flask, sub: str | None = None, topics: list[str] | None = None):
    auth = {"token": token(sub, topics or [])} if sub else None
    return socketio.test_client(app, auth=auth)


def test_presence_events_answer_across_tabs_and_anonymous_clients(app: Flask) -> None:
    tabs = [connect(app, "alice", ["room.*"]) for _ in range(2)]
    bob = connect(app, "bob", ["room.*"])
    anonymous = connect(app)
    for client in (*tabs, bob):
        assert client.emit("subscribe", {"topic": "room.1"}, callback=True)["ok"]
    assert anonymous.emit("subscribe", {"topic": "public.room.1"}, callback=True)["ok"]
    assert tabs[0].emit("presence", {"topic": "room.1"}, callback=True) == {
        "ok": True,
        "topic": "room.1",
        "clients": 3,
        "users": [{"sub": "alice", "clients": 2}, {"sub": "bob", "clients": 1}],
    }
    assert bob.emit("presence_stats", {"topic": "room.1"}, callback=True) == {
        "ok": True,
        "topic": "room.1",
        "clients": 3,
        "users": 2,
    }
    stats = anonymous.emit("presence_stats", {"topic": "public.room.1"}, callback=True)
    assert (stats["clients"], stats["users"]) == (1, 0)
    tabs[1].disconnect()
    answer = bob.emit("presence", {"topic": "room.1"}, callback=True)
    assert answer["users"] == [{"sub": "alice", "clients": 1}, {"sub": "bob", "clients": 1}]


@pytest.mark.parametrize(
    ("payload", "error"),
    [
        ({"topic": "room.secret"}, "forbidden"),
        ({"topic": "public.other"}, "presence_off"),
        ({"topic": "bad topic"}, "invalid_topic"),
        ({"nope": 1}, "invalid_topic"),
        ("room.1", "invalid_topic"),
    ],
)
def test_presence_refuses_what_the_client_may_not_see(
    app: Flask, payload: object, error: str
) -> None:
    insider = connect(app, "alice", ["room.*"])
    assert insider.emit("subscribe", {"topic": "room.secret"}, callback=True)["ok"]
    outsider = connect(app, "mallory", ["elsewhere.*"])
    for event in ("presence", "presence_stats"):
        assert outsider.emit(event, payload, callback=True) == {"ok": False, "error": error}


def test_http_presence_topics_history_and_info(app: Flask, redis_client: redis.Redis) -> None:
    client = connect(app, "alice", ["room.*"])
    assert client.emit("subscribe", {"topic": "room.1"}, callback=True)["ok"]
    client.emit("presence_stats", {"topic": "room.1"}, callback=True)  # flushes this node
    http = app.test_client()
    answer = http.get("/api/presence/room.1", headers=KEY)
    assert answer.status_code == 200
    assert answer.json["users"] == [{"sub": "alice", "clients": 1}]
    assert http.get("/api/presence/room.1/stats", headers=KEY).json["users"] == 1
    assert http.get("/api/topics", headers=KEY).json["topics"] == [
        {"topic": "room.1", "clients": 1}
    ]
    assert http.get("/api/topics?pattern=other.*", headers=KEY).json["topics"] == []
    redis_client.xadd("tidings:history:room.1", {"d": '{"n": 1}'}, id="5-1")
    redis_client.xadd("tidings:history:room.1", {"d": '{"n": 2}'}, id="6-1")
    newest = http.get("/api/history/room.1?limit=1", headers=KEY).json
    assert newest["offset"] == "6-1" and [p["data"] for p in newest["publications"]] == [{"n": 2}]
    since = http.get("/api/history/room.1?since=5-1", headers=KEY).json
    assert since["recovered"] is True and [p["offset"] for p in since["publications"]] == ["6-1"]
    [node] = http.get("/api/info", headers=KEY).json["nodes"]
    assert node["connections"] == 1 and node["topics"] == 1


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "error"),
    [
        ("get", "/api/presence/public.other", None, 404, "presence_off"),
        ("get", "/api/presence/bad%20topic", None, 400, "invalid_topic"),
        ("get", "/api/topics?pattern=a:b", None, 400, "invalid_pattern"),
        ("get", "/api/history/room.none", None, 404, "unknown_topic"),
        ("get", "/api/history/room.1?since=yesterday", None, 400, "invalid_offset"),
        ("get", "/api/history/room.1?limit=0", None, 400, "invalid_limit"),
        ("get", "/api/history/room.1?limit=ten", None, 400, "invalid_limit"),
        ("post", "/api/disconnect", {"user": "alice"}, 400, "invalid_body"),
        ("post", "/api/disconnect", {"sub": ""}, 400, "invalid_sub"),
        ("post", "/api/disconnect", {"sub": ["alice"]}, 400, "invalid_sub"),
        ("post", "/api/disconnect", [], 400, "invalid_batch"),
        ("post", "/api/disconnect", [{"sub": "a"}] * 101, 400, "invalid_batch"),
        ("post", "/api/disconnect", "alice", 400, "invalid_body"),
        ("post", "/api/unsubscribe", {"sub": "alice"}, 400, "invalid_body"),
        ("post", "/api/unsubscribe", {"sub": "alice", "topic": "a b"}, 400, "invalid_topic"),
        ("post", "/api/revoke", {}, 400, "invalid_body"),
        ("post", "/api/revoke", {"before": 1}, 400, "invalid_body"),
        ("post", "/api/revoke", {"sub": "a", "jti": "b"}, 400, "invalid_body"),
        ("post", "/api/revoke", {"sub": "a", "before": "now"}, 400, "invalid_before"),
        ("post", "/api/revoke", {"sub": "a", "before": 1e12}, 400, "invalid_before"),
        ("post", "/api/revoke", {"jti": ""}, 400, "invalid_jti"),
        ("post", "/api/revoke", [{"sub": "a"}, {"nope": 1}], 400, "invalid_body"),
    ],
)
def test_bad_input_gets_a_named_4xx_and_changes_nothing(
    app: Flask,
    redis_client: redis.Redis,
    method: str,
    path: str,
    body: object,
    status: int,
    error: str,
) -> None:
    redis_client.xadd("tidings:history:room.1", {"d": "1"}, id="5-1")
    before = sorted(redis_client.keys("*"))
    answer = getattr(app.test_client(), method)(path, json=body, headers=KEY)
    assert (answer.status_code, answer.json["error"]) == (status, error)
    assert sorted(redis_client.keys("*")) == before


def test_every_route_needs_the_key(app: Flask) -> None:
    http = app.test_client()
    for method, path in [
        ("get", "/api/topics"),
        ("get", "/api/presence/room.1"),
        ("get", "/api/history/room.1"),
        ("get", "/api/info"),
        ("post", "/api/disconnect"),
        ("post", "/api/unsubscribe"),
        ("post", "/api/revoke"),
    ]:
        assert getattr(http, method)(path).status_code == 401
        wrong = {"Authorization": "Bearer k3y-not"}
        assert getattr(http, method)(path, headers=wrong).status_code == 401


def test_operator_commands_act_on_this_nodes_connections(app: Flask) -> None:
    presence = app.extensions["tidings.presence"]
    tabs = [connect(app, "alice", ["room.*"]) for _ in range(2)]
    bob = connect(app, "bob", ["room.*"])
    for client in (*tabs, bob):
        client.emit("subscribe", {"topic": "room.1"}, callback=True)
    tabs[0].emit("subscribe", {"topic": "room.2"}, callback=True)
    assert presence.handle({"op": "unsubscribe", "pairs": [["alice", "room.2"]]}) == 1
    assert {"name": "unsubscribed", "args": [{"topic": "room.2"}], "namespace": "/"} in (
        tabs[0].get_received()
    )
    assert not any(presence.local.is_subscribed(sid, "room.2") for sid in sid_of(app, "alice"))
    assert all(presence.local.is_subscribed(sid, "room.1") for sid in sid_of(app, "alice"))
    assert presence.handle({"op": "disconnect", "subs": ["alice"]}) == 2
    assert not any(tab.is_connected() for tab in tabs) and bob.is_connected()


def sid_of(app: Flask, sub: str) -> list[str]:
    return app.extensions["tidings.presence"].local.sids_of(sub)


def test_a_revoked_token_is_refused_and_its_connections_closed(
    app: Flask, redis_client: redis.Redis
) -> None:
    presence = app.extensions["tidings.presence"]
    old = connect(app, "alice", ["room.*"])
    other = socketio.test_client(app, auth={"token": token("bob", [], jti="keep")})
    settings = app.extensions["tidings.settings"]
    server_api.revoke(
        [{"sub": "alice", "before": time.time() + 5}, {"jti": "gone"}],
        client=redis_client,
        settings=settings,
        timeout=0.1,
    )
    assert presence.reload_revocations() == 1
    assert not old.is_connected() and other.is_connected()
    refused = connect(app, "alice", ["room.*"])
    assert not refused.is_connected()
    by_id = socketio.test_client(app, auth={"token": token("carol", [], jti="gone")})
    assert not by_id.is_connected()


def test_cli_commands_print_the_api_answers_and_refuse_bad_input(
    app: Flask, redis_client: redis.Redis
) -> None:
    runner = app.test_cli_runner()
    client = connect(app, "alice", ["room.*"])
    client.emit("subscribe", {"topic": "room.1"}, callback=True)
    client.emit("presence_stats", {"topic": "room.1"}, callback=True)  # flushes this node
    shown = runner.invoke(args=["presence", "room.1"])
    assert shown.exit_code == 0 and '"sub": "alice"' in shown.output
    assert '"topic": "room.1"' in runner.invoke(args=["topics"]).output
    assert '"nodes"' in runner.invoke(args=["info"]).output
    refused = runner.invoke(args=["presence", "public.other"])
    assert refused.exit_code == 2 and "presence_off" in refused.output
    assert runner.invoke(args=["revoke"]).exit_code == 2
    assert runner.invoke(args=["revoke", "--sub", "a", "--jti", "b"]).exit_code == 2
    assert not redis_client.exists("tidings:revoked:version")
    answer = runner.invoke(args=["revoke", "--jti", "t-1"])
    assert answer.exit_code == 0 and '"revoked": 1' in answer.output


def test_flask_token_carries_iat_and_jti_and_no_longer_than_revocations_last(app: Flask) -> None:
    runner = app.test_cli_runner()
    printed = runner.invoke(args=["token", "--sub", "alice", "--topic", "room.*"])
    claims = jwt.decode(printed.output.strip(), SECRET, algorithms=["HS256"])
    assert abs(claims["iat"] - time.time()) < 5 and claims["jti"]
    ttl = app.extensions["tidings.settings"].revocation_ttl
    too_long = runner.invoke(args=["token", "--sub", "a", "--topic", "x", "--ttl", str(ttl + 1)])
    assert too_long.exit_code == 2 and "TIDINGS_REVOCATION_TTL" in too_long.output


def test_the_per_user_cap_registers_the_node_first_and_frees_slots_on_flush(
    redis_client: redis.Redis, redis_server
) -> None:
    settings = Settings.from_env(
        {
            "TIDINGS_REDIS_URL": redis_server.url(0),
            "TIDINGS_SECRET": SECRET,
            "TIDINGS_MAX_CONNECTIONS_PER_USER": "1",
        }
    )
    capped = create_app({"SETTINGS": settings, "QUEUE": False})
    first = connect(capped, "alice")  # the node was not registered: it syncs, then admits
    assert first.is_connected()
    assert not connect(capped, "alice").is_connected()
    assert connect(capped, "bob").is_connected()
    first.disconnect()
    assert not connect(capped, "alice").is_connected()  # not flushed yet
    capped.extensions["tidings.presence"].flush()
    assert connect(capped, "alice").is_connected()
    assert redis_client.hget("tidings:users", "alice") == b"1"


def test_joins_and_leaves_go_to_the_topics_subscribers_in_order(redis_server) -> None:
    settings = Settings.from_env(
        {
            "TIDINGS_REDIS_URL": redis_server.url(0),
            "TIDINGS_SECRET": SECRET,
            "TIDINGS_PRESENCE_TOPICS": "room.*",
            "TIDINGS_JOIN_LEAVE_TOPICS": "room.*",
        }
    )
    app = create_app({"SETTINGS": settings, "QUEUE": False})
    presence = app.extensions["tidings.presence"]
    watcher, alice, other_room = (connect(app, sub, ["room.*"]) for sub in ("w", "alice", "x"))
    watcher.emit("subscribe", {"topic": "room.1"}, callback=True)
    presence.flush()
    watcher.get_received()
    alice.emit("subscribe", {"topic": "room.1"}, callback=True)
    alice.emit("unsubscribe", {"topic": "room.1"}, callback=True)
    alice.emit("subscribe", {"topic": "room.1"}, callback=True)
    other_room.emit("subscribe", {"topic": "room.2"}, callback=True)
    presence.flush()
    got = [(m["name"], [i["sub"] for i in m["args"][0]]) for m in watcher.get_received()]
    assert got == [("joins", ["alice"]), ("leaves", ["alice"]), ("joins", ["alice"])]
    assert [m["name"] for m in other_room.get_received()] == ["joins"]  # its own join only
