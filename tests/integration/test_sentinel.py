"""Redis Sentinel: the whole stack follows a master failover under load.

One master, one replica, three sentinels (all `redis-server`, the sentinels
with `--sentinel`: Debian's `redis-sentinel` is the same binary), on
loopback ports. Tidings runs against `redis+sentinel://` (data, lease,
history, message queue, readiness) and kombu's `sentinel://` broker (the
default derived from it). A publisher XADDs durable publications at a
steady rate and follows each with `WAIT 1 1000`: a publication is
*acknowledged* when its XADD returned and a replica has it. Then `SENTINEL
FAILOVER` under load: every Tidings process must move to the new master,
deliveries must resume within 10 s, and no acknowledged publication may be
lost for any client.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support import Stack, free_port, redis_binary, wait_for
from tidings.client import TidingsClient
from tidings.connection import connect
from tidings.keys import INGEST_STREAM

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SERVICE = "tidings"
ACKED_RATE = 50  # publications per second, each followed by WAIT 1 1000
LOAD_RATE = 100  # publications per second that do not wait
CLIENTS = 3
RESUME_LIMIT = 10.0  # the issue: deliveries resume within 10 s
AFTER_FAILOVER = 14.0  # seconds of publishing after the failover (the old master's window is ~10 s)


class SentinelCluster:
    """A master, a replica and three sentinels, each a redis-server on a free port."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.master_port = free_port()
        self.replica_port = free_port()
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.processes: list[subprocess.Popen] = []

    def _spawn(self, name: str, args: list[str]) -> None:
        with open(self.directory / f"{name}.log", "ab") as log:
            self.processes.append(
                subprocess.Popen(
                    [redis_binary(), *args],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.directory,
                )
            )

    def start(self) -> None:
        for name, port, extra in (
            ("master", self.master_port, []),
            ("replica", self.replica_port, ["--replicaof", "127.0.0.1", str(self.master_port)]),
        ):
            data = self.directory / name
            data.mkdir(exist_ok=True)
            self._spawn(
                name,
                [
                    *("--port", str(port), "--bind", "127.0.0.1", "--dir", str(data)),
                    *("--save", "", "--appendonly", "no", "--maxclients", "10000", *extra),
                ],
            )
        wait_for(lambda: self._replica_in_sync(), timeout=20)
        for index, port in enumerate(self.sentinel_ports):
            conf = self.directory / f"sentinel{index}.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.directory}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.master_port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 2000\n"
                f"sentinel failover-timeout {SERVICE} 10000\n"
                f"sentinel parallel-syncs {SERVICE} 1\n"
            )
            self._spawn(f"sentinel{index}", [str(conf), "--sentinel"])
        wait_for(self._sentinels_agree, timeout=30)

    def _replica_in_sync(self) -> bool:
        try:
            info = redis.Redis(port=self.replica_port).info("replication")
        except redis.ConnectionError:
            return False
        return info.get("master_link_status") == "up"

    def _sentinels_agree(self) -> bool:
        """Each sentinel knows the master, the replica and the two other sentinels."""
        for port in self.sentinel_ports:
            try:
                state = redis.Redis(port=port).sentinel_master(SERVICE)
            except (redis.ConnectionError, redis.ResponseError):
                return False
            if state["num-other-sentinels"] < 2 or state["num-slaves"] < 1:
                return False
        return True

    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/0/{SERVICE}"

    def sentinel(self, index: int = 0) -> redis.Redis:
        return redis.Redis(port=self.sentinel_ports[index])

    def master_port_now(self) -> int:
        """The master's port as every sentinel names it (the same on all, or fail)."""
        ports = {
            int(self.sentinel(i).sentinel_get_master_addr_by_name(SERVICE)[1]) for i in range(3)
        }
        return ports.pop() if len(ports) == 1 else 0

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)


class SentinelRedis:
    """What Stack needs of a Redis server, for a Sentinel-managed one."""

    def __init__(self, cluster: SentinelCluster) -> None:
        self.cluster = cluster

    def url(self, db: int = 0) -> str:
        assert db == 0
        return self.cluster.url()

    def client(self, db: int = 0) -> redis.Redis:
        return connect(self.cluster.url(), "test")


