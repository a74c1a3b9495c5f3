"""Exactly one listener, however many Celery and gunicorn workers run.

Three `celery -A tasks worker` (4 processes each) and gunicorn with 4 gevent
workers: one Redis connection subscribes to `tidings:topic:*`, and 20
websocket clients spread over the 4 web workers each receive each of 1000
durable publications exactly once (counted raw, before the client's
de-duplication) and in publish order.
"""

from __future__ import annotations

import itertools
import json
import socket
from collections import Counter
from collections.abc import Callable

import pytest

from tests.support import (
    RecordingClient,
    Stack,
    children_of,
    named,
    pid_of,
    topic_listeners,
    wait_for,
)
from tidings.history import parse_offset
from tidings.lease import current_holder

pytestmark = pytest.mark.integration

TOPIC = "public.singleton"
CLIENTS = 20
PUBLICATIONS = 1000
WEB_WORKERS = 4
CELERY_WORKERS = 3


def test_one_listener_and_exactly_once_delivery(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(WEB_CONCURRENCY=str(WEB_WORKERS))
    workers = [stack.start_worker(concurrency=4) for _ in range(CELERY_WORKERS)]
    stack.start_web()
    stack.wait_ready(timeout=60)
    # /readyz answers from one worker: wait until all of them hear the queue.
    wait_for(lambda: stack.redis().publish("tidings:socketio", "{}") == WEB_WORKERS, timeout=60)
    host = socket.gethostname().replace(" ", "_")

    # Every supervisor dispatched a listener at start; all but one found the
    # lease held. Wait until the losers are gone, then check there is one.
    wait_for(lambda: len(topic_listeners(stack)) == 1, timeout=15)
    holder = current_holder(stack.redis())
    assert holder is not None
    [listener] = topic_listeners(stack)
    assert pid_of(listener) == holder.pid, (listener, holder)
    assert listener["name"] == f"tidings:listener:{host}:{holder.pid}"
    # Whoever else pattern-subscribes (Celery's own connections), only one
    # receiver gets a topic channel.
    assert stack.redis().publish("tidings:topic:singleton-probe", "1") == 1

    clients = [RecordingClient(stack.url) for _ in range(CLIENTS)]
    try:
        for client in clients:
            client.connect()
            ack = client.subscribe(TOPIC)
            assert ack["ok"], ack

        # Connection names: one web name per gunicorn worker (each a child of
        # the master), one supervisor per Celery main process.
        web_workers = children_of(stack.web.pid)
        assert len(web_workers) == WEB_WORKERS, web_workers
        web_names = named(stack, "web")
        assert {pid_of(c) for c in web_names} == web_workers, web_names
        assert all(c["name"] == f"tidings:web:{host}:{pid_of(c)}" for c in web_names)
        # Each web worker's queue connection is subscribed to tidings:socketio.
        queue_subscribers = {pid_of(c) for c in web_names if int(c.get("sub", 0)) > 0}
        assert queue_subscribers == web_workers
        supervisors = named(stack, "supervisor")
        assert {pid_of(c) for c in supervisors} == {w.pid for w in workers}, supervisors
        assert all(c["name"] == f"tidings:supervisor:{host}:{pid_of(c)}" for c in supervisors)

        # Publish in bursts while checking, in between, that still only one
        # listener is subscribed.
        for start in range(0, PUBLICATIONS, 100):
            stack.publish_many([(TOPIC, {"n": n}) for n in range(start, start + 100)])
            assert len(topic_listeners(stack)) == 1

        def all_delivered() -> bool:
            return all(len(c.delivered) >= PUBLICATIONS for c in clients)

        wait_for(all_delivered, timeout=30)
        # Anything late (a duplicate) would arrive right behind the rest:
        # give it a moment by waiting on a final marker publication.
        stack.publish(TOPIC, {"n": "end"})
        wait_for(
            lambda: all(c.delivered and c.delivered[-1]["data"] == {"n": "end"} for c in clients),
            10,
        )

        expected = [{"n": n} for n in range(PUBLICATIONS)] + [{"n": "end"}]
        for index, client in enumerate(clients):
            raw_offsets = Counter(p["offset"] for p in client.raw_pubs())
            repeated = {o: k for o, k in raw_offsets.items() if k > 1}
            assert not repeated, f"client {index} received offsets more than once: {repeated}"
            assert len(client.raw_pubs()) == PUBLICATIONS + 1, (index, len(client.raw_pubs()))
            assert [p["data"] for p in client.raw_pubs()] == expected, (
                f"client {index}: order or loss"
            )
            pairs = [parse_offset(p["offset"]) for p in client.raw_pubs()]
            assert all(a < b for a, b in itertools.pairwise(pairs)), index
            assert [p["data"] for p in client.delivered] == expected

        # History (capped at TIDINGS_HISTORY_SIZE, 1000) holds each
        # publication once: the latest 1000, in order.
        history = stack.redis().xrange(f"tidings:history:{TOPIC}")
        kept = stack.settings.history_size
        assert [json.loads(f[b"d"]) for _, f in history] == expected[-kept:]
        assert len(topic_listeners(stack)) == 1
        assert current_holder(stack.redis()).pid == holder.pid
        counts = Counter(pid_of(c) for c in web_names)
        print(f"\nweb workers and their connections: {dict(counts)}; listener pid {holder.pid}")
    finally:
        for client in clients:
            client.disconnect()
