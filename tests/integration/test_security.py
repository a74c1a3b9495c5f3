"""Hostile input against real processes: origins, oversized frames, pickles, keys, ACLs."""

from __future__ import annotations

import json
import os
import pickle
import uuid
from typing import Any

import pytest
import redis
import requests
import websocket

from tests.support import Stack, wait_for
from tidings.client import TidingsClient

pytestmark = pytest.mark.integration

API_KEY = "a-publish-key-that-must-never-be-logged"


@pytest.fixture
def secured(make_stack) -> Stack:
    stack = make_stack(
        TIDINGS_API_KEY=API_KEY,
        TIDINGS_CORS_ORIGINS="https://app.example",
        TIDINGS_MAX_MESSAGE_BYTES="4096",
    )
    stack.start_worker()
    stack.start_web()
    stack.wait_ready()
    return stack


def ws_url(stack: Stack) -> str:
    return stack.url.replace("http", "ws") + "/socket.io/?EIO=4&transport=websocket"


def polling(stack: Stack, origin: str) -> int:
    answer = requests.get(
        stack.url + "/socket.io/?EIO=4&transport=polling", headers={"Origin": origin}, timeout=5
    )
    return answer.status_code


def test_only_configured_origins_may_connect(secured: Stack) -> None:
    assert polling(secured, "https://app.example") == 200
    assert polling(secured, "https://evil.example") == 400
    ws = websocket.create_connection(ws_url(secured), origin="https://app.example", timeout=5)
    assert ws.recv().startswith("0")
    ws.close()
    # gevent-websocket completes the upgrade before the app sees the request,
    # so refusal shows as a socket closed without an engine.io session.
    try:
        evil = websocket.create_connection(
            ws_url(secured), origin="https://evil.example", timeout=5
        )
        opened = evil.recv()
    except (websocket.WebSocketException, OSError):
        opened = ""
    assert not opened.startswith("0"), "another origin got an engine.io session"


def test_same_origin_is_the_default(stack: Stack) -> None:
    assert polling(stack, stack.url) == 200
    assert polling(stack, "https://evil.example") == 400


def test_an_oversized_message_closes_only_that_connection(secured: Stack) -> None:
    got: list[dict[str, Any]] = []
    bystander = TidingsClient(secured.url, on_publication=got.append)
    bystander.connect()
    bystander.subscribe("public.ok")
    ws = websocket.create_connection(ws_url(secured), origin="https://app.example", timeout=5)
    ws.recv()
    ws.send("40")
    ws.recv()
    ws.send("420" + json.dumps(["subscribe", {"topic": "x" * 10_000}]))
    with pytest.raises((websocket.WebSocketException, ConnectionError, OSError)):
        while True:
            ws.recv()
    secured.publish("public.ok", 1)
    wait_for(lambda: got, timeout=10)
    wait_for(lambda: 'tidings_limit_hits_total{kind="message_size"} 1.0' in metrics_text(secured))
    bystander.disconnect()


def metrics_text(stack: Stack) -> str:
    return requests.get(stack.url + "/metrics", timeout=5).text


