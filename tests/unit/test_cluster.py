"""The cluster-wide presence state in a real Redis: merging nodes, reaping the dead, events."""

from __future__ import annotations

import redis

from tidings.cluster import NODE_TTL_MS, Cluster
from tidings.keys import NODES_INDEX, TOPICS_KEY, WEBHOOK_STREAM, node_key, presence_key
from tidings.presence import LocalPresence

FACTS = {"pid": "1"}


def node(*sessions: tuple[str, str | None, str]) -> LocalPresence:
    """A node's bookkeeping with (sid, sub, topic) subscriptions."""
    local = LocalPresence(("room.*",), ("room.*",))
    for sid, sub, topic in sessions:
        if sid not in local.members:
            local.connect(sid, sub)
        local.subscribe(sid, topic)
    return local


def events(client: redis.Redis) -> list[tuple[str, ...]]:
    """The webhook events appended so far, as (name, topic[, sub])."""
    out = []
    for _, fields in client.xrange(WEBHOOK_STREAM):
        decoded = {k.decode(): v.decode() for k, v in fields.items()}
        out.append(tuple(decoded[k] for k in ("name", "topic", "sub") if k in decoded))
    return out


def kill(client: redis.Redis, name: str) -> None:
    """Make a node's last heartbeat older than the TTL, as a node killed that long ago."""
    client.zadd(NODES_INDEX, {name: 1})


def test_two_nodes_merge_and_transitions_happen_once_across_them(
    redis_client: redis.Redis,
) -> None:
    cluster = Cluster(redis_client, webhooks=True)
    one = node(("a1", "alice", "room.1"), ("x", None, "room.1"))
    two = node(("a2", "alice", "room.1"), ("b", "bob", "room.1"))
    assert cluster.flush("one", one.take(), sync=True, facts=FACTS).known
    assert cluster.flush("two", two.take(), sync=True, facts=FACTS).known
    assert cluster.stats("room.1") == (4, 2)
    clients, users = cluster.members("room.1")
    assert clients == 4
    assert users == [{"sub": "alice", "clients": 2}, {"sub": "bob", "clients": 1}]
    assert cluster.topics() == {"room.1": 4}
    one.disconnect("a1")
    one.disconnect("x")
    cluster.flush("one", one.take(), sync=False, facts=FACTS)
    assert cluster.members("room.1") == (
        2,
        [{"sub": "alice", "clients": 1}, {"sub": "bob", "clients": 1}],
    )
    two.disconnect("a2")
    two.disconnect("b")
    cluster.flush("two", two.take(), sync=False, facts=FACTS)
    assert cluster.stats("room.1") == (0, 0)
    assert cluster.topics() == {}
    assert not redis_client.exists(presence_key("room.1"))
    assert events(redis_client) == [
        ("topic.occupied", "room.1"),
        ("member.added", "room.1", "alice"),
        ("member.added", "room.1", "bob"),
        ("member.removed", "room.1", "alice"),
        ("member.removed", "room.1", "bob"),
        ("topic.vacated", "room.1"),
    ]


def test_a_dead_node_is_reaped_by_the_next_reader(redis_client: redis.Redis) -> None:
    cluster = Cluster(redis_client, webhooks=True)
    live = node(("a", "alice", "room.1"))
    dead = node(("b", "bob", "room.1"), ("c", "carol", "room.2"))
    cluster.flush("live", live.take(), sync=True, facts=FACTS)
    cluster.flush("dead", dead.take(), sync=True, facts=FACTS)
    redis_client.delete(WEBHOOK_STREAM)
    cluster.stats("room.1")
    assert cluster.stats("room.1") == (2, 2)  # not dead yet: nothing reaped
    kill(redis_client, "dead")
    redis_client.script_flush()  # as a restarted Redis: the scripts are loaded again
    assert cluster.members("room.1") == (1, [{"sub": "alice", "clients": 1}])
    assert cluster.topics() == {"room.1": 1}
    assert [n["node"] for n in cluster.nodes()] == ["live"]
    assert redis_client.keys("tidings:node:dead*") == []
    assert sorted(events(redis_client)) == [
        ("member.removed", "room.1", "bob"),
        ("member.removed", "room.2", "carol"),
        ("topic.vacated", "room.2"),
    ]


