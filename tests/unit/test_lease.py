import redis

from tidings.lease import Lease, current_holder


def test_one_holder_renewal_and_release(redis_client: redis.Redis) -> None:
    first = Lease(redis_client, 2000, since_ms=123)
    second = Lease(redis_client, 2000, since_ms=456)
    assert first.acquire()
    assert not second.acquire()
    assert first.renew() and not second.renew()
    assert not second.release()
    holder = current_holder(redis_client)
    assert holder is not None and holder.since_ms == 123 and 0 < holder.ttl_ms <= 2000
    assert first.release()
    assert current_holder(redis_client) is None
    assert second.acquire()
    assert not first.renew()


def test_lease_expires_when_not_renewed(redis_client: redis.Redis) -> None:
    lease = Lease(redis_client, 1000, since_ms=0)
    assert lease.acquire()
    redis_client.pexpire("tidings:listener", 1)
    other = Lease(redis_client, 1000, since_ms=0)

    def taken() -> bool:
        return other.acquire()

    from tests.support import wait_for

    wait_for(taken, timeout=2)
    assert not lease.renew()