class SteadyPublisher(threading.Thread):
    """XADDs {"n": 0, 1, ...} on one topic at a steady rate; with `wait`, each followed by WAIT.

    With `wait`, `acked` holds the n whose XADD returned and which a replica
    had when `WAIT 1 1000` returned: durable across a failover. The rest
    (WAIT said 0, or an error) may be lost, as Redis replication allows.
    The client is Tidings' own (`connect`), so it follows the master too.
    """

    def __init__(self, url: str, topic: str, rate: float, *, wait: bool) -> None:
        super().__init__(daemon=True, name=f"publisher-{topic}")
        self.topic = topic
        self.period = 1 / rate
        self.wait = wait
        self.client = connect(url, "publisher")
        self.sent = 0
        self.acked: set[int] = set()
        self.errors: Counter[str] = Counter()
        self._halt = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic()
        while not self._halt.is_set():
            n = self.sent
            fields = {"topic": self.topic, "data": json.dumps({"n": n})}
            try:
                pipe = self.client.pipeline(transaction=False)
                pipe.xadd(INGEST_STREAM, fields)
                if self.wait:
                    pipe.wait(1, 1000)  # the same connection: WAIT covers this XADD
                replies = pipe.execute()
                if self.wait and replies[1] >= 1:
                    self.acked.add(n)
            except redis.RedisError as exc:
                self.errors[type(exc).__name__] += 1
            self.sent += 1
            deadline = max(deadline + self.period, time.monotonic() - 1)
            self._halt.wait(max(0.0, deadline - time.monotonic()))

    def halt(self) -> None:
        self._halt.set()
        self.join(timeout=15)
        self.client.close()


class Recorder(TidingsClient):
    """A TidingsClient that records each delivered publication: (arrival, topic, n, offset)."""

    def __init__(self, url: str) -> None:
        self.arrivals: list[tuple[float, str, int, str]] = []
        self._arrivals_lock = threading.Lock()
        super().__init__(url, on_publication=self._record, transports=["websocket"])

    def _record(self, pub: dict[str, Any]) -> None:
        with self._arrivals_lock:
            self.arrivals.append((time.monotonic(), pub["topic"], pub["data"]["n"], pub["offset"]))

    def delivered(self, topic: str) -> list[tuple[float, int, str]]:
        with self._arrivals_lock:
            return [(t, n, o) for t, top, n, o in self.arrivals if top == topic]


def tidings_clients(server: redis.Redis) -> list[tuple[str, int, int]]:
    """(name, psub, sub) of Tidings' processes' connections (not this test's)."""
    entries = server.client_list()
    return [
        (c["name"], int(c.get("psub", 0)), int(c.get("sub", 0)))
        for c in entries
        if c.get("name", "").startswith("tidings:")
        and not c["name"].startswith(("tidings:test:", "tidings:publisher:"))
    ]


def roles_of(entries: list[tuple[str, int, int]]) -> Counter[str]:
    return Counter(name.split(":")[1] for name, _, _ in entries)


@pytest.fixture
def cluster(tmp_path: Path) -> Any:
    started = SentinelCluster(tmp_path / "sentinel")
    started.start()
    yield started
    started.stop()


