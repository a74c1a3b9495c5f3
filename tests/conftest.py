"""Fixtures built from real parts: Redis servers, gunicorn and Celery subprocesses."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests.support import IN_CI, RedisServer, Stack
from tidings.settings import Settings


@pytest.fixture(autouse=True)
def _tidings_logs_reach_caplog() -> Iterator[None]:
    """Undo, for each test, what an earlier test's create_app() did to the `tidings` logger.

    `tidings.logs.configure` stops it propagating (it prints its own lines)
    and sets its level; caplog listens at the root, so without this a test's
    log assertions would depend on the tests that ran before it.
    """
    logger = logging.getLogger("tidings")
    propagate, level = logger.propagate, logger.level
    logger.propagate = True
    logger.setLevel(logging.NOTSET)
    yield
    logger.propagate = propagate
    logger.setLevel(level)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One Redis server for the unit tests of the session."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client of an emptied database 0."""
    client = redis_server.client()
    client.flushall()
    yield client
    client.flushall()
    client.close()


@pytest.fixture
def settings(redis_server: RedisServer) -> Settings:
    """Settings pointing at the session's Redis server."""
    return Settings.from_env({"TIDINGS_REDIS_URL": redis_server.url(0)})


@pytest.fixture
def make_stack(tmp_path: Path) -> Iterator[Callable[..., Stack]]:
    """Build stacks on fresh Redis servers; everything is torn down after the test."""
    made: list[tuple[Stack, RedisServer]] = []

    def make(*, appendonly: bool = False, **env: str) -> Stack:
        server = RedisServer(tmp_path / f"redis{len(made)}", appendonly=appendonly)
        server.start()
        stack = Stack(server, tmp_path, **env)
        made.append((stack, server))
        return stack

    yield make
    for stack, server in made:
        stack.stop()
        server.stop()


@pytest.fixture
def stack(make_stack: Callable[..., Stack]) -> Stack:
    """One gunicorn worker and one Celery worker, ready (listener running)."""
    running = make_stack()
    running.start_worker()
    running.start_web()
    running.wait_ready()
    return running


@pytest.fixture
def node() -> None:
    """Node.js and npm, which the benchmarks' clients (bench/peers/) need; skip without."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        if IN_CI:
            pytest.fail("the benchmarks' clients (bench/peers/) need node and npm")
        pytest.skip("no node/npm: the benchmarks' clients (bench/peers/) need them")
