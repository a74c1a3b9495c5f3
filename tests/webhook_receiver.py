"""A real webhook receiver on loopback: records every POST, answers as told, can go away."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.support import free_port
from tidings.webhooks import SIGNATURE_HEADER, verify


class Receiver:
    """An HTTP server on 127.0.0.1 that keeps each POSTed batch; `stop` closes its port."""

    def __init__(self, secret: str) -> None:
        self.secret = secret
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hooks"
        self.status = 200  # what it answers
        self.posts: list[tuple[dict[str, str], bytes]] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        """Listen (again) on the same port."""
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._lock:
                    receiver.posts.append((dict(self.headers), body))
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        """Stop listening: connections are refused until `start`."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def batches(self) -> list[dict[str, Any]]:
        """Return every body received, parsed, after checking its signature."""
        with self._lock:
            posts = list(self.posts)
        parsed = []
        for headers, body in posts:
            assert verify(self.secret, body, headers[SIGNATURE_HEADER]), "bad signature"
            parsed.append(json.loads(body))
        return parsed

    def events(self) -> list[dict[str, Any]]:
        """Return the events received, each once (by id), in arrival order."""
        seen: set[str] = set()
        events = []
        for batch in self.batches():
            for event in batch["events"]:
                if event["id"] not in seen:
                    seen.add(event["id"])
                    events.append(event)
        return events
