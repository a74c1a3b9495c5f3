import json

import pytest
import redis

from tidings.connection import connect
from tidings.forwarder import Fenced, Forwarder, Publication
from tidings.history import parse_offset, recover
from tidings.keys import INGEST_GROUP, INGEST_STREAM, LEASE_KEY, QUEUE_TOPIC_PREFIX
from tidings.lease import Lease


@pytest.fixture
def forwarder(redis_client: redis.Redis) -> Forwarder:
    return Forwarder(redis_client, history_size=5, history_ttl=100)


def queue_messages(pubsub: redis.client.PubSub) -> list[dict]:
    """Decode the queue messages received, each with the channel it came on."""
    messages = []
    while (message := pubsub.get_message(timeout=0.2)) is not None:
        if message["type"] == "pmessage":
            messages.append({**json.loads(message["data"]), "_channel": message["channel"]})
    return messages


def test_one_queue_message_per_topic_with_increasing_offsets(
    redis_client: redis.Redis, forwarder: Forwarder
) -> None:
    pubsub = redis_client.pubsub()
    pubsub.psubscribe(QUEUE_TOPIC_PREFIX + "*")
    offsets = forwarder.forward(
        [
            Publication("a", '{"n":1}', 5),
            Publication("b", '"x"'),
            Publication("a", "[2]"),
        ]
    )
    assert len(offsets) == 3
    messages = queue_messages(pubsub)
    assert [m["room"] for m in messages] == ["t:a", "t:b"]
    # Each topic's own channel: only the web workers with its clients hear it.
    assert [m["_channel"] for m in messages] == [b"tidings:socketio:a", b"tidings:socketio:b"]
    first = messages[0]
    # python-socketio's pub/sub manager format: one argument, the list.
    assert first["method"] == "emit" and first["event"] == "publications"
    assert first["namespace"] == "/" and first["callback"] is None
    pubs = first["data"][0]
    assert [p["data"] for p in pubs] == [{"n": 1}, [2]]
    assert parse_offset(pubs[0]["offset"]) < parse_offset(pubs[1]["offset"])
    assert redis_client.ttl("tidings:history:a") > 90
    fields = redis_client.xrange("tidings:history:a")[0][1]
    assert fields == {b"d": b'{"n":1}', b"t": b"5"}


def test_history_is_capped_at_history_size(redis_client: redis.Redis, forwarder: Forwarder) -> None:
    forwarder.forward([Publication("a", str(i)) for i in range(12)])
    assert redis_client.xlen("tidings:history:a") == 5


def test_recover_since_an_offset_still_in_history(
    redis_client: redis.Redis, forwarder: Forwarder
) -> None:
    offsets = forwarder.forward([Publication("a", str(i)) for i in range(4)])
    recovery = recover(redis_client, "a", offsets[1], history_size=5)
    assert recovery.recovered and recovery.offset == offsets[-1]
    assert [p["data"] for p in recovery.publications] == [2, 3]
    assert recover(redis_client, "a", offsets[-1], history_size=5).publications == []


def test_recover_reports_a_gap_once_since_was_trimmed_or_is_bogus(
    redis_client: redis.Redis, forwarder: Forwarder
) -> None:
    offsets = forwarder.forward([Publication("a", str(i)) for i in range(8)])
    trimmed = recover(redis_client, "a", offsets[0], history_size=5)
    assert not trimmed.recovered and trimmed.offset == offsets[-1]
    for bogus in ["0-1", "nonsense", 12, {"x": 1}]:
        assert not recover(redis_client, "a", bogus, history_size=5).recovered


def test_recover_since_an_offset_this_redis_never_had(redis_client: redis.Redis) -> None:
    # After a failover the new master may lack the client's last offset; what
    # it holds after that offset is still everything the client can get.
    for entry_id, data in [("100-0", "1"), ("300-0", "3")]:
        redis_client.xadd("tidings:history:a", {"d": data}, id=entry_id)
    recovery = recover(redis_client, "a", "200-0", history_size=5)
    assert recovery.recovered and [p["data"] for p in recovery.publications] == [3]
    future = recover(redis_client, "a", "9999999999999-0", history_size=5)
    assert future.recovered and future.publications == []
    # Older than everything kept: trimmed past it, a gap.
    assert not recover(redis_client, "a", "50-0", history_size=5).recovered


