"""Listener failover: a killed, a stopped (SIGTERM) and a frozen lease holder.

Each scenario publishes durable publications at a steady rate while the
holder goes away, measures how long until a new holder forwards, and checks
that every client received every publication exactly once (counted raw,
before the client's de-duplication by offset) and in publish order.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import statistics
import time
from collections import Counter
from collections.abc import Callable

import pytest

from tests.support import (
    Proc,
    RecordingClient,
    Stack,
    SteadyPublisher,
    topic_listeners,
    wait_for,
)
from tidings.history import parse_offset
from tidings.lease import Holder, current_holder

pytestmark = pytest.mark.integration

RATE = 200  # durable publications per second
CLIENTS = 3
TAKEOVER_LIMIT = 5.0  # contract: a listener that dies is replaced within 5 s
HANDOVER_LIMIT = 2.0  # SIGTERM hands over "at once"
EXIT_LIMIT = 10.0


def parent_of(pid: int) -> int:
    """Return the parent pid (field 4 of /proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[1])


def holder_now(stack: Stack) -> Holder:
    """Wait for a lease holder and return it."""
    return wait_for(lambda: current_holder(stack.redis()), timeout=15)


def new_holder(stack: Stack, old_pid: int, timeout: float = 15) -> Holder:
    """Wait for a lease holder other than `old_pid` and return it."""

    def other() -> Holder | None:
        holder = current_holder(stack.redis())
        return holder if holder is not None and holder.pid != old_pid else None

    return wait_for(other, timeout=timeout)


def first_after(client: RecordingClient, topic: str, n: int) -> float | None:
    """Return the arrival time of the first raw publication of `topic` with data n > `n`."""
    for arrived, pub in client.raw_of(topic):
        if pub["data"]["n"] > n:
            return arrived
    return None


def delivery_problems(clients: list[RecordingClient], topic: str, total: int) -> list[str]:
    """Check every client got n = 0..total-1 exactly once, raw, in publish and offset order.

    Returns what is wrong (empty when all is well), so that a test can report
    its measurements before failing.
    """

    def complete() -> bool:
        return all(len(c.raw_of(topic)) >= total for c in clients)

    # Orphaned ingest entries are claimed after CLAIM_IDLE_MS (5 s): allow it.
    wait_for(complete, timeout=20)
    problems = []
    for index, client in enumerate(clients):
        timed = client.raw_of(topic)
        raw = [p for _, p in timed]
        counts = Counter(p["data"]["n"] for p in raw)
        missing = sorted(set(range(total)) - set(counts))
        twice = {n: k for n, k in counts.items() if k > 1}
        if missing:
            problems.append(f"{topic} client {index} lost {len(missing)}: {missing[:20]}")
        if twice:
            problems.append(f"{topic} client {index} received more than once: {twice}")
        offsets = [parse_offset(p["offset"]) for p in raw]
        if not all(a < b for a, b in itertools.pairwise(offsets)):
            problems.append(f"{topic} client {index}: offsets not increasing")
        order = [p["data"]["n"] for p in raw]
        if order != sorted(order):
            late = [
                (position, n, f"{timed[position][0] - timed[0][0]:.3f}s")
                for position, n in enumerate(order)
                if position and n < max(order[:position])
            ]
            problems.append(
                f"{topic} client {index}: out of publish order (position, n, arrival since"
                f" first): {late[:10]}"
            )
    return problems


def longest_gap(client: RecordingClient, topic: str, since: float) -> float:
    """Return the longest time between consecutive deliveries of `topic` after `since`."""
    times = [t for t, _ in client.raw_of(topic)]
    times = [since] + [t for t in times if t >= since]
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


def start(make_stack: Callable[..., Stack], workers: int = 2) -> Stack:
    # History long enough to hold every publication of a test, so that it
    # can be checked for exactly-once too.
    stack = make_stack(TIDINGS_HISTORY_SIZE="10000")
    for _ in range(workers):
        stack.start_worker(concurrency=2)
    stack.start_web()
    stack.wait_ready(timeout=30)
    wait_for(lambda: len(topic_listeners(stack)) == 1, timeout=15)
    return stack


def connect_clients(stack: Stack, topics: list[str]) -> list[RecordingClient]:
    clients = []
    for _ in range(CLIENTS):
        client = RecordingClient(stack.url)
        client.connect()
        for topic in topics:
            assert client.subscribe(topic)["ok"]
        clients.append(client)
    return clients


