"""The web worker's message-queue manager and its routes, on a real Redis, in threading mode."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from flask import Flask

from tests.support import forwarded_message, wait_for
from tidings.keys import queue_channel
from tidings.settings import Settings
from webapp import create_app
from webapp import queue as queue_module
from webapp.queue import QueueManager
from webapp.routing import LIVE, SUBSCRIBING, UNSUBSCRIBING, Routes

# -- routes, on their own -------------------------------------------------------------


def test_a_route_is_subscribed_once_and_left_only_after_lingering_unwanted() -> None:
    routes = Routes(linger=2.0)
    routes.reset(connected=True)
    route = routes.want("a")
    routes.want("a")
    assert routes.take_commands() == (["tidings:socketio:a"], [])
    assert not route.live.is_set()
    assert routes.confirmed("tidings:socketio:a") is route
    assert route.state == LIVE and route.live.is_set()
    routes.vacate("a", now=10.0)
    assert routes.expire(now=11.9) == []  # still lingering: a client may come back
    routes.want("a")  # ...and one does: nothing to send, it never left
    assert routes.expire(now=20.0) == [] and routes.take_commands() == ([], [])
    routes.vacate("a", now=30.0)
    assert routes.expire(now=32.0) == [route]
    assert route.state == UNSUBSCRIBING and not route.live.is_set()
    assert routes.take_commands() == ([], ["tidings:socketio:a"])
    routes.left("tidings:socketio:a")
    assert "a" not in routes.by_topic


def test_a_route_wanted_again_while_leaving_is_subscribed_again_in_order() -> None:
    routes = Routes(linger=0.0)
    routes.reset(connected=True)
    routes.want("a")
    routes.confirmed("tidings:socketio:a")
    routes.take_commands()
    routes.vacate("a", now=1.0)
    routes.expire(now=1.0)
    assert routes.take_commands() == ([], ["tidings:socketio:a"])
    route = routes.want("a")  # the UNSUBSCRIBE is on its way
    assert route.state == SUBSCRIBING
    assert routes.take_commands() == (["tidings:socketio:a"], [])
    routes.left("tidings:socketio:a")  # Redis answers the UNSUBSCRIBE first: ignored
    assert routes.by_topic["a"] is route and not route.live.is_set()
    routes.confirmed("tidings:socketio:a")  # then the SUBSCRIBE
    assert route.state == LIVE and route.live.is_set()


def test_after_a_reconnect_only_wanted_routes_are_subscribed_again() -> None:
    routes = Routes(linger=5.0)
    routes.reset(connected=True)
    for topic in ("a", "b"):
        routes.want(topic)
        routes.confirmed(queue_channel(topic))
    routes.take_commands()
    routes.vacate("b", now=1.0)  # lingering when the connection drops
    routes.reset(connected=False)
    assert not routes.by_topic["a"].live.is_set() and "b" not in routes.by_topic
    routes.want("c")  # wanted while disconnected: queued at the reconnect
    assert routes.take_commands() == ([], [])
    routes.reset(connected=True)
    assert routes.take_commands() == (["tidings:socketio:a", "tidings:socketio:c"], [])
    assert routes.confirmed("tidings:socketio:b") is None  # not ours any more


# -- the manager, with its loops on threads ---------------------------------------------


@pytest.fixture
def app(redis_client: redis.Redis, redis_server) -> Iterator[Flask]:
    settings = Settings.from_env({"TIDINGS_REDIS_URL": redis_server.url(0)})
    app = create_app({"SETTINGS": settings, "SUBSCRIBE_QUEUE": True, "TESTING": True})
    manager = app.extensions["tidings.queue"]
    manager.routes.linger = 0.2
    yield app
    manager.close()


def member(manager: QueueManager, topic: str, eio_sid: str = "e1") -> str:
    """Connect a (socketless) client to the manager and put it in the topic's room."""
    sid = manager.connect(eio_sid, "/")
    manager.enter_room(sid, "/", "t:" + topic)
    return sid


def subscribers(client: redis.Redis, topic: str) -> int:
    return client.pubsub_numsub(queue_channel(topic))[0][1]