class Exploit:
    """Unpickling this runs a shell command: the CVE-2025-61765 attack."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.path}",))


def test_a_pickle_on_the_queue_channel_runs_nothing(secured: Stack, tmp_path) -> None:
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    got: list[dict[str, Any]] = []
    client = TidingsClient(secured.url, on_publication=got.append)
    client.connect()
    client.subscribe("public.after")
    receivers = secured.redis().publish("tidings:socketio", pickle.dumps(Exploit(str(marker))))
    assert receivers >= 1  # the web worker did receive it
    secured.publish("public.after", "still serving")
    wait_for(lambda: got, timeout=10)
    assert not marker.exists()
    assert secured.web is not None and "Traceback" not in secured.web.log()
    client.disconnect()


def test_the_api_key_never_reaches_the_logs(secured: Stack) -> None:
    for key in (API_KEY, API_KEY + "-wrong"):
        requests.post(
            secured.url + "/api/publish",
            json={"topic": "public.k", "data": 1},
            headers={"Authorization": f"Bearer {key}"},
            timeout=5,
        )
    assert secured.web is not None
    logs = secured.web.log() + "".join(w.log() for w in secured.workers)
    assert API_KEY not in logs


# The web tier's Redis user: its channels and keys only (README, "Security").
WEB_ACL = (
    "on >web-pass resetchannels &tidings:socketio &tidings:socketio:* &tidings:control "
    "%R~tidings:history:* %R~tidings:listener ~tidings:ingest ~tidings:receipt:* ~tidings:stats:* "
    "~tidings:nodes ~tidings:node:* ~tidings:topics ~tidings:presence:* ~tidings:users "
    "~tidings:revoked:* ~tidings:reply:* ~tidings:webhooks "
    "-@all +ping +client|setname +subscribe +unsubscribe +publish "
    "+xrange +xrevrange +xadd +pttl +get +blpop +del +hset +hgetall +expire +scan +exists "
    "+evalsha +script|load +time +hget +hincrby +hdel +hlen +zadd +zscore +zrange "
    "+zrangebyscore +zrem +zremrangebyscore +pexpire +incr +multi +exec +rpush +xlen"
)
LISTENER_ACL = (
    "on >listener-pass resetchannels &tidings:topic:* &tidings:socketio:* ~tidings:* "
    "-@all +@connection +client|setname +psubscribe +punsubscribe +publish "
    "+@stream +@scripting +get +set +del +pexpire +pttl +exists +expire +rpush +hset +hgetall "
    "+hget +hincrby +multi +exec"
)


def listen_to_every_topic(client: redis.Redis) -> None:
    """PSUBSCRIBE tidings:topic:* and read the answer (pub/sub replies come later)."""
    pubsub = client.pubsub()
    pubsub.psubscribe("tidings:topic:*")
    pubsub.get_message(timeout=2)


def test_least_privilege_redis_users(make_stack) -> None:
    stack = make_stack()
    admin = stack.redis()
    if int(admin.info("server")["redis_version"].split(".")[0]) < 7:
        pytest.skip("read-only key patterns (%R~) need Redis 7")
    admin.execute_command("ACL", "SETUSER", "tidings-web", *WEB_ACL.split())
    admin.execute_command("ACL", "SETUSER", "tidings-listener", *LISTENER_ACL.split())
    # Celery's broker keys are Celery's business: a user of its own.
    admin.execute_command("ACL", "SETUSER", "celery", *["on", ">celery-pass", "~*", "&*", "+@all"])
    port = stack.redis_server.port
    broker = f"redis://celery:celery-pass@127.0.0.1:{port}/1"
    stack.start_worker(
        TIDINGS_REDIS_URL=f"redis://tidings-listener:listener-pass@127.0.0.1:{port}/0",
        TIDINGS_BROKER_URL=broker,
    )
    stack.start_web(
        TIDINGS_REDIS_URL=f"redis://tidings-web:web-pass@127.0.0.1:{port}/0",
        TIDINGS_BROKER_URL=broker,
    )
    stack.wait_ready()
    got: list[dict[str, Any]] = []
    client = TidingsClient(stack.url, on_publication=got.append)
    client.connect()
    client.subscribe("public.acl")
    stack.publish_many([("public.acl", i) for i in range(5)])
    # The two paths are read by two loops of the listener, with no order
    # between them: the pub/sub one goes out once the durable ones are through.
    wait_for(lambda: len(got) == 5, timeout=10)
    admin.publish("tidings:topic:public.acl", "5")
    wait_for(lambda: len(got) == 6, timeout=10)
    assert [p["data"] for p in got] == [0, 1, 2, 3, 4, 5]
    # What the web user may not do: forge publications or history, take the lease.
    web = redis.Redis(port=port, username="tidings-web", password="web-pass")
    for forbidden in (
        lambda: web.publish("tidings:topic:public.acl", "forged"),
        lambda: web.set("tidings:listener", "mine"),
        lambda: web.xadd("tidings:history:public.acl", {"d": "1"}),
        lambda: listen_to_every_topic(web),
    ):
        with pytest.raises(redis.exceptions.NoPermissionError):
            forbidden()
    for log in (stack.web.log() if stack.web else "", stack.workers[0].log()):
        assert "NOPERM" not in log and "no permissions" not in log
    client.disconnect()
