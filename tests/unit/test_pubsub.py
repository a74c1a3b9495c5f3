"""The direct pub/sub connection: partial replies wait for their rest, silence is found out."""

from __future__ import annotations

from collections.abc import Iterator

import hiredis
import pytest
import redis
from hypothesis import given
from hypothesis import strategies as st

from tests.support import RedisServer, SlowPath, wait_for
from tidings import pubsub
from tidings.pubsub import PubSubConnection, RespReader, is_pong

REPLIES = st.recursive(
    st.one_of(
        st.binary(max_size=40),
        st.integers(min_value=-(2**62), max_value=2**62),
        st.none(),
    ),
    lambda inner: st.lists(inner, max_size=5),
    max_leaves=12,
)


def encode(reply: object) -> bytes:
    """RESP2 encoding of a reply, as Redis sends it."""
    if reply is None:
        return b"$-1\r\n"
    if isinstance(reply, bytes):
        return b"$%d\r\n%s\r\n" % (len(reply), reply)
    if isinstance(reply, int):
        return b":%d\r\n" % reply
    assert isinstance(reply, list)
    return b"*%d\r\n" % len(reply) + b"".join(encode(item) for item in reply)


@given(st.lists(REPLIES, min_size=1, max_size=5), st.integers(min_value=1, max_value=9))
def test_the_python_parser_reads_what_hiredis_reads_however_the_bytes_are_cut(
    replies: list, step: int
) -> None:
    wire = b"".join(encode(reply) for reply in replies)
    ours, theirs = RespReader(), hiredis.Reader()
    got: list = []
    expected: list = []
    for start in range(0, len(wire), step):
        for reader, out in ((ours, got), (theirs, expected)):
            reader.feed(wire[start : start + step])
            while (reply := reader.gets()) is not False:
                out.append(reply)
    assert got == expected == replies
    assert not ours.has_data()


def test_the_python_parser_returns_errors_and_simple_strings() -> None:
    reader = RespReader()
    reader.feed(b"+OK\r\n-NOPERM no permissions\r\n:3\r\n")
    assert reader.gets() == b"OK"
    error = reader.gets()
    assert isinstance(error, redis.ResponseError) and str(error) == "NOPERM no permissions"
    assert reader.gets() == 3
    assert reader.gets() is False
    reader.feed(b"?junk\r\n")
    with pytest.raises(redis.exceptions.InvalidResponse):
        reader.gets()


@pytest.fixture
def slow_path(redis_server: RedisServer) -> Iterator[SlowPath]:
    path = SlowPath(redis_server.port, piece=300, pause=0.01)
    yield path
    path.close()


@pytest.fixture(params=["hiredis", "python"])
def parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "python":
        monkeypatch.setattr(pubsub, "hiredis", None)
    return request.param


def test_a_reply_cut_in_pieces_waits_for_its_rest(
    parser: str, slow_path: SlowPath, redis_client: redis.Redis
) -> None:
    connection = PubSubConnection(redis.Redis.from_url(slow_path.url()))
    try:
        connection.subscribe(["c1", "c2"])
        replies: list = []
        wait_for(lambda: replies.extend(connection.read(0.05)) or len(replies) >= 2)
        assert [r[0] for r in replies] == [b"subscribe", b"subscribe"]
        payloads = [b"%d:" % n + b"x" * 1000 for n in range(30)]
        for data in payloads:
            redis_client.publish("c1", data)
        got: list = []
        # Every read returns at once with what is complete: a zero timeout
        # while a reply is half there is not an error.
        wait_for(lambda: got.extend(connection.read(0)) or len(got) >= len(payloads))
        assert [r[2] for r in got] == payloads
        assert all(r[:2] == [b"message", b"c1"] for r in got)
    finally:
        connection.close()


def test_a_silent_connection_is_pinged_then_given_up(
    parser: str, slow_path: SlowPath, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pubsub, "IDLE_PING_SECONDS", 0.2)
    monkeypatch.setattr(pubsub, "PING_REPLY_SECONDS", 0.3)
    connection = PubSubConnection(redis.Redis.from_url(slow_path.url()))
    try:
        connection.subscribe(["c1"])
        wait_for(lambda: connection.read(0.05))
        pongs: list = []
        # An idle but healthy connection: pinged, answered, kept.
        wait_for(lambda: pongs.extend(r for r in connection.read(0.05) if is_pong(r)) or pongs)
        slow_path.hold()  # now nothing comes back, the PING's answer included

        def gives_up() -> bool:
            try:
                connection.read(0.05)
            except redis.TimeoutError:
                return True
            return False

        wait_for(gives_up, timeout=5)
    finally:
        slow_path.release()
        connection.close()