def test_failover_under_load(cluster: SentinelCluster, tmp_path: Path) -> None:
    url = cluster.url()
    stack = Stack(SentinelRedis(cluster), tmp_path, TIDINGS_HISTORY_SIZE="100000")  # type: ignore[arg-type]
    assert stack.settings.broker_url.startswith("sentinel://")
    durable, load = "public.sentinel.acked", "public.sentinel.load"
    clients: list[Recorder] = []
    publishers: list[SteadyPublisher] = []
    old_master = redis.Redis(port=cluster.master_port)
    new_master = redis.Redis(port=cluster.replica_port)
    try:
        stack.start_worker(concurrency=2)
        stack.start_worker(concurrency=2)
        stack.start_web()
        stack.wait_ready(timeout=60)
        for _ in range(CLIENTS):
            client = Recorder(stack.url)
            client.connect()
            for topic in (durable, load):
                assert client.subscribe(topic)["ok"]
            clients.append(client)
        assert cluster.master_port_now() == cluster.master_port
        before = roles_of(tidings_clients(old_master))
        assert before["listener"] and before["web"] and before["supervisor"], before

        # Acknowledged publications (WAIT) and, beside them, a steady load that
        # does not wait: after the failover, WAIT blocks until the old master
        # is back as a replica, and the load shows when deliveries resume.
        acking = SteadyPublisher(url, durable, ACKED_RATE, wait=True)
        loading = SteadyPublisher(url, load, LOAD_RATE, wait=False)
        publishers = [acking, loading]
        for publisher in publishers:
            publisher.start()
        wait_for(
            lambda: all(len(c.delivered(t)) >= 50 for c in clients for t in (durable, load)),
            timeout=30,
        )

        failover_at = time.monotonic()
        acked_before = set(acking.acked)
        assert cluster.sentinel(1).execute_command("SENTINEL", "FAILOVER", SERVICE)
        wait_for(lambda: cluster.master_port_now() == cluster.replica_port, timeout=30)
        switched = time.monotonic() - failover_at
        load_after_switch = loading.sent  # load n >= this were published after the switch

        # Every Tidings process moves: the listener, the web worker's queue
        # subscription and the supervisors are on the new master, and nothing
        # of Tidings' but Celery's broker connections stays on the old one.
        def moved() -> bool:
            on_new = tidings_clients(new_master)
            listener = any(n.startswith("tidings:listener:") and p for n, p, _ in on_new)
            web = any(n.startswith("tidings:web:") and s for n, _, s in on_new)
            supervisors = sum(n.startswith("tidings:supervisor:") for n, _, _ in on_new)
            # kombu moves when the old master turns replica, ~10 s later.
            left = [n for n, _, _ in tidings_clients(old_master) if ":celery:" not in n]
            return listener and web and supervisors == 2 and not left

        try:
            wait_for(moved, timeout=10)
        except pytest.fail.Exception:
            print("\nold master:", tidings_clients(old_master))
            print("new master:", tidings_clients(new_master))
            raise
        moved_after = time.monotonic() - failover_at
        wait_for(stack.ready, timeout=10)

        # Keep publishing past the old master's writable window (~10 s) and
        # its return as a replica of the new master.
        while time.monotonic() - failover_at < AFTER_FAILOVER:
            time.sleep(0.2)
        for publisher in publishers:
            publisher.halt()
        acked = acking.acked

        def complete() -> bool:
            return all(acked <= {n for _, n, _ in c.delivered(durable)} for c in clients)

        with contextlib.suppress(pytest.fail.Exception):
            wait_for(complete, timeout=30)
        # Celery's connections too end up on the new master.
        with contextlib.suppress(pytest.fail.Exception):
            wait_for(lambda: not tidings_clients(old_master), timeout=20)
        left_on_old = roles_of(tidings_clients(old_master))
        celery_on_new = roles_of(tidings_clients(new_master))["celery"]

        # What the new master's history holds is what survived the failover.
        kept = {
            topic: {
                json.loads(fields[b"d"])["n"]
                for _, fields in new_master.xrange(f"tidings:history:{topic}")
            }
            for topic in (durable, load)
        }

        def resumed(client: Recorder) -> float:
            for arrived, n, _ in client.delivered(load):
                if n >= load_after_switch and n in kept[load]:
                    return arrived - failover_at
            return float("inf")

        resumes = [resumed(c) for c in clients]
        print(
            f"\n[sentinel] SENTINEL FAILOVER: sentinels named the new master after {switched:.2f}s;"
            f" Tidings' processes all on it after {moved_after:.2f}s"
            f" ({dict(roles_of(tidings_clients(new_master)))}); Celery's broker connections"
            f" followed later ({celery_on_new} on the new master, left on the old: {left_on_old})"
            f"\n[sentinel] deliveries resumed (first post-switch publication kept by the new"
            f" master, at each client) after {', '.join(f'{r:.2f}s' for r in resumes)}"
            f"\n[sentinel] acknowledged publisher: {acking.sent} published, {len(acked)}"
            f" acknowledged ({len(acked_before)} before the failover),"
            f" errors {dict(acking.errors)};"
            f" load publisher: {loading.sent} published, errors {dict(loading.errors)}"
        )
        problems = []
        for index, client in enumerate(clients):
            line = [
                f"[sentinel] client {index} (reconnects {client.connects - 1},"
                f" gaps reported {client.gaps}, recovered {client.recovered}):"
            ]
            for topic in (durable, load):
                got = [n for _, n, _ in client.delivered(topic)]
                counts = Counter(got)
                twice = sorted(n for n, k in counts.items() if k > 1)
                lost_later = sorted(set(got) - kept[topic])
                skipped = sorted(kept[topic] - set(got))
                line.append(
                    f"{topic}: {len(got)} delivered, {len(set(got))} distinct, twice {len(twice)}"
                    f" {twice[:5]}, delivered then lost with the old master {len(lost_later)},"
                    f" kept by the new master but not delivered {len(skipped)} {skipped[:5]}"
                )
                offsets = [tuple(map(int, o.split("-"))) for _, _, o in client.delivered(topic)]
                assert offsets == sorted(offsets), f"client {index}: {topic} out of offset order"
            missing = sorted(acked - {n for _, n, _ in client.delivered(durable)})
            line.append(f"acknowledged missing {len(missing)} {missing[:10]}")
            print("\n  ".join(line))
            if missing:
                problems.append(f"client {index} lost acknowledged publications {missing[:20]}")
        missing_history = sorted(acked - kept[durable])
        assert not missing_history, f"acknowledged but not in history: {missing_history[:20]}"
        assert not problems, "\n".join(problems)
        assert max(resumes) < RESUME_LIMIT, f"deliveries resumed after {max(resumes):.2f}s"
        for worker in stack.workers:
            assert worker.alive(), worker.log()[-3000:]
        assert stack.web is not None and stack.web.alive()
    finally:
        for publisher in publishers:
            if publisher.is_alive():
                publisher.halt()
        for client in clients:
            with contextlib.suppress(Exception):
                client.disconnect()
        stack.stop()
