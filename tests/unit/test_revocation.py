"""Revocations in a real Redis: by user and issue time, by token id, and their expiry."""

from __future__ import annotations

import redis

from tidings import revocation


def test_a_user_revocation_refuses_older_tokens_only(redis_client: redis.Redis) -> None:
    revocation.store(redis_client, [("alice", 1000.0)], ttl=3600, now=1500)
    loaded = revocation.load(redis_client, ttl=3600, now=1500)
    assert loaded.refuses("alice", 999, None)
    assert loaded.refuses("alice", None, None)  # no iat: cannot prove it is newer
    assert not loaded.refuses("alice", 1000, None)
    assert not loaded.refuses("bob", 1, None)
    assert not loaded.refuses(None, None, None)
    # Revoking with an earlier time never weakens the revocation.
    revocation.store(redis_client, [("alice", 500.0)], ttl=3600, now=1500)
    assert revocation.load(redis_client, ttl=3600, now=1500).refuses("alice", 700, None)


def test_a_token_id_revocation_refuses_that_token_until_it_expires(
    redis_client: redis.Redis,
) -> None:
    revocation.store(redis_client, ["t-1"], ttl=60, now=1000)
    assert revocation.load(redis_client, ttl=60, now=1059).refuses("anyone", 2000, "t-1")
    assert not revocation.load(redis_client, ttl=60, now=1059).refuses("anyone", 2000, "t-2")
    assert not revocation.load(redis_client, ttl=60, now=1061).refuses("anyone", 2000, "t-1")


def test_every_revocation_moves_the_version_and_expired_entries_go(
    redis_client: redis.Redis,
) -> None:
    first = revocation.load(redis_client, ttl=60, now=1000).version
    revocation.store(redis_client, [("alice", 1000.0), "t-1"], ttl=60, now=1000)
    assert revocation.load(redis_client, ttl=60, now=1000).version != first
    # Stored much later: the old entries are past their TTL and removed.
    revocation.store(redis_client, [("bob", 5000.0)], ttl=60, now=5000)
    assert redis_client.zrange("tidings:revoked:subs", 0, -1) == [b"bob"]
    assert redis_client.zcard("tidings:revoked:jtis") == 0


def test_validators() -> None:
    assert revocation.valid_sub("alice") and not revocation.valid_sub("")
    assert not revocation.valid_sub("x" * (revocation.MAX_SUB_LENGTH + 1))
    assert not revocation.valid_sub(7)
    assert revocation.valid_before(10, ttl=60, now=100)
    for bad in (True, -1, float("nan"), float("inf"), "10", 161):
        assert not revocation.valid_before(bad, ttl=60, now=100)
