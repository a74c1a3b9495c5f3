"""Presence, the server API and webhooks across two real gunicorn nodes and a Celery worker.

One set of processes for the module (Redis, a Celery worker, two web nodes,
a webhook receiver on loopback); each test has topics and users of its own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.presence_support import API_KEY, Nodes, User, token
from tests.support import ROOT, Stack, wait_for

pytestmark = pytest.mark.integration

CAP = 3  # TIDINGS_MAX_CONNECTIONS_PER_USER


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Nodes]:
    running = Nodes(tmp_path_factory.mktemp("presence"), TIDINGS_MAX_CONNECTIONS_PER_USER=str(CAP))
    try:
        running.start()
        yield running
    finally:
        running.stop()


def presence_of(user: User, topic: str) -> dict:
    answer = user.call("presence", {"topic": topic})
    assert answer["ok"], answer
    return answer


def test_presence_is_the_same_on_every_node_and_counts_users_once(nodes: Nodes) -> None:
    topic = "room.across"
    alice_a = nodes.user(nodes.a, token("alice", ["room.*"]))
    watcher = nodes.user(nodes.a, token("walter", ["room.*"]))
    watcher.subscribe(topic)
    alice_b = nodes.user(nodes.b, token("alice", ["room.*"]))
    bob_b = nodes.user(nodes.b, token("bob", ["room.*"]))
    for user in (alice_a, alice_b, bob_b):
        user.subscribe(topic)
    expected = [
        {"sub": "alice", "clients": 2},
        {"sub": "bob", "clients": 1},
        {"sub": "walter", "clients": 1},
    ]
    # Each node shows its own changes at once; the other node's within a flush.
    wait_for(lambda: presence_of(watcher, topic)["users"] == expected, timeout=5)
    assert presence_of(bob_b, topic)["clients"] == 4
    stats = bob_b.call("presence_stats", {"topic": topic})
    assert (stats["clients"], stats["users"]) == (4, 3)
    over_http = nodes.api("GET", f"/api/presence/{topic}", stack=nodes.a).json()
    assert (over_http["clients"], over_http["users"]) == (4, expected)
    # Joins and leaves reach the topic's subscribers on either node.
    wait_for(lambda: {i["sub"] for i in watcher.items("joins")} >= {"alice", "bob"}, timeout=5)
    assert {i["client"] for i in watcher.items("joins")} >= {alice_b.sio.get_sid()}
    alice_b.close()
    wait_for(lambda: [i["sub"] for i in watcher.items("leaves")] == ["alice"], timeout=5)
    wait_for(lambda: presence_of(watcher, topic)["clients"] == 3, timeout=5)
    # Someone who may not subscribe to the topic learns nothing of it.
    outsider = nodes.user(nodes.b, token("mallory", ["lobby.*"]))
    assert outsider.call("presence", {"topic": topic}) == {"ok": False, "error": "forbidden"}
    assert outsider.items("joins") == []


def test_anonymous_clients_count_as_clients_not_users(nodes: Nodes) -> None:
    topic = "lobby.anonymous"
    anonymous = [nodes.user(stack) for stack in (nodes.a, nodes.b)]
    for user in anonymous:
        user.subscribe(topic)
    carol = nodes.user(nodes.b, token("carol", []))
    carol.subscribe(topic)
    wait_for(lambda: presence_of(carol, topic)["clients"] == 3, timeout=5)
    assert presence_of(anonymous[0], topic)["users"] == [{"sub": "carol", "clients": 1}]
    listed = nodes.api("GET", "/api/topics", params={"pattern": "lobby.anon*"}).json()
    assert listed["topics"] == [{"topic": topic, "clients": 3}]


def test_a_disconnect_from_another_process_reaches_every_node(nodes: Nodes) -> None:
    dora = [nodes.user(stack, token("dora", ["room.*"])) for stack in (nodes.a, nodes.b)]
    bystander = nodes.user(nodes.a, token("ed", ["room.*"]))
    env = {**nodes.a.env, "PATH": os.environ["PATH"]}
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "webapp", "disconnect", "dora"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert answer == {"disconnected": 2, "nodes": 2, "answered": 2}
    wait_for(lambda: not any(user.connected for user in dora), timeout=2)
    assert time.monotonic() - started < 30  # mostly the CLI's own start
    assert bystander.connected


def test_an_unsubscribe_from_another_process_reaches_every_node(nodes: Nodes) -> None:
    topic = "room.unsub"
    fay = [nodes.user(stack, token("fay", ["room.*"])) for stack in (nodes.a, nodes.b)]
    gus = nodes.user(nodes.b, token("gus", ["room.*"]))
    for user in (*fay, gus):
        user.subscribe(topic)
    fay[0].subscribe("room.unsub-kept")
    started = time.monotonic()
    answer = nodes.api("POST", "/api/unsubscribe", json={"sub": "fay", "topic": topic})
    assert answer.status_code == 200 and answer.json()["unsubscribed"] == 2
    wait_for(lambda: all(u.events["unsubscribed"] == [{"topic": topic}] for u in fay), timeout=2)
    assert time.monotonic() - started < 2
    nodes.a.publish(topic, "after")
    wait_for(lambda: gus.events["publications"], timeout=10)
    nodes.a.publish("room.unsub-kept", "kept")
    wait_for(lambda: fay[0].events["publications"], timeout=10)
    assert [p["topic"] for batch in fay[0].events["publications"] for p in batch] == [
        "room.unsub-kept"
    ]
    assert fay[1].events["publications"] == []
    assert all(user.connected for user in fay)
    wait_for(lambda: presence_of(gus, topic)["users"] == [{"sub": "gus", "clients": 1}], 5)


def test_revoked_tokens_are_closed_and_refused(nodes: Nodes) -> None:
    old = token("hal", ["room.*"], iat=time.time() - 60)
    hal = [nodes.user(stack, old) for stack in (nodes.a, nodes.b)]
    revoked = {"sub": "hal", "before": time.time() - 30}
    answer = nodes.api("POST", "/api/revoke", json=revoked).json()
    assert (answer["revoked"], answer["disconnected"]) == (1, 2)
    wait_for(lambda: not any(user.connected for user in hal), timeout=2)
    for stack in (nodes.a, nodes.b):
        again = nodes.user(stack, old, connect=False)
        assert not again.connect() and again.refused == [{"message": "invalid_token"}]
    nodes.user(nodes.a, token("hal", ["room.*"]))  # issued after `before`: accepted
    # By token id: that token only.
    ivy = nodes.user(nodes.b, token("ivy", [], jti="ivy-laptop"))
    phone = nodes.user(nodes.a, token("ivy", [], jti="ivy-phone"))
    answer = nodes.api("POST", "/api/revoke", json={"jti": "ivy-laptop"}, stack=nodes.a).json()
    assert answer["disconnected"] == 1
    wait_for(lambda: not ivy.connected, timeout=2)
    assert phone.connected
    refused = nodes.user(nodes.a, token("ivy", [], jti="ivy-laptop"), connect=False)
    assert not refused.connect()
    # Neither sub nor jti: refused, and nothing revoked.
    bad = nodes.api("POST", "/api/revoke", json={"before": time.time()})
    assert (bad.status_code, bad.json()["error"]) == (400, "invalid_body")
    assert phone.connected


def test_the_per_user_cap_holds_across_nodes(nodes: Nodes) -> None:
    stacks = [nodes.a, nodes.b, nodes.a]
    jack = [nodes.user(stack, token("jack", [])) for stack in stacks]
    extra = nodes.user(nodes.b, token("jack", []), connect=False)
    assert not extra.connect() and extra.refused == [{"message": "limit"}]
    nodes.user(nodes.b, token("kim", []))  # another user is not affected
    jack[0].close()

    def one_more() -> bool:
        return nodes.user(nodes.b, token("jack", []), connect=False).connect()

    wait_for(one_more, timeout=5, interval=0.2)  # once node a has flushed the disconnect
    assert 'tidings_limit_hits_total{kind="connections_per_user"}' in (
        requests.get(nodes.b.url + "/metrics", timeout=5).text
    )


def test_webhooks_arrive_signed_and_in_order_across_a_receiver_outage(nodes: Nodes) -> None:
    topics = ("room.hook1", "room.hook2")
    lee = nodes.user(nodes.a, token("lee", ["room.*"]))
    lee.subscribe(topics[0])
    wait_for(lambda: len(of(nodes, topics)) == 2, timeout=10)  # occupied, member.added
    nodes.receiver.stop()
    lee_b = nodes.user(nodes.b, token("lee", ["room.*"]))
    lee_b.subscribe(topics[0])  # the same member on another node: no event
    mia = nodes.user(nodes.b, token("mia", ["room.*"]))
    mia.subscribe(topics[1])
    # The receiver being away slows nothing down for clients.
    started = time.monotonic()
    nodes.a.publish(topics[1], "while the receiver is down")
    wait_for(lambda: mia.events["publications"], timeout=5)
    assert time.monotonic() - started < 1
    lee.close()
    lee_b.close()  # lee's last connection: removed, then vacated
    wait_for(lambda: failures(nodes) >= 1, timeout=10)
    nodes.receiver.start()
    mia.close()
    expected = {
        topics[0]: [
            ("topic.occupied", None),
            ("member.added", "lee"),
            ("member.removed", "lee"),
            ("topic.vacated", None),
        ],
        topics[1]: [
            ("topic.occupied", None),
            ("member.added", "mia"),
            ("member.removed", "mia"),
            ("topic.vacated", None),
        ],
    }

    def arrived() -> bool:
        got = of(nodes, topics)
        return all(
            [(e["name"], e.get("sub")) for e in got if e["topic"] == t] == expected[t]
            for t in topics
        )

    wait_for(arrived, timeout=30, interval=0.2)  # backoff: 1, 2, 4 s ...
    ids = [e["id"] for e in nodes.receiver.events()]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))


def of(nodes: Nodes, topics: tuple[str, ...]) -> list[dict]:
    """The webhook events of `topics` received so far, once each (signatures checked)."""
    return [event for event in nodes.receiver.events() if event["topic"] in topics]


def failures(nodes: Nodes) -> int:
    text = requests.get(nodes.a.url + "/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith('tidings_webhook_failures_total{kind="error"}'):
            return int(float(line.split()[-1]))
    return 0


def test_a_killed_node_drops_out_of_presence(nodes: Nodes, tmp_path: Path) -> None:
    topic = "room.kill"
    third = Stack(
        nodes.server,
        tmp_path,
        **{
            k: v for k, v in nodes.a.env.items() if k.startswith("TIDINGS_") and k != "TIDINGS_BIND"
        },
    )
    third.start_web()
    third.wait_ready()
    try:
        doomed = nodes.user(third, token("ned", ["room.*"]))
        doomed.subscribe(topic)
        survivor = nodes.user(nodes.a, token("ola", ["room.*"]))
        survivor.subscribe(topic)
        wait_for(lambda: presence_of(survivor, topic)["clients"] == 2, timeout=5)
        assert third.web is not None
        os.killpg(third.web.pid, signal.SIGKILL)  # the master and its worker, at once
        killed = time.monotonic()
        wait_for(
            lambda: presence_of(survivor, topic)["users"] == [{"sub": "ola", "clients": 1}],
            timeout=30,
            interval=0.5,
        )
        gone_after = time.monotonic() - killed
        print(f"killed node's members gone after {gone_after:.1f} s")
        nodes_left = nodes.api("GET", "/api/info").json()["nodes"]
        assert len(nodes_left) == 2
    finally:
        third.stop()


def test_the_api_refuses_a_wrong_key(nodes: Nodes) -> None:
    for path in ("/api/topics", "/api/info", f"/api/presence/room.x?k={API_KEY}"):
        answer = requests.get(nodes.a.url + path, timeout=5)
        assert answer.status_code == 401
