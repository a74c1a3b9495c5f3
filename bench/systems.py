"""The systems under test, each started on a Redis server of its own.

- `tidings-1w` / `tidings-2w`: Tidings as shipped, `gunicorn -c gunicorn.conf.py`
  (WEB_CONCURRENCY 1 or 2) and `celery -A tasks worker`;
- `tidings-1w@<commit>`: the same, running another commit's code (exported with
  `git archive`), to compare a change with the code before it in one run;
- `naive`: `examples/naive_thread/` under its own gunicorn.conf.py, one worker;
- `node`: `bench/peers/server.js` (socket.io 4, @socket.io/redis-adapter) and
  `bench/peers/bridge.js` (psubscribe, @socket.io/redis-emitter);
- `node-sharded`: the same two on the adapter's `createShardedAdapter` (Redis 7
  sharded pub/sub, a channel per room), the peer of the own-topics workload.

All speak the same client protocol and read the same `tidings:topic:<topic>`
channels, so one load generator and one publisher drive them all.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis
import requests

from bench.measure import cpu_seconds, own_rss_bytes
from tests.support import ROOT, VENV_BIN, Proc, RedisServer, Stack, free_port

PEERS = ROOT / "bench" / "peers"


@contextmanager
def small_stack(prefix: str, **env: str) -> Iterator[Stack]:
    """One Celery worker and one web worker on a Redis of their own, ready; stopped after."""
    directory = Path(tempfile.mkdtemp(prefix=prefix))
    server = RedisServer(directory / "redis")
    server.start()
    stack = Stack(server, directory, **env)
    try:
        stack.start_worker()
        stack.start_web()
        stack.wait_ready()
        yield stack
    finally:
        stack.stop()
        server.stop()


def node_binary() -> str | None:
    """Return the `node` executable, if there is one."""
    return shutil.which("node")


def ensure_node_modules(directory: Path = PEERS) -> None:
    """Install a Node package's locked npm dependencies when they are missing or stale.

    `directory` holds package.json and package-lock.json: bench/peers (the
    benchmark's peers) by default, or clients/js (the JavaScript client).
    """
    lock = directory / "package-lock.json"
    installed = directory / "node_modules" / ".package-lock.json"
    if installed.exists() and installed.stat().st_mtime >= lock.stat().st_mtime:
        return
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(f"npm not found: {directory.relative_to(ROOT)} needs Node.js and npm")
    subprocess.run(
        [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
        cwd=directory,
        check=True,
        stdout=subprocess.DEVNULL,
    )


def _clean_env() -> dict[str, str]:
    """The calling environment without anything that would reconfigure a system."""
    drop = ("TIDINGS_", "NAIVE_", "PEER_")
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(drop) and key not in ("WEB_CONCURRENCY", "PORT")
    }


class System:
    """One system under test: its Redis, its processes, its URL."""

    name = "system"
    description = ""
    # Whether it forwards the durable `XADD tidings:ingest` path too.
    durable = False
    # A peer for interest routing only: it runs the own-topics workload, not issue 7's.
    routing_peer = False

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.redis_server = RedisServer(directory / "redis")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.procs: list[Proc] = []

    @property
    def redis_url(self) -> str:
        """The data database of this system's Redis."""
        return self.redis_server.url(0)

    def redis(self) -> redis.Redis:
        """A client of this system's Redis."""
        return self.redis_server.client()

    def start(self) -> None:
        """Start Redis and the system's processes (does not wait for them)."""
        self.redis_server.start()
        self._start_processes()

    def _start_processes(self) -> None:
        raise NotImplementedError

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> Proc:
        proc = Proc(
            name,
            args,
            {**_clean_env(), "PYTHONUNBUFFERED": "1", **env},
            self.directory / f"{name}.log",
        )
        self.procs.append(proc)
        return proc

    def ready(self) -> bool:
        """Tell whether the system serves and forwards."""
        raise NotImplementedError

    def wait_ready(self, timeout: float = 60) -> None:
        """Wait until `ready()`, or raise naming the system and its logs."""
        deadline = time.monotonic() + timeout
        while not self.ready():
            for proc in self.procs:
                if not proc.alive():
                    raise RuntimeError(f"{self.name}: {proc.name} exited; see {proc.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.name}: not ready within {timeout}s; see {self.directory}"
                )
            time.sleep(0.1)

    def _get(self, path: str) -> int:
        try:
            return requests.get(self.url + path, timeout=2).status_code
        except requests.RequestException:
            return 0

    def _subscribers(self, channel: str) -> int:
        client = self.redis()
        try:
            return int(dict(client.pubsub_numsub(channel)).get(channel.encode(), 0))
        except redis.RedisError:
            return 0
        finally:
            client.close()

    def server_pids(self) -> list[int]:
        """The roots of every server process (their descendants count too)."""
        return [proc.pid for proc in self.procs if proc.alive()]

    def web_pids(self) -> list[int]:
        """The processes that hold the websockets (memory per connection is theirs)."""
        raise NotImplementedError

    def cpu_by_process(self) -> dict[str, float]:
        """CPU seconds so far of each server process with its descendants, and of Redis."""
        parts = {proc.name: cpu_seconds([proc.pid]) for proc in self.procs if proc.alive()}
        process = self.redis_server.process
        if process is not None:
            parts["redis"] = cpu_seconds([process.pid])
        return parts

    def web_rss(self) -> int:
        """Resident memory of the websocket-holding processes."""
        return own_rss_bytes(self.web_pids())

    def stop(self) -> None:
        """Stop every process, then Redis."""
        for proc in reversed(self.procs):
            proc.stop(timeout=10)
        self.procs.clear()
        self.redis_server.stop()

    def kill(self) -> None:
        """SIGKILL every process at once, then stop Redis (nothing left to check on the system)."""
        for proc in reversed(self.procs):
            proc.kill()
        self.procs.clear()
        self.redis_server.stop()


def stop_all(systems: list[System]) -> None:
    """Stop systems side by side: each gunicorn waits out its graceful timeout on websockets."""
    threads = [threading.Thread(target=s.stop, name=f"stop-{s.name}") for s in systems]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def _children(pid: int) -> list[int]:
    import psutil

    try:
        return [child.pid for child in psutil.Process(pid).children()]
    except psutil.NoSuchProcess:
        return []


def export(commit: str, directory: Path) -> Path:
    """Export a commit's tree into `directory` (which must not exist yet)."""
    directory.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "archive", commit], cwd=ROOT, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive, check=True)
    return directory


