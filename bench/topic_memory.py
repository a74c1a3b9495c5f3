"""What a web worker keeps per topic it ever served: RSS per fresh topic against recycled ones.

    .venv/bin/python -m bench.topic_memory [--topics 5000] [--rounds 4]

One web worker; one raw Socket.IO client that, again and again, subscribes a
topic, publishes one durable publication to it, receives it and unsubscribes.
Rounds alternate between 10 recycled topics and fresh ones (per-order or
per-session topics, as an application may use); the worker's RSS growth per
cycle is printed for each round. After its last client leaves, a topic should
cost the worker nothing; what a fresh topic still costs, round after round
(past the first 10,000, the size of the metrics' label cache), is kept for
good. The result goes to RESULTS.md's "Separate measurements" (--no-record:
printed only).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import psutil
import redis

from bench.load import INGEST_STREAM, PUBLICATIONS, RawClient
from bench.report import separate_result
from tests.support import RedisServer, Stack

# Past the metrics' per-topic label cache (tidings/metrics.py, 10,000 topics)
# before the fresh rounds that count.
WARM_FRESH = 10_000


def cycle(client: RawClient, data: redis.Redis, topic: str) -> None:
    """One topic's whole life in the worker: subscribed, published to once, left."""
    client.call("subscribe", topic)
    data.xadd(INGEST_STREAM, {"topic": topic, "data": '{"n":0}'})
    client.until(lambda frame: frame.startswith(PUBLICATIONS), "publication")
    client.call("unsubscribe", topic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topics", type=int, default=5000, help="cycles per round")
    parser.add_argument("--rounds", type=int, default=4, help="fresh rounds that count")
    parser.add_argument("--no-record", action="store_true", help="do not write RESULTS.md")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="tidings-topics-"))
    server = RedisServer(directory / "redis")
    server.start()
    # One connection subscribes thousands of times a second; history of a
    # topic nobody publishes to goes after a minute (Redis is not measured).
    stack = Stack(server, directory, TIDINGS_SUBSCRIBE_RATE="100000", TIDINGS_HISTORY_TTL="60")
    fresh_per_cycle: list[float] = []
    recycled_per_cycle: list[float] = []
    try:
        stack.start_worker()
        stack.start_web()
        stack.wait_ready()
        assert stack.web is not None
        [worker] = psutil.Process(stack.web.pid).children()
        client = RawClient(stack.url)
        serial = 0

        def round_of(fresh: bool, count: int) -> float:
            nonlocal serial
            before = worker.memory_info().rss
            for k in range(count):
                serial += 1
                topic = f"public.topics.{serial}" if fresh else f"public.topics.r{k % 10}"
                cycle(client, stack.redis(), topic)
            return (worker.memory_info().rss - before) / count

        round_of(False, args.topics)  # warm-up
        round_of(True, WARM_FRESH)
        for n in range(args.rounds):
            recycled_per_cycle.append(round_of(False, args.topics))
            fresh_per_cycle.append(round_of(True, args.topics))
            print(
                f"round {n + 1}: {recycled_per_cycle[-1]:.0f} B per recycled topic,"
                f" {fresh_per_cycle[-1]:.0f} B per fresh topic",
                flush=True,
            )
    finally:
        stack.stop()
        server.stop()
    result = (
        f"one web worker, {args.rounds} rounds of {args.topics:,} topics each subscribed,"
        f" published to once and left, after {WARM_FRESH:,} fresh ones: worker RSS growth per"
        f" fresh topic, median, **{statistics.median(fresh_per_cycle):.0f} B** (rounds"
        f" {[round(b) for b in fresh_per_cycle]}) vs {statistics.median(recycled_per_cycle):.0f} B"
        f" per cycle over 10 recycled topics"
    )
    separate_result("topic_memory", result, record=not args.no_record)


if __name__ == "__main__":
    main()