def worker_of(stack: Stack, pid: int) -> Proc:
    """Return the Celery worker whose pool process is `pid`."""
    parent = parent_of(pid)
    [worker] = [w for w in stack.workers if w.pid == parent]
    return worker


def history_problems(stack: Stack, topic: str, total: int) -> list[str]:
    """Check the topic's history stream holds n = 0..total-1 exactly once, in order."""
    history = stack.redis().xrange(f"tidings:history:{topic}")
    data = [json.loads(fields[b"d"])["n"] for _, fields in history]
    counts = Counter(data)
    twice = {n: k for n, k in counts.items() if k > 1}
    assert not twice, f"history of {topic} holds publications more than once: {twice}"
    assert sorted(data) == list(range(total)), f"history of {topic} misses publications"
    if data != list(range(total)):
        late = [(i, n) for i, n in enumerate(data) if i and n < max(data[:i])]
        return [f"history of {topic} out of publish order at (position, n): {late[:10]}"]
    return []


def pending_entries(stack: Stack) -> int:
    return stack.redis().xpending("tidings:ingest", "tidings")["pending"]


@pytest.mark.slow  # three rounds of a takeover of up to 5 s each: 20-30 s
def test_killed_holder_is_replaced_within_5s(make_stack: Callable[..., Stack]) -> None:
    stack = start(make_stack)
    rounds = 3
    topics = [f"public.failover.kill{r}" for r in range(rounds)]
    clients = connect_clients(stack, topics)
    takeovers: list[float] = []
    new_holders: list[float] = []
    problems: list[str] = []
    try:
        for topic in topics:
            old = holder_now(stack)
            old_worker = worker_of(stack, old.pid)
            publisher = SteadyPublisher(stack, topic, RATE)
            publisher.start()
            wait_for(lambda t=topic: all(c.raw_of(t) for c in clients), timeout=10)
            time.sleep(0.5)  # steady state: the holder is forwarding

            killed_at = time.monotonic()
            os.kill(old.pid, signal.SIGKILL)
            # Publications n > marker were all published after the kill:
            # only a new holder can forward them.
            marker = publisher.sent
            holder = new_holder(stack, old.pid)
            held_after = time.monotonic() - killed_at
            arrived = wait_for(lambda t=topic, m=marker: first_after(clients[0], t, m), 15)
            delivered_after = arrived - killed_at
            time.sleep(0.5)  # the new holder forwards under steady load
            total = publisher.halt()

            new_worker = worker_of(stack, holder.pid)
            print(
                f"\n[kill] {topic}: holder {old.pid} ({old_worker.name}) killed; new holder"
                f" {holder.pid} ({new_worker.name}) after {held_after:.3f}s; first delivery"
                f" of a post-kill publication after {delivered_after:.3f}s; {total} published"
            )
            takeovers.append(delivered_after)
            new_holders.append(held_after)
            problems += delivery_problems(clients, topic, total)
            problems += history_problems(stack, topic, total)
            wait_for(lambda: pending_entries(stack) == 0, timeout=10)
            assert len(topic_listeners(stack)) == 1
    finally:
        for client in clients:
            client.disconnect()
    if takeovers:
        print(
            f"\n[kill] takeover (kill -> first delivery by the new holder): "
            f"{', '.join(f'{t:.3f}s' for t in takeovers)};"
            f" median {statistics.median(takeovers):.3f}s"
            f"\n[kill] new lease holder after: {', '.join(f'{t:.3f}s' for t in new_holders)};"
            f" median {statistics.median(new_holders):.3f}s"
        )
    claims = [
        line for worker in stack.workers for line in worker.log().splitlines() if "claimed" in line
    ]
    print("[kill] orphan claims:\n  " + "\n  ".join(claims))
    assert all(t < TAKEOVER_LIMIT for t in new_holders), new_holders
    assert all(t < TAKEOVER_LIMIT for t in takeovers), takeovers
    assert not problems, "\n".join(problems)