def test_a_topic_channel_is_heard_while_a_local_client_wants_it(
    app: Flask, redis_client: redis.Redis
) -> None:
    manager = app.extensions["tidings.queue"]
    wait_for(lambda: manager.subscribed, timeout=5)
    assert subscribers(redis_client, "a") == 0
    sid = member(manager, "a")
    wait_for(lambda: subscribers(redis_client, "a") == 1, timeout=5)
    wait_for(lambda: manager.channels() == 1, timeout=5)
    manager.leave_room(sid, "/", "t:a")
    wait_for(lambda: subscribers(redis_client, "a") == 0, timeout=5)  # after its linger
    assert manager.channels() == 0


def test_after_its_connection_is_killed_the_worker_resubscribes_every_wanted_topic(
    app: Flask, redis_client: redis.Redis
) -> None:
    manager = app.extensions["tidings.queue"]
    wait_for(lambda: manager.subscribed, timeout=5)
    topics = [f"t{n}" for n in range(600)]  # more than one SUBSCRIBE's worth
    for n, topic in enumerate(topics):
        member(manager, topic, eio_sid=f"e{n}")
    wait_for(lambda: manager.channels() == len(topics), timeout=10)
    redis_client.client_kill_filter(_type="pubsub")
    wait_for(lambda: manager.reconnects == 1, timeout=5)
    wait_for(lambda: manager.channels() == len(topics), timeout=10)
    assert all(subscribers(redis_client, topic) == 1 for topic in topics)


def test_a_live_batch_the_catch_up_already_replayed_is_not_sent_again(
    app: Flask, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager = app.extensions["tidings.queue"]
    # Forwarded before the worker heard the topic: only this test hands them over.
    batches = [forwarded_message(redis_client, "a", data) for data in ([1, 2], [3, 4], [5])]
    member(manager, "a")
    sent: list[list[Any]] = []

    def deliver(server: Any, pkt: Any, eio_sids: Any, *, frame: Any = None) -> int:
        _, pubs = json.loads(pkt.data[1:])
        sent.append([p["data"] for p in pubs])
        return 0

    monkeypatch.setattr(queue_module.fanout, "deliver", deliver)
    offsets = [json.loads(raw)["data"][0] for raw in batches]
    # The catch-up replayed up to the second publication of the second batch.
    manager._replayed["a"] = queue_module.parse_offset(offsets[1][0]["offset"])
    for raw in batches:
        manager._deliver_routed("a", raw)
    manager._deliver_routed("a", batches[0])  # after a newer message, nothing is trimmed
    assert sent == [[4], [5], [1, 2]]


def test_a_bug_in_the_loop_is_logged_with_its_stack_not_as_an_outage(
    app: Flask, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    manager = app.extensions["tidings.queue"]
    member(manager, "a")
    wait_for(lambda: manager.channels() == 1, timeout=5)
    failures: list[str] = []

    def broken(topic: str, raw: bytes) -> None:
        failures.append(topic)
        raise ValueError("a bug")

    monkeypatch.setattr(manager, "_deliver_routed", broken)
    with caplog.at_level("WARNING", logger="tidings.queue"):
        forwarded_message(redis_client, "a", [1])
        wait_for(lambda: manager.reconnects == 1 and manager.channels() == 1, timeout=5)
    (record,) = [r for r in caplog.records if "failed" in r.getMessage()]
    assert record.exc_info is not None and "a bug" in str(record.exc_info[1])
    assert not [r for r in caplog.records if "Redis unavailable" in r.getMessage()]


def test_a_topic_left_after_its_linger_leaves_no_state_behind(app: Flask) -> None:
    manager = app.extensions["tidings.queue"]
    wait_for(lambda: manager.subscribed, timeout=5)
    for n in range(50):
        sid = member(manager, f"gone.{n}", eio_sid=f"g{n}")
        manager.note_offset(f"gone.{n}", "1-1")
        manager.leave_room(sid, "/", f"t:gone.{n}")
    wait_for(lambda: not manager.routes.by_topic, timeout=10)
    assert not any(topic.startswith("gone.") for topic in manager._shown)
