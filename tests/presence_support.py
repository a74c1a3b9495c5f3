"""Two web nodes, one Celery worker, one Redis and a webhook receiver; users with tokens."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import jwt
import requests
import socketio

from tests.support import RedisServer, Stack
from tests.webhook_receiver import Receiver

SECRET = "presence-tests-secret-of-32-bytes!"
API_KEY = "presence-tests-api-key"
WEBHOOK_SECRET = "presence-tests-webhook-secret"
ENV = {
    "TIDINGS_SECRET": SECRET,
    "TIDINGS_API_KEY": API_KEY,
    "TIDINGS_PUBLIC_TOPICS": "public.*,lobby.*",
    "TIDINGS_PRESENCE_TOPICS": "room.*,lobby.*",
    "TIDINGS_JOIN_LEAVE_TOPICS": "room.*",
    "TIDINGS_WEBHOOK_SECRET": WEBHOOK_SECRET,
}


def token(sub: str, topics: list[str], *, iat: float | None = None, **claims: Any) -> str:
    """An HS256 token for `sub` (issued at `iat`, default now), valid for a minute."""
    issued = int(time.time() if iat is None else iat)
    body = {"sub": sub, "topics": topics, "iat": issued, "exp": issued + 600, **claims}
    return jwt.encode(body, SECRET, algorithm="HS256")


class User:
    """A raw Socket.IO client that records the events presence sends (no reconnection)."""

    def __init__(self, url: str, token: str | None = None) -> None:
        self.url = url
        self.token = token
        self.events: dict[str, list[Any]] = defaultdict(list)
        self.refused: list[Any] = []
        self.sio = socketio.Client(reconnection=False)
        for name in ("joins", "leaves", "unsubscribed", "publications"):
            self.sio.on(name, lambda data, name=name: self.events[name].append(data))
        self.sio.on("connect_error", self.refused.append)

    def connect(self) -> bool:
        """Connect over websocket; False (and `refused` says why) when refused."""
        with contextlib.suppress(socketio.exceptions.ConnectionError):
            auth = {"token": self.token} if self.token else None
            self.sio.connect(self.url, auth=auth, transports=["websocket"], wait_timeout=10)
        return self.sio.connected

    def call(self, event: str, payload: Any) -> Any:
        """Emit an event and return its ack."""
        return self.sio.call(event, payload, timeout=10)

    def subscribe(self, topic: str) -> None:
        """Subscribe, and insist it worked."""
        ack = self.call("subscribe", {"topic": topic})
        assert ack["ok"], ack

    @property
    def connected(self) -> bool:
        """Tell whether the connection is up."""
        return self.sio.connected

    def close(self) -> None:
        """Disconnect if connected."""
        with contextlib.suppress(Exception):
            self.sio.disconnect()

    def items(self, event: str) -> list[dict[str, Any]]:
        """Return the items of every `joins`/`leaves` event received, in order."""
        return [item for batch in list(self.events[event]) for item in batch]


class Nodes:
    """Stack `a` (web + Celery worker) and `b` (web) on one Redis, with a webhook receiver."""

    def __init__(self, directory: Path, **env: str) -> None:
        self.receiver = Receiver(WEBHOOK_SECRET)
        self.server = RedisServer(directory / "redis")
        full = {**ENV, "TIDINGS_WEBHOOK_URL": self.receiver.url, **env}
        (directory / "a").mkdir(parents=True, exist_ok=True)
        (directory / "b").mkdir(parents=True, exist_ok=True)
        self.a = Stack(self.server, directory / "a", **full)
        self.b = Stack(self.server, directory / "b", **full)
        self.users: list[User] = []

    def start(self) -> None:
        """Start Redis, the receiver, the worker and both nodes; wait until ready."""
        self.server.start()
        self.receiver.start()
        self.a.start_worker()
        self.a.start_web(wait=False)
        self.b.start_web(wait=False)
        self.a.wait_ready()
        self.b.wait_ready()

    def stop(self) -> None:
        """Stop everything."""
        for user in self.users:
            user.close()
        self.a.stop()
        self.b.stop()
        self.receiver.stop()
        self.server.stop()

    def user(self, stack: Stack, token: str | None = None, *, connect: bool = True) -> User:
        """A user on a node, connected unless told otherwise (closed at the end)."""
        made = User(stack.url, token)
        self.users.append(made)
        if connect:
            assert made.connect(), made.refused
        return made

    def api(self, method: str, path: str, *, stack: Stack | None = None, **kwargs: Any) -> Any:
        """Call the server API on a node (b by default) with the key; return the response."""
        url = (stack or self.b).url + path
        headers = {"Authorization": f"Bearer {API_KEY}"}
        return requests.request(method, url, headers=headers, timeout=10, **kwargs)