def test_fenced_forwarder_writes_and_emits_nothing(
    redis_client: redis.Redis, forwarder: Forwarder
) -> None:
    lease = Lease(redis_client, 5000, since_ms=0)
    assert lease.acquire()
    forwarder.forward([Publication("a", "1")], lease_token=lease.token)
    redis_client.set(LEASE_KEY, "someone else")
    pubsub = redis_client.pubsub()
    pubsub.psubscribe(QUEUE_TOPIC_PREFIX + "*")
    with pytest.raises(Fenced):
        forwarder.forward([Publication("a", "2")], lease_token=lease.token)
    assert redis_client.xlen("tidings:history:a") == 1
    assert queue_messages(pubsub) == []


def test_ingest_entries_are_acked_in_the_same_step(
    redis_client: redis.Redis, forwarder: Forwarder
) -> None:
    redis_client.xgroup_create(INGEST_STREAM, INGEST_GROUP, id="0", mkstream=True)
    ids = [redis_client.xadd(INGEST_STREAM, {"topic": "a", "data": "1"}) for _ in range(3)]
    redis_client.xreadgroup(INGEST_GROUP, "c", {INGEST_STREAM: ">"})
    assert redis_client.xpending(INGEST_STREAM, INGEST_GROUP)["pending"] == 3
    forwarder.forward([Publication("a", "1")], ack_ids=ids)
    assert redis_client.xpending(INGEST_STREAM, INGEST_GROUP)["pending"] == 0


def test_entries_seen_by_the_wake_up_are_forwarded_only_if_the_group_hands_them_over(
    redis_client: redis.Redis, forwarder: Forwarder
) -> None:
    redis_client.xgroup_create(INGEST_STREAM, INGEST_GROUP, id="0", mkstream=True)
    lease = Lease(redis_client, 3000, since_ms=0)
    assert lease.acquire()

    def forward(entries: list, expect: list) -> tuple[bool, list, str]:
        pubs = [Publication("a", fields[b"data"].decode()) for _, fields in entries]
        return forwarder.forward_and_read(
            pubs,
            ack_ids=[entry_id for entry_id, _ in entries],
            lease_token=lease.token,
            consumer="me",
            count=10,
            expect=expect,
        )

    assert forwarder.wait("0-0", block_ms=10, count=10) == []
    first = [redis_client.xadd(INGEST_STREAM, {"topic": "a", "data": str(n)}) for n in range(2)]
    seen = forwarder.wait("0-0", block_ms=10, count=10)
    assert [entry_id for entry_id, _ in seen] == first
    entries = [(entry_id, dict(zip(flat[::2], flat[1::2], strict=True))) for entry_id, flat in seen]
    forwarded, more, newest = forward(entries, first)
    assert forwarded and more == [] and newest == first[-1].decode()
    assert [f[b"d"] for _, f in redis_client.xrange("tidings:history:a")] == [b"0", b"1"]
    assert redis_client.xpending(INGEST_STREAM, INGEST_GROUP)["pending"] == 0
    # Another consumer took the next one between the wake-up and the claim:
    # nothing is forwarded, and what the group hands over comes back instead.
    later = [redis_client.xadd(INGEST_STREAM, {"topic": "a", "data": str(n)}) for n in (2, 3)]
    redis_client.xreadgroup(INGEST_GROUP, "someone", {INGEST_STREAM: ">"}, count=1)
    entries = [(later[0], {b"data": b"2"}), (later[1], {b"data": b"3"})]
    forwarded, more, _ = forward(entries, later)
    assert not forwarded
    assert [entry_id for entry_id, _ in more] == [later[1]]
    assert redis_client.xlen("tidings:history:a") == 2


