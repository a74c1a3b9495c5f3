"""The whole path with real processes: Redis -> Celery listener -> gunicorn -> clients."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import requests

from tests.support import ROOT, Stack, wait_for
from tidings.client import TidingsClient
from tidings.history import parse_offset
from tidings.keys import history_key

pytestmark = pytest.mark.integration

API_KEY = "integration-key"


class Recorder:
    """A TidingsClient and everything it was handed, raw and de-duplicated."""

    def __init__(self, stack: Stack, transport: str) -> None:
        self.delivered: list[dict[str, Any]] = []
        self.client = TidingsClient(
            stack.url, on_publication=self.delivered.append, transports=[transport]
        )

    def data(self, topic: str) -> list[Any]:
        return [p["data"] for p in self.delivered if p["topic"] == topic]


@pytest.fixture
def api_stack(make_stack) -> Stack:
    running = make_stack(TIDINGS_API_KEY=API_KEY)
    running.start_worker()
    running.start_web()
    running.wait_ready()
    return running


@pytest.fixture
def recorders(api_stack: Stack) -> Iterator[list[Recorder]]:
    made = [Recorder(api_stack, "websocket"), Recorder(api_stack, "polling")]
    for recorder in made:
        recorder.client.connect()
    yield made
    for recorder in made:
        recorder.client.disconnect()


def assert_in_order(recorder: Recorder, topic: str) -> None:
    offsets = [parse_offset(p["offset"]) for p in recorder.delivered if p["topic"] == topic]
    assert offsets == sorted(set(offsets)), "offsets must be strictly increasing"


def test_every_publish_path_reaches_websocket_and_polling_clients_once_in_order(
    api_stack: Stack, recorders: list[Recorder]
) -> None:
    topic = "public.e2e"
    for recorder in recorders:
        assert recorder.client.subscribe(topic)["ok"]
    expected: list[Any] = []
    # 1. fast pub/sub, 2. durable ingest stream (the publish() helper)
    api_stack.publish_many([(topic, {"fast": i}) for i in range(50)], durable=False)
    expected += [{"fast": i} for i in range(50)]
    wait_for(lambda: all(len(r.data(topic)) == 50 for r in recorders), timeout=10)
    api_stack.publish_many([(topic, {"durable": i}) for i in range(50)])
    expected += [{"durable": i} for i in range(50)]
    # 3. HTTP, single and batch
    answer = requests.post(
        api_stack.url + "/api/publish",
        json={"topic": topic, "data": {"http": 0}},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=5,
    )
    assert answer.status_code == 202 and answer.json()["id"]
    batch = [{"topic": topic, "data": {"http": i}} for i in (1, 2)]
    answer = requests.post(
        api_stack.url + "/api/publish",
        json=batch,
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=5,
    )
    assert answer.status_code == 202 and len(answer.json()["ids"]) == 2
    expected += [{"http": i} for i in range(3)]
    wait_for(lambda: all(len(r.data(topic)) == 103 for r in recorders), timeout=10)
    # 4. the shell command
    subprocess.run(
        [sys.executable, "-m", "flask", "--app", "webapp", "publish", topic, '{"cli": 1}'],
        cwd=ROOT,
        env=api_stack.env,
        check=True,
        capture_output=True,
        timeout=60,
    )
    expected.append({"cli": 1})
    wait_for(lambda: all(len(r.data(topic)) == 104 for r in recorders), timeout=10)
    for recorder in recorders:
        assert recorder.data(topic) == expected
        assert_in_order(recorder, topic)


def test_bad_publications_are_dropped_and_their_neighbours_delivered(
    api_stack: Stack, recorders: list[Recorder]
) -> None:
    topic = "public.bad"
    recorder = recorders[0]
    recorder.client.subscribe(topic)
    client = api_stack.redis()
    client.publish(f"tidings:topic:{topic}", b'"before"')
    client.publish(f"tidings:topic:{topic}", b"\xff\xfe")
    client.publish(f"tidings:topic:{topic}", b"x" * 70_000)
    client.xadd("tidings:ingest", {"topic": "no good", "data": "1"})
    client.publish(f"tidings:topic:{topic}", b"after")
    wait_for(lambda: len(recorder.data(topic)) == 2, timeout=10)
    assert recorder.data(topic) == ["before", "after"]
    log = api_stack.workers[0].log()
    assert "invalid_utf8" in log and "too_large" in log and "invalid_topic" in log
    assert "Traceback" not in log


def test_a_client_that_reconnects_recovers_what_it_missed(api_stack: Stack) -> None:
    topic = "public.recover"
    recorder = Recorder(api_stack, "websocket")
    recorder.client.connect()
    recorder.client.subscribe(topic)
    api_stack.publish_many([(topic, i) for i in range(5)])
    wait_for(lambda: recorder.data(topic) == list(range(5)), timeout=10)
    since = recorder.client.last_offset(topic)
    recorder.client.disconnect()
    api_stack.publish_many([(topic, i) for i in range(5, 12)])
    # Missed while away: forwarded (in history) before the client comes back.
    wait_for(lambda: api_stack.redis().xlen(history_key(topic)) == 12, timeout=10)
    # A new connection, resuming from the offset the old one reached.
    again = Recorder(api_stack, "websocket")
    again.client.connect()
    ack = again.client.sio.call("subscribe", {"topic": topic, "since": since})
    assert ack["ok"] and ack["recovered"]
    assert [p["data"] for p in ack["publications"]] == list(range(5, 12))
    assert ack["offset"] == ack["publications"][-1]["offset"]
    again.client.disconnect()


def test_the_progress_demo_job_reports_to_the_browser_topic(
    api_stack: Stack, recorders: list[Recorder]
) -> None:
    answer = requests.post(api_stack.url + "/api/demo/progress", json={}, timeout=5)
    assert answer.status_code == 202
    topic = answer.json()["topic"]
    recorder = recorders[0]
    recorder.client.subscribe(topic)
    wait_for(lambda: any(d["done"] for d in recorder.data(topic)), timeout=20)
    percents = [d["percent"] for d in recorder.data(topic)]
    assert percents == sorted(percents) and percents[-1] == 100


def test_publish_with_wait_answers_with_the_offset_clients_receive(
    api_stack: Stack, recorders: list[Recorder]
) -> None:
    topic = "public.receipt"
    recorder = recorders[0]
    recorder.client.subscribe(topic)
    answer = requests.post(
        api_stack.url + "/api/publish?wait=1",
        json={"topic": topic, "data": "hello"},
        headers={"Authorization": f"Bearer {API_KEY}"},
        timeout=15,
    )
    assert answer.status_code == 200, answer.text
    offset = answer.json()["offset"]
    wait_for(lambda: recorder.delivered, timeout=10)
    assert recorder.delivered[-1] == {"topic": topic, "offset": offset, "data": "hello"}


def test_a_bad_token_is_refused_with_invalid_token(make_stack) -> None:
    import socketio

    stack = make_stack(TIDINGS_SECRET="x" * 32)
    stack.start_web()
    client = socketio.Client(reconnection=False)
    errors: list[Any] = []
    client.on("connect_error", errors.append)
    with pytest.raises(socketio.exceptions.ConnectionError):
        client.connect(stack.url, auth={"token": "not-a-jwt"}, transports=["websocket"])
    assert errors == [{"message": "invalid_token"}]
