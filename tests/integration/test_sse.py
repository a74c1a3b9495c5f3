"""GET /sse with curl, through nginx, against a real stack: events, resume, limits, bad input."""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests

from tests.support import Nginx, Stack, nginx_binary, wait_for
from tidings.keys import queue_channel
from webapp.grants import make_token

pytestmark = pytest.mark.integration

SECRET = "an-sse-test-secret-of-32-bytes-or-more"
API_KEY = "sse-key"


class Curl:
    """`curl -sN` on a stream, its output parsed into SSE events as it comes."""

    def __init__(self, url: str, *headers: str) -> None:
        args = ["curl", "-sN", "--max-time", "60"]
        for header in headers:
            args += ["-H", header]
        self.proc = subprocess.Popen([*args, url], stdout=subprocess.PIPE)
        self.lines: list[str] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            with self._lock:
                self.lines.append(raw.decode().rstrip("\n"))

    def events(self) -> list[dict[str, str]]:
        """Every complete event (lines up to a blank one) as its fields; comments as `comment`."""
        with self._lock:
            lines = list(self.lines)
        events, current = [], {}
        for line in lines:
            if not line:
                if current:
                    events.append(current)
                current = {}
            elif line.startswith(":"):
                events.append({"comment": line[1:].strip()})
            else:
                field, _, value = line.partition(": ")
                current[field] = value
        return events

    def named(self, name: str) -> list[dict[str, str]]:
        return [e for e in self.events() if e.get("event") == name]

    def publications(self) -> list[dict]:
        return [json.loads(e["data"]) for e in self.named("publication")]

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


@pytest.fixture
def sse_stack(make_stack: Callable[..., Stack]) -> Stack:
    stack = make_stack(
        TIDINGS_SECRET=SECRET,
        TIDINGS_API_KEY=API_KEY,
        TIDINGS_SSE_KEEPALIVE="1",
        TIDINGS_HISTORY_SIZE="20",
        TIDINGS_PRESENCE_TOPICS="public.sse.presence.*",
    )
    stack.start_worker()
    stack.start_web()
    stack.wait_ready()
    return stack


def test_a_stream_carries_its_topics_and_resumes_from_last_event_id(sse_stack: Stack) -> None:
    url = sse_stack.url + "/sse?topic=public.sse.a&topic=public.sse.b"
    # Forwarded before the stream opens (the listener writes history
    # asynchronously): the stream starts after it.
    sse_stack.publish_many([("public.sse.a", {"n": 0})], wait=True)
    head = requests.get(url, stream=True, timeout=5)
    assert head.status_code == 200
    assert head.headers["Content-Type"].startswith("text/event-stream")
    assert head.headers["Cache-Control"] == "no-cache"
    assert head.headers["X-Accel-Buffering"] == "no"
    head.close()

    first = Curl(url)
    try:
        (opened,) = wait_for(lambda: first.named("subscribed"), timeout=10)
        offsets = json.loads(opened["data"])["topics"]
        assert offsets["public.sse.b"] is None and offsets["public.sse.a"] is not None
        # The worker hears the topics' queue channels while the stream is open.
        r = sse_stack.redis()
        assert r.pubsub_numsub(queue_channel("public.sse.a"))[0][1] == 1
        sse_stack.publish_many([("public.sse.a", {"n": 1}), ("public.sse.b", "b")])
        wait_for(lambda: len(first.publications()) == 2, timeout=10)
        assert first.publications()[0]["data"] == {"n": 1}  # not the one before it opened
        assert {"comment": "keep-alive"} in wait_for(
            lambda: [e for e in first.events() if e.get("comment") == "keep-alive"], timeout=5
        )
        resume_from = first.named("publication")[-1]["id"]
    finally:
        first.close()
    sse_stack.publish_many([("public.sse.a", {"n": 2}), ("public.sse.b", "c")])
    again = Curl(url, f"Last-Event-ID: {resume_from}")
    try:
        (recovered,) = wait_for(lambda: again.named("recovered"), timeout=10)
        assert json.loads(recovered["data"]) == {
            "recovered": True,
            "topics": {"public.sse.a": True, "public.sse.b": True},
        }
        wait_for(lambda: len(again.publications()) == 2, timeout=10)
        assert [p["data"] for p in again.publications()] == [{"n": 2}, "c"]
        # Ids move on with every event; the last one resumes every topic again.
        ids = [e["id"] for e in again.named("publication")]
        assert len(set(ids)) == 2 and ids[-1] != resume_from
    finally:
        again.close()
    # Away longer than history keeps: the gap is said, per topic.
    # Forwarded before the stream resumes: the listener writes history
    # asynchronously, and a resume that beats it finds no gap yet.
    sse_stack.publish_many([("public.sse.a", {"n": n}) for n in range(3, 40)], wait=True)
    gap = Curl(url, f"Last-Event-ID: {ids[-1]}")
    try:
        (recovered,) = wait_for(lambda: gap.named("recovered"), timeout=10)
        assert json.loads(recovered["data"]) == {
            "recovered": False,
            "topics": {"public.sse.a": False, "public.sse.b": True},
        }
    finally:
        gap.close()