class Tidings(System):
    """Tidings as shipped: gunicorn -c gunicorn.conf.py and celery -A tasks worker."""

    durable = True

    def __init__(
        self,
        directory: Path,
        workers: int = 1,
        env: dict[str, str] | None = None,
        commit: str | None = None,
    ) -> None:
        super().__init__(directory)
        self.workers = workers
        # Settings of a run's own (the soak's), over the ones below.
        self.env = env or {}
        self.name = f"tidings-{workers}w"
        self.description = (
            f"Tidings: `gunicorn -c gunicorn.conf.py` (WEB_CONCURRENCY={workers}) "
            "+ `celery -A tasks worker`"
        )
        # Another commit's code, run from its exported tree (same virtualenv).
        self.source: Path | None = None
        if commit is not None:
            revision = subprocess.run(
                ["git", "rev-parse", "--short", commit],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            self.source = export(commit, directory / "src")
            self.name += f"@{commit}"
            self.description += f", the code of {commit} ({revision})"

    def _command(self, *args: str) -> list[str]:
        if self.source is None:
            return list(args)
        # exec: the process started is gunicorn (or celery) itself, as measured.
        line = " ".join(shlex.quote(a) for a in args)
        return ["sh", "-c", f"cd {shlex.quote(str(self.source))} && exec {line}"]

    def _start_processes(self) -> None:
        env = {
            "TIDINGS_REDIS_URL": self.redis_url,
            "TIDINGS_BIND": f"127.0.0.1:{self.port}",
            "WEB_CONCURRENCY": str(self.workers),
            # A per-IP connection cap would refuse the loopback load generator.
            "TIDINGS_MAX_CONNECTIONS_PER_IP": "1000000",
            **self.env,
        }
        self._spawn("web", self._command(str(VENV_BIN / "gunicorn"), "-c", "gunicorn.conf.py"), env)
        self._spawn("worker", self._command(str(VENV_BIN / "celery"), "-A", "tasks", "worker"), env)

    def ready(self) -> bool:
        return self._get("/readyz") == 200 and self._subscribers("tidings:socketio") >= self.workers

    def web_pids(self) -> list[int]:
        return _children(self.procs[0].pid)


class Naive(System):
    """The naive design: examples/naive_thread under its gunicorn.conf.py."""

    name = "naive"
    description = "examples/naive_thread: Flask-SocketIO, listener thread in the app, 1 worker"

    def _start_processes(self) -> None:
        env = {
            "NAIVE_REDIS_URL": self.redis_url,
            "NAIVE_BIND": f"127.0.0.1:{self.port}",
            "NAIVE_WORKERS": "1",
            "NAIVE_WORKER_CONNECTIONS": "12000",
        }
        self._spawn(
            "web",
            [str(VENV_BIN / "gunicorn"), "-c", "examples/naive_thread/gunicorn.conf.py"],
            env,
        )

    def ready(self) -> bool:
        # Its queue subscription starts with the first client (python-socketio
        # initializes the manager lazily); the workloads' probe covers it.
        if self._get("/healthz") != 200:
            return False
        client = self.redis()
        try:
            return int(client.execute_command("PUBSUB", "NUMPAT")) >= 1
        finally:
            client.close()

    def web_pids(self) -> list[int]:
        return _children(self.procs[0].pid)


class NodePeer(System):
    """socket.io 4 + @socket.io/redis-adapter, and a bridge process emitting through Redis."""

    def __init__(self, directory: Path, *, sharded: bool = False) -> None:
        super().__init__(directory)
        self.sharded = sharded
        self.routing_peer = sharded
        if sharded:
            self.name = "node-sharded"
            self.description = (
                "Node peer, sharded: socket.io 4 server + @socket.io/redis-adapter's "
                "`createShardedAdapter` (SSUBSCRIBE per room), bridge process that is a "
                "socket.io cluster member on the same adapter (`io.to(room).emit`: SPUBLISH "
                "on the room's channel)"
            )
        else:
            self.name = "node"
            self.description = (
                "Node peer: socket.io 4 server + @socket.io/redis-adapter, "
                "bridge process with @socket.io/redis-emitter"
            )

    def _start_processes(self) -> None:
        node = node_binary()
        if node is None:
            raise RuntimeError("node not found")
        env = {"PEER_REDIS_URL": self.redis_url, "PEER_PORT": str(self.port)}
        if self.sharded:
            env["PEER_ADAPTER"] = "sharded"
        self._spawn("server", [node, str(PEERS / "server.js")], env)
        self._spawn("bridge", [node, str(PEERS / "bridge.js")], env)

    def ready(self) -> bool:
        if self._get("/healthz") != 200:
            return False
        client = self.redis()
        try:
            if self.sharded:
                # The bridge's pattern, and both adapters on the namespace's channel.
                members = client.execute_command("PUBSUB", "SHARDNUMSUB", "socket.io#/#")
                return int(client.execute_command("PUBSUB", "NUMPAT")) >= 1 and int(members[1]) >= 2
            # The adapter's and the bridge's pattern subscriptions.
            return int(client.execute_command("PUBSUB", "NUMPAT")) >= 2
        except redis.RedisError:
            return False
        finally:
            client.close()

    def web_pids(self) -> list[int]:
        return [self.procs[0].pid]


def make(name: str, directory: Path) -> System:
    """Build a system by its name (`tidings-<N>w` for N web workers, `@<commit>` for its code)."""
    base, _, commit = name.partition("@")
    workers = base.removeprefix("tidings-").removesuffix("w")
    if base.startswith("tidings-") and workers.isdigit() and int(workers) > 0:
        return Tidings(directory / name, workers=int(workers), commit=commit or None)
    if name == "naive":
        return Naive(directory / name)
    if name == "node":
        return NodePeer(directory / name)
    if name == "node-sharded":
        return NodePeer(directory / name, sharded=True)
    raise ValueError(f"unknown system {name!r}")


ALL = ("tidings-1w", "tidings-2w", "naive", "node", "node-sharded")
