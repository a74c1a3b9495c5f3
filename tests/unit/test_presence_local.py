"""One node's presence bookkeeping: tabs, anonymous clients, net deltas, join/leave order."""

from __future__ import annotations

from tidings.presence import LocalPresence


def test_tabs_of_one_user_are_one_member_with_several_connections() -> None:
    local = LocalPresence(("room.*",))
    for sid in ("a1", "a2"):
        local.connect(sid, "alice")
        local.subscribe(sid, "room.1")
    local.connect("x", None)
    local.subscribe("x", "room.1")
    local.subscribe("x", "room.1")  # again: counted once
    batch = local.take()
    assert batch.topics == {"room.1": 3}
    assert batch.members == {("room.1", "alice"): 2}  # anonymous: clients only
    assert local.take().empty()


def test_deltas_are_net_and_a_disconnect_leaves_every_topic() -> None:
    local = LocalPresence(("room.*",))
    local.connect("a", "alice")
    local.subscribe("a", "room.1")
    local.subscribe("a", "other")
    local.take()
    local.subscribe("a", "room.2")
    local.unsubscribe("a", "room.2")  # in and out between flushes: nothing to send
    local.unsubscribe("a", "never-subscribed")
    assert local.take().empty()
    local.disconnect("a")
    batch = local.take()
    assert batch.topics == {"room.1": -1, "other": -1}
    assert batch.members == {("room.1", "alice"): -1}
    assert local.sids_of("alice") == [] and local.local_counts() == (0, 0)


def test_join_leave_events_keep_their_order_and_need_presence() -> None:
    local = LocalPresence(("room.*",), ("room.*", "plain.*"))
    local.connect("a", "alice")
    local.connect("b", "bob")
    local.subscribe("a", "room.1")
    local.subscribe("b", "room.1")
    local.unsubscribe("a", "room.1")
    local.subscribe("a", "plain.1")  # join/leave without presence: no events
    events = local.take().events
    assert list(events) == ["room.1"]
    assert [(kind, item["sub"], item["client"]) for kind, item in events["room.1"]] == [
        ("joins", "alice", "a"),
        ("joins", "bob", "b"),
        ("leaves", "alice", "a"),
    ]


def test_snapshot_is_the_whole_share_and_clears_the_deltas() -> None:
    local = LocalPresence(("room.*",))
    local.connect("a", "alice", counted=True)
    local.connect("b", "alice", counted=True)
    local.subscribe("a", "room.1")
    snapshot = local.snapshot()
    assert snapshot.topics == {"room.1": 1}
    assert snapshot.members == {("room.1", "alice"): 1}
    assert snapshot.users == {"alice": 2}
    assert not local.pending()
    local.disconnect("b")
    assert local.take().users == {"alice": -1}