def test_sigterm_worker_hands_over_and_exits(make_stack: Callable[..., Stack]) -> None:
    stack = start(make_stack)
    topic = "public.failover.term"
    clients = connect_clients(stack, [topic])
    try:
        old = holder_now(stack)
        worker = worker_of(stack, old.pid)
        publisher = SteadyPublisher(stack, topic, RATE)
        publisher.start()
        wait_for(lambda: all(c.raw_of(topic) for c in clients), timeout=10)
        time.sleep(0.5)

        signalled_at = time.monotonic()
        worker.signal(signal.SIGTERM)
        holder = new_holder(stack, old.pid)
        handover = time.monotonic() - signalled_at
        wait_for(lambda: not worker.alive(), timeout=30)
        exited_after = time.monotonic() - signalled_at
        time.sleep(0.5)
        total = publisher.halt()
        gap = longest_gap(clients[0], topic, signalled_at)

        print(
            f"\n[sigterm] {worker.name} (pid {worker.pid}, listener {old.pid}): new holder"
            f" {holder.pid} after {handover:.3f}s; longest delivery gap {gap:.3f}s;"
            f" worker exited after {exited_after:.3f}s (code {worker.popen.returncode});"
            f" {total} published"
        )
        problems = delivery_problems(clients, topic, total)
        problems += history_problems(stack, topic, total)
        wait_for(lambda: pending_entries(stack) == 0, timeout=10)
        assert handover < HANDOVER_LIMIT, f"handover took {handover:.3f}s"
        assert exited_after < EXIT_LIMIT, f"worker exit took {exited_after:.3f}s"
        assert worker.popen.returncode == 0
        assert f"listener pid={old.pid}] tidings.listener: released the listener lease" in (
            worker.log()
        )
        assert parent_of(holder.pid) != worker.pid
        assert not problems, "\n".join(problems)
    finally:
        for client in clients:
            client.disconnect()


def test_stale_holder_is_fenced(make_stack: Callable[..., Stack]) -> None:
    stack = start(make_stack)
    topic = "public.failover.stale"
    fast_topic = "public.failover.stale-fast"
    clients = connect_clients(stack, [topic, fast_topic])
    old = holder_now(stack)
    stopped = False
    try:
        publisher = SteadyPublisher(stack, topic, RATE)
        publisher.start()
        wait_for(lambda: all(c.raw_of(topic) for c in clients), timeout=10)
        time.sleep(0.5)

        os.kill(old.pid, signal.SIGSTOP)
        stopped = True
        stopped_at = time.monotonic()
        holder = new_holder(stack, old.pid)
        takeover = time.monotonic() - stopped_at
        # The frozen holder is still pattern-subscribed: fast publications
        # now reach both; the frozen one reads them when it resumes.
        wait_for(lambda: len(topic_listeners(stack)) == 2, timeout=10)
        fast = 50
        for n in range(fast):
            receivers = stack.publish(fast_topic, {"n": n}, durable=False)
            assert receivers == 2
        time.sleep(1)  # more durable publications under the new holder

        os.kill(old.pid, signal.SIGCONT)
        stopped = False
        resumed_at = time.monotonic()
        # The stale listener notices and lets go of its subscription.
        wait_for(lambda: len(topic_listeners(stack)) == 1, timeout=10)
        gone_after = time.monotonic() - resumed_at
        [listener] = topic_listeners(stack)
        assert listener["name"].endswith(f":{holder.pid}")
        time.sleep(1)
        total = publisher.halt()

        assert current_holder(stack.redis()).pid == holder.pid
        problems = delivery_problems(clients, topic, total)
        problems += delivery_problems(clients, fast_topic, fast)
        problems += history_problems(stack, topic, total)
        problems += history_problems(stack, fast_topic, fast)
        wait_for(lambda: pending_entries(stack) == 0, timeout=10)

        lines = [
            line
            for worker in stack.workers
            for line in worker.log().splitlines()
            if f"pid={old.pid}]" in line
        ]
        print(
            f"\n[stale] holder {old.pid} frozen; new holder {holder.pid} after {takeover:.3f}s;"
            f" stale listener unsubscribed {gone_after:.3f}s after SIGCONT; {total} durable"
            f" + {fast} fast published\n[stale] old holder's log:\n  " + "\n  ".join(lines[-6:])
        )
        assert any("lost the listener lease" in line or "fenced" in line for line in lines), (
            "the stale listener's log says nothing about losing the lease"
        )
        assert not problems, "\n".join(problems)
    finally:
        if stopped:
            os.kill(old.pid, signal.SIGCONT)
        for client in clients:
            client.disconnect()
