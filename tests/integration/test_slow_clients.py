"""A client that stops reading is cut at its queue bound; everyone else is unaffected."""

from __future__ import annotations

import json
import socket
from typing import Any

import psutil
import pytest
import websocket

from tests.support import Stack, wait_for
from tidings.client import TidingsClient

pytestmark = pytest.mark.integration

QUEUE_BYTES = 512 * 1024


def stalled_client(stack: Stack, topic: str) -> tuple[websocket.WebSocket, str]:
    """A raw Socket.IO client that subscribes, then never reads again; and its engine.io sid."""
    ws = websocket.WebSocket(sockopt=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)])
    ws.connect(stack.url.replace("http", "ws") + "/socket.io/?EIO=4&transport=websocket")
    opened = ws.recv()
    assert opened.startswith("0")  # engine.io open
    ws.send("40")
    assert ws.recv().startswith("40")  # socket.io connect
    ws.send("420" + json.dumps(["subscribe", {"topic": topic}]))
    assert json.loads(ws.recv()[3:])[0]["ok"]
    return ws, json.loads(opened[1:])["sid"]


def worker_rss(stack: Stack) -> int:
    assert stack.web is not None
    [worker] = psutil.Process(stack.web.pid).children()
    return worker.memory_info().rss


def test_a_stalled_client_is_cut_and_the_others_get_everything(make_stack) -> None:
    total = 1500
    # History covers the whole flood: the healthy client may fall behind by
    # any amount and must still recover all of it (the contract's promise).
    stack = make_stack(
        TIDINGS_CLIENT_QUEUE_BYTES=str(QUEUE_BYTES), TIDINGS_HISTORY_SIZE=str(2 * total)
    )
    stack.start_worker()
    stack.start_web()
    stack.wait_ready()
    topic = "public.flood"
    got: list[dict[str, Any]] = []
    healthy = TidingsClient(stack.url, on_publication=got.append)
    healthy.connect()
    healthy.subscribe(topic)
    stalled, stalled_sid = stalled_client(stack, topic)
    before = worker_rss(stack)
    blob = "x" * 8000
    for start in range(0, total, 50):
        stack.publish_many([(topic, {"n": n, "blob": blob}) for n in range(start, start + 50)])
    assert stack.web is not None
    wait_for(lambda: f"slow client cut: sid={stalled_sid}" in stack.web.log(), timeout=30)
    # The healthy client may be cut too when it falls behind by the bound
    # (it is a Python client parsing 12 MB): it recovers from history.
    wait_for(lambda: len(got) == total, timeout=30)
    assert [p["data"]["n"] for p in got] == list(range(total))
    assert healthy.gaps == 0
    grown = worker_rss(stack) - before
    print(
        f"\n[slow client] worker RSS grew {grown / 1e6:.1f} MB for {total * 8 / 1e3:.0f} MB sent;"
        f" healthy client reconnected {healthy.connects - 1} times"
    )
    # The cut client's connection is closed: reading drains what the kernel
    # buffered and then ends, instead of blocking forever.
    stalled.settimeout(10)
    with pytest.raises((websocket.WebSocketConnectionClosedException, ConnectionError, OSError)):
        while True:
            stalled.recv()
    healthy.disconnect()
