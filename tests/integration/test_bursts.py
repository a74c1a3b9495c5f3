"""Bursts on the fast path: 100,000 pipelined PUBLISHes while nothing fails lose nothing.

"At most once" means lost when no listener runs, not lost while one runs.
Before the listener read its pub/sub socket itself, a burst like these lost
thousands of publications (up to all of them) and the listener logged a
Redis outage that never happened (issue 12). One stack serves the four
shapes: one topic and 1,000 topics, one client and 100.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from tests.support import CountingReader, RedisServer, Stack, wait_for
from tidings.keys import topic_channel

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BURST = 100_000
TOPICS = 1000


@pytest.fixture(scope="module")
def burst_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    directory = tmp_path_factory.mktemp("bursts")
    server = RedisServer(directory / "redis")
    server.start()
    stack = Stack(
        server,
        directory,
        TIDINGS_MAX_SUBSCRIPTIONS=str(TOPICS),
        TIDINGS_SUBSCRIBE_RATE="100000",
        TIDINGS_MAX_CONNECTIONS_PER_IP="1000",
        # A client reading 100 batches of 1,000 at once is not a slow one.
        TIDINGS_CLIENT_QUEUE_BYTES=str(64 * 1024 * 1024),
    )
    stack.start_worker()
    stack.start_web()
    stack.wait_ready()
    yield stack
    stack.stop()
    server.stop()


def burst(stack: Stack, topic_of: Callable[[int], str]) -> None:
    """PUBLISH BURST publications as one pipelined stream, 10,000 per round trip."""
    client = stack.redis()
    for start in range(0, BURST, 10_000):
        pipe = client.pipeline(transaction=False)
        for n in range(start, start + 10_000):
            pipe.publish(topic_channel(topic_of(n)), b'{"n":%d}' % n)
        pipe.execute()


def outages_logged(stack: Stack) -> list[str]:
    logs = [stack.web.log() if stack.web else "", *(w.log() for w in stack.workers)]
    return [line for log in logs for line in log.splitlines() if "unavailable" in line]


@pytest.mark.parametrize(
    ("topics", "clients"),
    [(1, 1), (1, 100), (TOPICS, 1), (TOPICS, 100)],
    ids=["one-topic-1-client", "one-topic-100-clients", "1000-topics-1-client", "1000-topics-100"],
)
def test_a_burst_loses_nothing_while_nothing_fails(
    burst_stack: Stack, topics: int, clients: int
) -> None:
    names = [f"public.burst.{topics}.{clients}.{k}" for k in range(topics)]
    # Each topic has one subscriber when there are many topics: 100,000
    # deliveries either way but on one topic to 100 clients (10 million).
    plan = [names] * clients if topics == 1 else [names[k::clients] for k in range(clients)]
    port = int(burst_stack.url.rsplit(":", 1)[1])
    readers = [CountingReader(port, subscribed) for subscribed in plan]
    try:
        started = time.monotonic()
        burst(burst_stack, lambda n: names[n % topics])
        expected = [BURST * len(subscribed) // topics for subscribed in plan]

        def all_arrived() -> bool:
            return all(r.total() >= e for r, e in zip(readers, expected, strict=True))

        wait_for(all_arrived, timeout=120, interval=0.2)
        seconds = time.monotonic() - started
        time.sleep(0.5)  # anything sent twice would have arrived by now
        assert [r.total() for r in readers] == expected
        assert sum(r.out_of_order for r in readers) == 0
        assert outages_logged(burst_stack) == []
        print(
            f"\n[burst] {BURST} fast publications on {topics} topic(s) to {clients} client(s):"
            f" {sum(expected)} deliveries in {seconds:.1f}s, none lost or twice"
        )
    finally:
        for reader in readers:
            reader.close()