@pytest.mark.parametrize(
    ("query", "headers", "status", "error"),
    [
        ("", {}, 400, "no_topic"),
        ("?topic=not%20a%20topic", {}, 400, "invalid_topic"),
        ("?" + "&".join(f"topic=public.sse.t{n}" for n in range(40)), {}, 400, "too_many_topics"),
        ("?topic=public.sse.a&x=" + "y" * 5000, {}, 414, "query_too_long"),
        ("?topic=public.sse.a", {"Last-Event-ID": "garbage"}, 400, "bad_last_event_id"),
        ("?topic=public.sse.a", {"Last-Event-ID": "1:1.1,2.2"}, 400, "bad_last_event_id"),
        ("?topic=private.x", {}, 403, "forbidden"),
        ("?topic=private.x&token=forged", {}, 401, "invalid_token"),
        ("?topic=private.x", {"Authorization": "Bearer forged"}, 401, "invalid_token"),
    ],
)
def test_bad_requests_get_a_named_4xx_and_change_nothing(
    sse_stack: Stack, query: str, headers: dict, status: int, error: str
) -> None:
    answer = requests.get(sse_stack.url + "/sse" + query, headers=headers, timeout=5)
    assert (answer.status_code, answer.json()["error"]) == (status, error)
    # Nothing held: no stream, no connection counted, and streams still work.
    token = make_token(SECRET, "alice", ["private.*"], 60)
    good = Curl(sse_stack.url + f"/sse?topic=private.x&token={token}")
    try:
        wait_for(lambda: good.named("subscribed"), timeout=10)
        sse_stack.publish("private.x", 1)
        wait_for(lambda: good.publications(), timeout=10)
    finally:
        good.close()


def test_a_stream_that_stops_reading_is_cut(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(TIDINGS_CLIENT_QUEUE_BYTES="65536", TIDINGS_CLIENT_QUEUE_PACKETS="50")
    stack.start_worker()
    stack.start_web()
    stack.wait_ready()
    port = int(stack.url.rsplit(":", 1)[1])
    stalled = socket.socket()
    # A receive buffer that fills at once; set before connecting.
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(("127.0.0.1", port))
    stalled.sendall(b"GET /sse?topic=public.sse.flood HTTP/1.1\r\nHost: x\r\n\r\n")
    reader = Curl(stack.url + "/sse?topic=public.sse.flood")
    try:
        wait_for(lambda: reader.named("subscribed"), timeout=10)
        pad = "x" * 20_000
        for batch in range(10):
            stack.publish_many([("public.sse.flood", {"n": batch, "pad": pad})] * 20)
        wait_for(lambda: "slow client cut" in stack.web.log(), timeout=20)
        # The reading client is not the one cut: it gets everything.
        wait_for(lambda: len(reader.publications()) == 200, timeout=20)
        # What the kernel held stays unread: the cut ends in a reset, not in
        # a FIN behind it that the client would notice only on reading it all.
        line = next(x for x in stack.web.log().splitlines() if "slow client cut" in x)
        assert int(line.rsplit(", ", 1)[1].split()[0]) > 0  # bytes more in the kernel
        wait_for(lambda: "after the cut; reset" in stack.web.log(), timeout=10)
        stalled.settimeout(10)
        with pytest.raises(ConnectionResetError):
            while stalled.recv(65536):
                pass
    finally:
        reader.close()
        stalled.close()


def test_streams_pass_the_shipped_nginx_unbuffered(sse_stack: Stack, tmp_path: Path) -> None:
    nginx_binary()
    proxy = Nginx(tmp_path / "nginx", [int(sse_stack.url.rsplit(":", 1)[1])])
    proxy.start()
    stream = Curl(proxy.url + "/sse?topic=public.sse.proxied")
    try:
        wait_for(lambda: stream.named("subscribed"), timeout=10)
        started = time.monotonic()
        sse_stack.publish("public.sse.proxied", {"n": 1})
        wait_for(lambda: stream.publications(), timeout=5)
        # Not held in a proxy buffer until it fills: here within a second.
        assert time.monotonic() - started < 1.0
    finally:
        stream.close()
        proxy.stop()


def test_presence_counts_streams_and_the_server_api_closes_them(sse_stack: Stack) -> None:
    topic = "public.sse.presence.room"
    token = make_token(SECRET, "bob", [], 60)
    stream = Curl(sse_stack.url + f"/sse?topic={topic}", f"Authorization: Bearer {token}")
    auth = {"Authorization": f"Bearer {API_KEY}"}
    try:
        wait_for(lambda: stream.named("subscribed"), timeout=10)

        def present() -> dict:
            answer = requests.get(sse_stack.url + f"/api/presence/{topic}", headers=auth, timeout=5)
            return answer.json() if answer.status_code == 200 else {}

        found = wait_for(lambda: present().get("clients") == 1 and present(), timeout=5)
        assert found["users"] == [{"sub": "bob", "clients": 1}]
        closed = requests.post(
            sse_stack.url + "/api/disconnect", json={"sub": "bob"}, headers=auth, timeout=5
        )
        assert closed.status_code == 200 and closed.json()["disconnected"] == 1
        wait_for(lambda: stream.proc.poll() is not None, timeout=2)  # the response ended
        wait_for(lambda: present().get("clients") == 0, timeout=5)
    finally:
        stream.close()


def test_a_head_request_leaves_no_stream_open(sse_stack: Stack) -> None:
    topic = "public.sse.presence.head"
    url = sse_stack.url + f"/sse?topic={topic}"
    auth = {"Authorization": f"Bearer {API_KEY}"}

    def clients() -> int | None:
        answer = requests.get(sse_stack.url + f"/api/presence/{topic}", headers=auth, timeout=5)
        return answer.json().get("clients") if answer.status_code == 200 else None

    head = requests.head(url, timeout=5)
    assert head.status_code == 200
    assert head.headers["Content-Type"].startswith("text/event-stream")
    stream = Curl(url)
    try:
        wait_for(lambda: stream.named("subscribed"), timeout=10)
        # The stream alone: the HEAD request's body never ran, and its
        # stream was forgotten when the response closed.
        wait_for(lambda: clients() == 1, timeout=5)
    finally:
        stream.close()
    wait_for(lambda: clients() == 0, timeout=5)
