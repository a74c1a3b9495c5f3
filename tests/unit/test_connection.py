"""tidings.connection: named clients, and Sentinel URLs (the failover itself: test_sentinel.py)."""

from __future__ import annotations

import gc

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, SentinelConnectionPool

from tests.support import free_port
from tidings.connection import _EpochSentinel, connect, follow_master


def test_plain_url_gives_a_named_client_that_is_not_watched(redis_server) -> None:
    client = connect(redis_server.url(0), "web")
    try:
        assert client.client_getname().startswith("tidings:web:")
        assert follow_master(client) is False
    finally:
        client.close()


def test_sentinel_url_gives_a_master_client_with_the_same_options() -> None:
    port = free_port()  # nothing listens: only the client's configuration is checked
    url = f"redis+sentinel://:pw@127.0.0.1:{port}/3/tidings-main"
    client = connect(url, "listener", retry=Retry(NoBackoff(), 0))
    try:
        pool = client.connection_pool
        assert isinstance(pool, SentinelConnectionPool) and pool.is_master
        assert pool.service_name == "tidings-main"
        options = pool.connection_kwargs
        assert options["client_name"].startswith("tidings:listener:")
        assert (options["db"], options["password"]) == (3, "pw")
        assert options["socket_timeout"] == options["socket_connect_timeout"] == 5.0
        with pytest.raises(MasterNotFoundError):
            client.ping()
    finally:
        client.close()
        del client, pool
        gc.collect()  # the watcher thread ends once no watched client is left


class FakeSentinel:
    def __init__(self, answer: dict | Exception) -> None:
        self.answer = answer

    def sentinel_masters(self) -> dict:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer


def state(port: int, epoch: int, **flags: bool) -> dict:
    return {
        "m": {
            "ip": "10.0.0.1",
            "port": port,
            "config-epoch": epoch,
            "is_master": True,
            "is_sdown": flags.get("sdown", False),
            "is_odown": False,
            "num-other-sentinels": 2,
        }
    }


def test_the_newest_configuration_wins_over_a_sentinel_that_lags() -> None:
    manager = _EpochSentinel([])
    manager.sentinels = [
        FakeSentinel(state(6379, 1)),  # has not heard of the failover yet
        FakeSentinel(redis.ConnectionError("down")),
        FakeSentinel(state(6380, 2)),
        FakeSentinel(state(6381, 3, sdown=True)),  # a master it sees down is no answer
    ]
    assert manager.discover_master("m") == ("10.0.0.1", 6380)
    manager.sentinels = [FakeSentinel(redis.ConnectionError("down"))]
    with pytest.raises(MasterNotFoundError, match="No master found"):
        manager.discover_master("m")


def test_a_busy_process_waits_for_a_connection_instead_of_failing(redis_server) -> None:
    import threading

    from tidings.connection import connect

    client = connect(redis_server.url(0), "test", max_connections=2)
    results: list[object] = []

    def slow_call() -> None:
        results.append(client.blpop(["tidings:test:nothing"], timeout=0.3))

    threads = [threading.Thread(target=slow_call) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [None] * 6  # all six waited their turn; none got "Too many connections"