def test_recover_from_the_beginning_while_history_was_never_trimmed(
    redis_client: redis.Redis, forwarder: Forwarder
) -> None:
    # A client that subscribed while the topic was empty resumes with "0-0".
    empty = recover(redis_client, "a", "0-0", history_size=5)
    assert empty.recovered and empty.publications == []
    forwarder.forward([Publication("a", str(i)) for i in range(4)])
    whole = recover(redis_client, "a", "0-0", history_size=5)
    assert whole.recovered and [p["data"] for p in whole.publications] == [0, 1, 2, 3]
    forwarder.forward([Publication("a", "4")])
    assert not recover(redis_client, "a", "0-0", history_size=5).recovered


def test_a_forwarder_keeps_one_connection_for_all_its_batches(redis_server) -> None:
    client = connect(redis_server.url(0), "listener")
    checkouts: list[object] = []
    get_connection = client.connection_pool.get_connection

    def counted(*args, **kwargs):
        checkouts.append(None)
        return get_connection(*args, **kwargs)

    client.connection_pool.get_connection = counted  # type: ignore[method-assign]
    forwarder = Forwarder(client, history_size=5, history_ttl=100)
    try:
        for i in range(5):
            forwarder.forward([Publication("a", str(i))])
        assert len(checkouts) == 1
        forwarder.close()
        # A closed forwarder takes a connection again when it next forwards.
        forwarder.forward([Publication("a", "5")])
        assert len(checkouts) == 2
    finally:
        forwarder.close()
        client.close()


def test_a_redis_that_lost_the_script_gets_it_again(
    redis_client: redis.Redis, forwarder: Forwarder
) -> None:
    forwarder.forward([Publication("a", "1")])
    redis_client.script_flush()  # what a restart without persistence does
    offsets = forwarder.forward([Publication("a", "2")])
    assert len(offsets) == 1
    assert [e[1][b"d"] for e in redis_client.xrange("tidings:history:a")] == [b"1", b"2"]


def test_a_fenced_forward_leaves_the_connection_usable(
    redis_client: redis.Redis, forwarder: Forwarder
) -> None:
    lease = Lease(redis_client, 5000, since_ms=0)
    assert lease.acquire()
    redis_client.set(LEASE_KEY, "someone else")
    with pytest.raises(Fenced):
        forwarder.forward([Publication("a", "1")], lease_token=lease.token)
    redis_client.set(LEASE_KEY, lease.token)
    assert len(forwarder.forward([Publication("a", "2")], lease_token=lease.token)) == 1


def test_a_connection_broken_while_idle_is_replaced_without_losing_the_batch(
    redis_client: redis.Redis, forwarder: Forwarder
) -> None:
    forwarder.forward([Publication("a", "1")])
    # What the Sentinel watcher does to the connections of a demoted master,
    # and what a Redis restart does to an idle one.
    for entry in redis_client.client_list():
        if entry["name"] == "" and entry["id"] != str(redis_client.client_id()):
            redis_client.client_kill_filter(_id=entry["id"])
    assert len(forwarder.forward([Publication("a", "2")])) == 1
    assert [e[1][b"d"] for e in redis_client.xrange("tidings:history:a")] == [b"1", b"2"]


class _LostReply:
    """A connection whose command goes out but whose reply never comes back."""

    def __init__(self) -> None:
        self.sent = 0
        self.disconnected = False

    def connect(self) -> None:
        pass

    def can_read(self, timeout: float = 0) -> bool:
        return False

    def pack_command(self, *args: object) -> list[bytes]:
        return [b"packed"]

    def send_packed_command(self, packed: object) -> None:
        self.sent += 1

    def read_response(self) -> object:
        raise redis.ConnectionError("connection reset while reading")

    def disconnect(self) -> None:
        self.disconnected = True


def test_a_reply_lost_after_the_send_is_never_sent_again(forwarder: Forwarder) -> None:
    # The script may have run: sending it again could forward the batch twice.
    lost = _LostReply()
    forwarder._connection = lost  # type: ignore[assignment]
    with pytest.raises(redis.ConnectionError):
        forwarder.forward([Publication("a", "1")])
    assert lost.sent == 1 and lost.disconnected