def test_a_node_reaped_while_alive_syncs_back_without_spurious_events(
    redis_client: redis.Redis,
) -> None:
    cluster = Cluster(redis_client, webhooks=True)
    paused = node(("a", "alice", "room.1"))
    cluster.flush("paused", paused.take(), sync=True, facts=FACTS)
    kill(redis_client, "paused")
    assert cluster.stats("room.1") == (0, 0)  # reaped by a reader
    paused.connect("a2", "alice")
    paused.subscribe("a2", "room.1")
    flushed = cluster.flush("paused", paused.take(), sync=False, facts=FACTS)
    assert not flushed.known  # its deltas are not applied to nothing
    assert cluster.stats("room.1") == (0, 0)
    assert cluster.flush("paused", paused.snapshot(), sync=True, facts=FACTS).known
    assert cluster.members("room.1") == (2, [{"sub": "alice", "clients": 2}])
    redis_client.delete(WEBHOOK_STREAM)
    # A sync of an unchanged share changes nothing and says nothing.
    cluster.flush("paused", paused.snapshot(), sync=True, facts=FACTS)
    assert events(redis_client) == []
    assert cluster.members("room.1") == (2, [{"sub": "alice", "clients": 2}])


def test_a_sync_heals_drift_and_a_node_never_goes_below_zero(redis_client: redis.Redis) -> None:
    cluster = Cluster(redis_client, webhooks=False)
    local = node(("a", "alice", "room.1"))
    cluster.flush("n", local.take(), sync=True, facts=FACTS)
    redis_client.hincrby(node_key("n", "topics"), "room.1", 5)  # a lost write, say
    redis_client.hincrby(TOPICS_KEY, "room.1", 5)
    assert cluster.stats("room.1") == (6, 1)
    cluster.flush("n", local.snapshot(), sync=True, facts=FACTS)
    assert cluster.stats("room.1") == (1, 1)
    local.disconnect("a")
    batch = local.take()
    batch.topics["room.1"] = -10  # more than it ever added
    cluster.flush("n", batch, sync=False, facts=FACTS)
    assert cluster.stats("room.1") == (0, 0)
    assert redis_client.xlen(WEBHOOK_STREAM) == 0  # webhooks off: no events


def test_the_per_user_cap_holds_across_nodes(redis_client: redis.Redis) -> None:
    cluster = Cluster(redis_client)
    assert cluster.admit("one", "alice", 2) == -1  # not registered yet
    for name in ("one", "two"):
        cluster.flush(name, LocalPresence().take(), sync=True, facts=FACTS)
    assert cluster.admit("one", "alice", 2) == 1
    assert cluster.admit("two", "alice", 2) == 1
    assert cluster.admit("two", "alice", 2) == 0
    assert cluster.admit("two", "bob", 2) == 1
    # A disconnect is a delta of the node's next flush.
    local = LocalPresence()
    local.connect("a", "alice", counted=True)
    local.connect("b", "alice", counted=True)
    local.disconnect("a")
    batch = local.take()
    assert batch.users == {"alice": -1}
    cluster.flush("one", batch, sync=False, facts=FACTS)
    assert cluster.admit("one", "alice", 2) == 1


def test_nodes_carry_their_facts_and_heartbeat(redis_client: redis.Redis) -> None:
    cluster = Cluster(redis_client)
    cluster.flush("web:1", LocalPresence().take(), sync=True, facts={"pid": "1", "topics": "0"})
    [facts] = cluster.nodes()
    assert facts["node"] == "web:1" and facts["pid"] == "1" and int(facts["seen"]) > 0
    score = redis_client.zscore(NODES_INDEX, "web:1")
    assert score is not None and 0 < redis_client.pttl(node_key("web:1")) <= 3 * NODE_TTL_MS
