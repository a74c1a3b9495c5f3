"""A reconnect storm: N clients on one web worker, the worker SIGKILLed, everyone comes back.

    .venv/bin/python -m bench.storm [--clients 5000] [--browser-clients 500]
        [--python-clients 20] [--quick]

Starts a real stack (one gunicorn worker as gunicorn.conf.py configures it,
one Celery worker, a Redis of its own) and connects N clients, each
subscribed to a shared topic and to a topic of its own. All but P run
Tidings' own browser client, webapp/static/tidings.js, in Node
(bench/peers/storm.js): B of them on socket.io-client, the rest on
leanio.js, the same reconnection on a hand-framed websocket (socket.io-client
in Node costs so much CPU per reconnection that 5,000 of them, on the
server's two cores, came back seconds late by their own fault). P are the
Python client (`tidings.client`) in this process. Durable publications go
out at a steady rate for the whole run. After a warm-up the gunicorn
worker (not the master) is SIGKILLed; gunicorn
forks a new one, and every client reconnects on its own backoff and
resubscribes with `since`. Measured:

- per client, the time from the kill until it is connected again with every
  topic acknowledged (p50, p99, max), and when the last one was back;
- per client, publications lost, delivered twice or out of order, by the
  sequence number each topic's publications carry, end to end;
- reconnection attempts per client, and the delay of each client's first
  attempt after its disconnect (the jitter of its backoff);
- the kernel's side: the listening socket's accept queue (its length and
  its peak during the storm, as `ss -ltn` shows them) and TcpExt
  ListenOverflows / ListenDrops before and after (counters of the whole
  host, other sockets included);
- CPU seconds from the kill until all were back, by process, and what the
  rest of the (shared) machine took meanwhile.

The result goes to bench/RESULTS.md's "Separate measurements" (`--no-record`:
printed only; never with --quick, --backlog, --worker-cpu or --profile).
The machine's sysctls are read, never changed.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench.load import NodeProcesses, Publisher
from bench.measure import cpu_seconds
from bench.report import RESULTS, record_separate
from bench.systems import ensure_node_modules, small_stack
from tests.support import ROOT, VENV_BIN, Stack
from tidings.client import RETRIED_ERRORS, TidingsClient
from tidings.listenqueue import (
    ListenCounters,
    kernel_limits,
    listen_counters,
    listening_socket,
)

SHARED = "public.storm.all"
NODE_PREFIX = "public.storm.node."
PY_PREFIX = "public.storm.py."
JS_CLIENT = ROOT / "webapp" / "static" / "tidings.js"
TARGET_S = 20.0
# Clients per Node process. socket.io-client costs about 1.4 ms of CPU per
# reconnection here: 5,000 of them took a third of the machine during the
# storm, and their own timers fired seconds late, which spread the storm
# out. leanio.js costs a tenth of that.
BROWSERS_PER_PROCESS = 1250
LEAN_PER_PROCESS = 2500


def now_ms() -> float:
    """Wall-clock milliseconds, the clock both clients stamp their events with."""
    return time.time() * 1000


@dataclass
class Sizes:
    """How big a storm, and how much publishing around it."""

    clients: int = 5000
    # Of which tidings.js on socket.io-client, and Python `tidings.client`;
    # the rest are tidings.js on leanio.js (bench/peers/).
    browser_clients: int = 500
    python_clients: int = 20
    shared_rate: float = 2.0
    own_rate: float = 500.0
    warmup: float = 5.0
    after: float = 3.0
    deadline: float = 120.0


QUICK = Sizes(
    clients=50, browser_clients=20, python_clients=5, shared_rate=5, own_rate=20, warmup=2, after=1
)
# tidings.js on socket.io-client, tidings.js on leanio.js, tidings.client.
KINDS = ("socket.io-client", "leanio", "python")


# -- the clients -----------------------------------------------------------------------


@dataclass
class ClientResult:
    """One client's storm, from either kind of client."""

    kind: str
    disconnected_ms: float | None
    connected_ms: float | None
    back_ms: float | None
    attempts: list[float]
    retries: int
    gaps: int
    delivered: int
    lost: int
    twice: int
    out_of_order: int
    unexpected: int
    wire: int
    refused: str | None = None
    reasons: list[str] = field(default_factory=list)


class PythonClient(TidingsClient):
    """`tidings.client.TidingsClient` as shipped, observed: attempts, acks, sequence numbers."""

    def __init__(self, url: str, index: int) -> None:
        self.topics = [SHARED, f"{PY_PREFIX}{index}"]
        self.mark_ms = math.inf
        self.seen: dict[str, Counter[int]] = {topic: Counter() for topic in self.topics}
        self.last: dict[str, int] = {}
        self.out_of_order = 0
        self.disconnects: list[float] = []
        self.connected_ms = 0.0
        self.attempts: list[float] = []
        self.acked: dict[str, int] = {}
        self.back_ms = 0.0
        self.retries = 0
        self.wire = 0
        super().__init__(url, on_publication=self._count, on_raw=self._count_wire)
        connect = self.sio.connect

        def attempt(*args: Any, **kwargs: Any) -> Any:
            # python-socketio's reconnect task calls `self.connect` for each attempt.
            if now_ms() >= self.mark_ms:
                self.attempts.append(now_ms())
            return connect(*args, **kwargs)

        self.sio.connect = attempt  # type: ignore[method-assign]

    def _count(self, pub: dict[str, Any]) -> None:
        n = pub["data"]["n"]
        topic = pub["topic"]
        if n <= self.last.get(topic, -1):
            self.out_of_order += 1
        self.last[topic] = max(n, self.last.get(topic, -1))
        self.seen[topic][n] += 1

    def _count_wire(self, pub: dict[str, Any]) -> None:
        self.wire += 1

    def _on_connect(self) -> None:
        self.connected_ms = now_ms()
        super()._on_connect()

    def _on_disconnect(self, reason: Any = None) -> None:
        if now_ms() >= self.mark_ms:
            self.disconnects.append(now_ms())
        super()._on_disconnect(reason)

    def _on_ack(self, topic: str, sent: dict[str, Any], ack: Any, *, where: str = "") -> None:
        super()._on_ack(topic, sent, ack, where=where)
        if isinstance(ack, dict) and ack.get("ok"):
            self.acked[topic] = self.connects
            if self.back():
                self.back_ms = now_ms()
        elif isinstance(ack, dict) and ack.get("error") in RETRIED_ERRORS:
            self.retries += 1

    def back(self) -> bool:
        """Connected, with every topic acknowledged on this connection."""
        return self.sio.connected and all(self.acked.get(t) == self.connects for t in self.topics)

    def delivered(self) -> int:
        """Publications handed to the application so far."""
        return sum(sum(seen.values()) for seen in self.seen.values())

    def result(self, expected: dict[str, int]) -> ClientResult:
        """What this client saw, against what was published."""
        lost = twice = unexpected = delivered = 0
        for topic in self.topics:
            published = expected.get(topic, 0)
            seen = self.seen[topic]
            lost += sum(1 for n in range(published) if not seen[n])
            twice += sum(c - 1 for n, c in seen.items() if n < published and c > 1)
            delivered += sum(c for n, c in seen.items() if n < published)
            unexpected += sum(c for n, c in seen.items() if n >= published)
        return ClientResult(
            kind="python",
            disconnected_ms=self.disconnects[0] if self.disconnects else None,
            connected_ms=self.connected_ms if self.connected_ms >= self.mark_ms else None,
            back_ms=self.back_ms if self.disconnects and self.back() else None,
            attempts=list(self.attempts),
            retries=self.retries,
            gaps=self.gaps,
            delivered=delivered,
            lost=lost,
            twice=twice,
            out_of_order=self.out_of_order,
            unexpected=unexpected,
            wire=self.wire,
        )


class NodeClients(NodeProcesses):
    """bench/peers/storm.js processes: tidings.js on socket.io-client, or on leanio.js."""

    def __init__(self, url: str, browsers: int, lean: int, workdir: Path) -> None:
        configs: list[dict[str, Any]] = []
        first = 0
        for kind, clients, per_process in (
            ("socket.io-client", browsers, BROWSERS_PER_PROCESS),
            ("leanio", lean, LEAN_PER_PROCESS),
        ):
            processes = math.ceil(clients / per_process)
            for index in range(processes):
                count = clients // processes + (1 if index < clients % processes else 0)
                configs.append(
                    {
                        "url": url,
                        "kind": kind,
                        "count": count,
                        "first": first,
                        "shared": [SHARED],
                        "own_prefix": NODE_PREFIX,
                        "client": str(JS_CLIENT),
                        # A source address per process: ephemeral ports run
                        # out per (source, destination) pair, and every
                        # client connects twice.
                        "local_address": f"127.0.0.{10 + len(configs)}",
                    }
                )
                first += count
        super().__init__("storm.js", configs, workdir=workdir)

    def wait_ready(self) -> None:
        """Wait until every client is subscribed; raise if any was refused."""
        answers = [self._read(proc, "ready") for proc in self.procs]
        failed = sum(a["failed"] for a in answers)
        if failed:
            errors = [e for a in answers for e in a["errors"]]
            raise RuntimeError(f"{failed} Node clients could not subscribe: {errors}")

    def mark(self, at_ms: float) -> None:
        """Count what happens from `at_ms` on as the storm's."""
        self._ask({"cmd": "mark", "at_ms": at_ms}, "marked")

    def stat(self) -> tuple[int, int]:
        """Return (clients back since the mark, publications delivered)."""
        answers = self._ask({"cmd": "stat"}, "stat")
        return sum(a["back"] for a in answers), sum(a["delivered"] for a in answers)

    def results(self, expected: dict[str, int]) -> list[ClientResult]:
        """Every client's storm."""
        answers = self._ask({"cmd": "report", "expected": expected}, "report")
        return [
            ClientResult(
                kind=c["kind"],
                disconnected_ms=c["disconnected"],
                connected_ms=c["connected"],
                back_ms=c["back"],
                attempts=c["attempts"],
                retries=c["retries"],
                gaps=c["gaps"],
                delivered=c["delivered"],
                lost=c["lost"],
                twice=c["twice"],
                out_of_order=c["out_of_order"],
                unexpected=c["unexpected"],
                wire=c["wire"],
                refused=c["refused"],
                reasons=c["reasons"],
            )
            for answer in answers
            for c in answer["clients"]
        ]


# -- the publisher and the observer ---------------------------------------------------------


class SteadyLoad(threading.Thread):
    """Durable publications at steady rates: the shared topic, and the own topics in turn."""

    def __init__(self, redis_url: str, own: list[str], shared_rate: float, own_rate: float) -> None:
        super().__init__(daemon=True, name="storm-publisher")
        self.publisher = Publisher(redis_url, durable=True)
        self.own = own
        self.rates = (shared_rate, own_rate)
        self.error: BaseException | None = None
        self._halt = threading.Event()

    def run(self) -> None:
        shared_rate, own_rate = self.rates
        shared = own = 0
        start = time.monotonic()
        try:
            while not self._halt.is_set():
                elapsed = time.monotonic() - start
                shared_upto = int(elapsed * shared_rate) + 1
                own_upto = int(elapsed * own_rate) + 1
                due = [SHARED] * (shared_upto - shared)
                due += [self.own[k % len(self.own)] for k in range(own, own_upto)]
                shared, own = shared_upto, own_upto
                if due:
                    # Whatever fell due since the last wake-up, in one pipeline:
                    # a late wake-up never lowers the rate.
                    self.publisher.send(due)
                self._halt.wait(0.01)
        except BaseException as exc:  # reported by halt()
            self.error = exc

    def halt(self) -> dict[str, int]:
        """Stop publishing; return how many went out per topic."""
        self._halt.set()
        self.join(timeout=10)
        if self.error is not None:
            raise RuntimeError(f"publisher failed: {self.error!r}")
        self.publisher.close()
        return self.publisher.expected()


class Observer(threading.Thread):
    """Samples the listening socket's accept queue and the gunicorn master's workers.

    With `profile`, py-spy records the new worker from its fork until `halt()`.
    """

    def __init__(self, master: int, old_worker: int, port: int, profile: Path | None) -> None:
        super().__init__(daemon=True, name="storm-observer")
        self.master = psutil.Process(master)
        self.old_worker = old_worker
        self.port = port
        self.profile = profile
        self.profiler: subprocess.Popen | None = None
        self.new_worker: psutil.Process | None = None
        self.forked_ms: float | None = None
        self.limit: int | None = None
        # (epoch ms, connections waiting in the accept queue)
        self.queue: list[tuple[float, int]] = []
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            at = now_ms()
            if self.new_worker is None:
                fresh = [c for c in self.master.children() if c.pid != self.old_worker]
                if fresh:
                    self.new_worker, self.forked_ms = fresh[0], at
                    if self.profile is not None:
                        self.profiler = subprocess.Popen(
                            [
                                str(VENV_BIN / "py-spy"),
                                *("record", "--pid", str(fresh[0].pid), "--format", "raw"),
                                *("--rate", "200", "--nonblocking", "--output", str(self.profile)),
                            ],
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL,
                        )
            socket = listening_socket(self.port)
            if socket is not None:
                self.limit = socket.limit
                self.queue.append((at, socket.queued))
            self._halt.wait(0.02)

    def halt(self) -> None:
        """Stop sampling (and profiling)."""
        self._halt.set()
        self.join(timeout=10)
        if self.profiler is not None:
            self.profiler.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            self.profiler.wait(timeout=30)

    def peak(self) -> tuple[int, float | None]:
        """The most connections queued at once, and when."""
        if not self.queue:
            return 0, None
        at, queued = max(self.queue, key=lambda sample: sample[1])
        return queued, at

    def drained(self) -> float | None:
        """When the queue was first empty again after its peak."""
        queued, peak_at = self.peak()
        if not queued:
            return None
        return next((at for at, n in self.queue if at > peak_at and n == 0), None)


# -- the run ---------------------------------------------------------------------------


def quantile(values: list[float], q: float) -> float:
    """Nearest-rank q-quantile."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))]


def spread(values: list[float]) -> str:
    """min / p10 / p50 / p90 / max of seconds-or-ms values, as text."""
    if not values:
        return "none"
    qs = [min(values), quantile(values, 0.1), quantile(values, 0.5), quantile(values, 0.9)]
    return " / ".join(f"{v:.0f}" for v in [*qs, max(values)])


def histogram(times_s: Iterable[float], width: float = 0.1, rows: int = 12) -> list[str]:
    """Text bars of how many events fell in each `width`-second bucket."""
    buckets = Counter(int(t / width) for t in times_s)
    if not buckets:
        return []
    top = max(buckets.values())
    lines = []
    for b in range(min(buckets), min(max(buckets), min(buckets) + rows - 1) + 1):
        n = buckets.get(b, 0)
        lines.append(
            f"    {b * width:5.1f}-{(b + 1) * width:4.1f} s {n:6d} {'#' * round(40 * n / top)}"
        )
    rest = sum(n for b, n in buckets.items() if b > min(buckets) + rows - 1)
    if rest:
        lines.append(f"    later        {rest:6d}")
    return lines


@dataclass
class Storm:
    """Everything one run measured."""

    sizes: Sizes
    results: list[ClientResult]
    kill_ms: float
    all_back_s: float | None
    forked_s: float | None
    queue_limit: int | None
    peak_queued: int
    peak_at_s: float | None
    drained_s: float | None
    counters: ListenCounters | None
    published: dict[str, int]
    backlog: int
    worker_cpu_s: float | None
    # CPU seconds from the kill until every client was back, by who spent them.
    cpu: dict[str, float]
    # The machine's 1-minute load average just before the kill.
    load_at_kill: float


def _own_cpu(pid: int) -> float:
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return times.user + times.system


def machine_busy() -> float:
    """CPU seconds every core of the machine spent busy since boot."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def cpu_snapshot(stack: Stack, node: NodeClients, master: int) -> dict[str, float]:
    """CPU seconds so far of each part of the run (the web worker is counted apart)."""
    assert stack.redis_server.process is not None
    return {
        "gunicorn master": _own_cpu(master),
        "Node clients": node.cpu(),
        "Celery": cpu_seconds(worker.pid for worker in stack.workers),
        "Redis": _own_cpu(stack.redis_server.process.pid),
        "harness (Python clients, publisher)": _own_cpu(os.getpid()),
        "machine": machine_busy(),
    }


def wait_back(
    node: NodeClients, pythons: list[PythonClient], total: int, deadline: float
) -> float | None:
    """Poll until every client is back; return when the last one was, or None at the deadline."""
    while time.monotonic() < deadline:
        back, _ = node.stat()
        back += sum(1 for client in pythons if client.disconnects and client.back())
        if back >= total:
            return now_ms()
        time.sleep(0.05)
    return None


def wait_delivered(
    node: NodeClients, pythons: list[PythonClient], expected: int, idle: float = 10
) -> int:
    """Poll until `expected` deliveries arrived, or none for `idle` seconds; return the count."""
    last, since = -1, time.monotonic()
    while True:
        _, got = node.stat()
        got += sum(client.delivered() for client in pythons)
        if got >= expected:
            return got
        if got != last:
            last, since = got, time.monotonic()
        elif time.monotonic() - since > idle:
            return got
        time.sleep(0.1)


CGROUP_CPU = Path("/sys/fs/cgroup/cpu")  # cgroup v1's cpu controller


@contextlib.contextmanager
def cpu_limited(pid: int, fraction: float) -> Iterator[None]:
    """Hold `pid`, and what it forks from now on, to `fraction` of one core (cgroup v1 cpu)."""
    if not (CGROUP_CPU / "cgroup.procs").is_file():
        raise RuntimeError(f"--worker-cpu needs cgroup v1's cpu controller at {CGROUP_CPU}")
    group = CGROUP_CPU / f"tidings-storm-{os.getpid()}"
    group.mkdir()
    try:
        (group / "cpu.cfs_period_us").write_text("100000")
        (group / "cpu.cfs_quota_us").write_text(str(int(fraction * 100000)))
        (group / "cgroup.procs").write_text(str(pid))
        yield
    finally:
        for member in (group / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):  # gone already
                (CGROUP_CPU / "cgroup.procs").write_text(member)
        group.rmdir()


def run(
    sizes: Sizes,
    log: Any = print,
    profile: Path | None = None,
    backlog: int | None = None,
    worker_cpu: float | None = None,
) -> Storm:
    """Run one storm and return what it measured.

    `backlog` overrides gunicorn.conf.py's; `worker_cpu` holds the new web
    worker to that fraction of a core (a starved worker, deterministically).
    """
    ensure_node_modules()
    lean = sizes.clients - sizes.browser_clients - sizes.python_clients
    node_n = sizes.browser_clients + lean
    env = {
        # Every client comes from loopback.
        "TIDINGS_MAX_CONNECTIONS_PER_IP": "1000000",
    }
    if backlog is not None:
        env["GUNICORN_CMD_ARGS"] = f"--backlog {backlog}"
    if sizes.clients > 9000:
        env["TIDINGS_WORKER_CONNECTIONS"] = str(sizes.clients + 1000)
    with small_stack("tidings-storm-", **env) as stack, contextlib.ExitStack() as limits:
        assert stack.web is not None
        master = stack.web.pid
        [worker] = psutil.Process(master).children()
        log(f"stack up ({stack.directory}); connecting {sizes.clients} clients")
        pythons = [PythonClient(stack.url, i) for i in range(sizes.python_clients)]
        node = NodeClients(stack.url, sizes.browser_clients, lean, stack.directory)
        try:
            for client in pythons:
                client.connect()
                for topic in client.topics:
                    ack = client.subscribe(topic)
                    if not ack.get("ok"):
                        raise RuntimeError(f"python client refused: {ack}")
            node.wait_ready()
            own = [f"{NODE_PREFIX}{i}" for i in range(node_n)]
            own += [f"{PY_PREFIX}{i}" for i in range(sizes.python_clients)]
            load = SteadyLoad(stack.redis_server.url(0), own, sizes.shared_rate, sizes.own_rate)
            load.start()
            log(f"all subscribed; publishing, {sizes.warmup:g} s before the kill")
            time.sleep(sizes.warmup)  # steady state before the kill: a duration, not a sync
            before = listen_counters()
            observer = Observer(master, worker.pid, stack.port, profile)
            observer.start()
            cpu_before = cpu_snapshot(stack, node, master)
            mark = now_ms()
            node.mark(mark)
            for client in pythons:
                client.mark_ms = mark
            if worker_cpu is not None:
                # The master, and so the worker it forks next.
                limits.enter_context(cpu_limited(master, worker_cpu))
            load_at_kill = os.getloadavg()[0]
            kill_ms = now_ms()
            os.kill(worker.pid, signal.SIGKILL)
            log(f"SIGKILL to worker {worker.pid}; waiting for every client to come back")
            back_ms = wait_back(node, pythons, sizes.clients, time.monotonic() + sizes.deadline)
            cpu_after = cpu_snapshot(stack, node, master)
            cpu = None
            if observer.new_worker is not None:
                cpu = _own_cpu(observer.new_worker.pid)
            observer.halt()
            after = listen_counters()
            spent = {key: cpu_after[key] - cpu_before[key] for key in cpu_before}
            spent["new web worker"] = cpu or 0.0
            spent["everything else on the machine"] = spent.pop("machine") - sum(spent.values())
            time.sleep(sizes.after)  # live publications after the storm: a duration
            published = load.halt()
            expected = sum(published.get(SHARED, 0) + published.get(t, 0) for t in own)
            log("publisher stopped; waiting for the last deliveries")
            wait_delivered(node, pythons, expected)
            results = node.results(published)
            results += [client.result(published) for client in pythons]
        finally:
            for client in pythons:
                client.disconnect()
            node.close()
        peak, peak_at = observer.peak()
        drained = observer.drained()
        return Storm(
            sizes=sizes,
            results=results,
            kill_ms=kill_ms,
            all_back_s=None if back_ms is None else (back_ms - kill_ms) / 1000,
            forked_s=None if observer.forked_ms is None else (observer.forked_ms - kill_ms) / 1000,
            queue_limit=observer.limit,
            peak_queued=peak,
            peak_at_s=None if peak_at is None else (peak_at - kill_ms) / 1000,
            drained_s=None if drained is None else (drained - kill_ms) / 1000,
            counters=None if before is None or after is None else after - before,
            published=published,
            backlog=backlog or stack.settings.backlog,
            worker_cpu_s=cpu,
            cpu=spent,
            load_at_kill=load_at_kill,
        )


# -- the report -----------------------------------------------------------------------


def _p50_p99_max(values: list[float]) -> str:
    if not values:
        return "none"
    return f"{quantile(values, 0.5):.2f} / {quantile(values, 0.99):.2f} / {max(values):.2f}"


def first_attempts(results: Iterable[ClientResult]) -> list[float]:
    """Each client's delay, in ms, from its disconnect to its first reconnection attempt."""
    return [
        r.attempts[0] - r.disconnected_ms
        for r in results
        if r.attempts and r.disconnected_ms is not None
    ]


def mix(kinds: Counter[str]) -> str:
    """Which clients, how many of each."""
    return (
        f"tidings.js: {kinds['socket.io-client']:,} on socket.io-client, "
        f"{kinds['leanio']:,} on leanio.js; tidings.client: {kinds['python']:,}"
    )


def summary(storm: Storm) -> tuple[list[str], str]:
    """The printed lines and the one-line result for RESULTS.md."""
    results = storm.results
    sizes = storm.sizes

    def after_kill(values: Iterable[float | None]) -> list[float]:
        return [(v - storm.kill_ms) / 1000 for v in values if v is not None]

    back = after_kill(r.back_ms for r in results)
    missing = len(results) - len(back)
    # A client that never came back has lost nothing yet: what it misses is
    # pending, in history, until it resubscribes.
    lost = sum(r.lost for r in results if r.back_ms is not None)
    pending = sum(r.lost for r in results if r.back_ms is None)
    twice = sum(r.twice for r in results)
    disorder = sum(r.out_of_order for r in results)
    gaps = sum(r.gaps for r in results)
    unexpected = sum(r.unexpected for r in results)
    delivered = sum(r.delivered for r in results)
    wire = sum(r.wire for r in results)
    refused = [r.refused for r in results if r.refused]
    own_published = sum(storm.published.values()) - storm.published.get(SHARED, 0)
    kinds = Counter(r.kind for r in results)
    limits = kernel_limits()
    ok = not missing and bool(back) and max(back) <= TARGET_S and lost == twice == gaps == 0
    verdict = "met" if ok else "**missed**"
    lines = [
        f"storm: {len(results):,} clients ({mix(kinds)}), each on 1 shared + 1 own topic, "
        f"one gunicorn worker SIGKILLed (load average {storm.load_at_kill:.2f})",
        f"  new worker forked after {storm.forked_s:.2f} s"
        if storm.forked_s is not None
        else "  new worker: not seen",
        "  timeline, s after the kill (p50 / p99 / max): disconnect noticed "
        f"{_p50_p99_max(after_kill(r.disconnected_ms for r in results))}; connected again "
        f"{_p50_p99_max(after_kill(r.connected_ms for r in results))}; resubscribed "
        f"{_p50_p99_max(back)}",
    ]
    if storm.peak_at_s is not None:
        lines.append(
            f"  accept queue: {storm.peak_queued} waiting at its peak, {storm.peak_at_s:.2f} s "
            "after the kill; empty again at "
            + (f"{storm.drained_s:.2f} s" if storm.drained_s is not None else "(never sampled)")
        )
    if back:
        lines.append(
            f"  back and resubscribed, from the kill: p50 {quantile(back, 0.5):.2f} s, "
            f"p99 {quantile(back, 0.99):.2f} s, max {max(back):.2f} s; "
            + (
                f"{missing} never came back within {sizes.deadline:g} s"
                if missing
                else f"all {len(results):,} back after {storm.all_back_s:.2f} s"
            )
        )
        lines += ["  clients back, by time after the kill:", *histogram(back, width=0.5)]
    for kind in KINDS:
        mine = [r for r in results if r.kind == kind]
        if not mine:
            continue
        mine_back = after_kill(r.back_ms for r in mine)
        attempts = [len(r.attempts) for r in mine]
        first = first_attempts(mine)
        lines.append(
            f"  {kind}: back p50 {quantile(mine_back, 0.5):.2f} s, max {max(mine_back):.2f} s; "
            f"reconnection attempts per client mean {statistics.mean(attempts):.2f}, "
            f"max {max(attempts)}; subscribes asked again {sum(r.retries for r in mine)}"
            if mine_back
            else f"  {kind}: none back"
        )
        lines.append(
            f"  {kind}: first attempt after the disconnect, ms (min/p10/p50/p90/max): "
            f"{spread(first)}"
            + (f", std dev {statistics.pstdev(first):.0f} ms" if len(first) > 1 else "")
        )
        reasons = Counter(reason for r in mine for reason in r.reasons)
        if reasons:
            lines.append(f"  {kind}: disconnect reasons {dict(reasons)}")
    attempts_at = after_kill(r.attempts[0] if r.attempts else None for r in results)
    lines += ["  first reconnection attempts, by time after the kill:", *histogram(attempts_at)]
    lines.append(
        f"  durable publications: {storm.published.get(SHARED, 0):,} on the shared topic "
        f"({sizes.shared_rate:g}/s), {own_published:,} on own topics "
        f"({sizes.own_rate:g}/s in all); delivered {delivered:,}: lost {lost}, "
        f"twice {twice}, out of order {disorder}, gaps reported {gaps}, unexpected "
        f"{unexpected}; {wire - delivered:,} copies on the wire dropped by the clients' "
        "offset check"
        + (f"; {pending:,} not delivered to the {missing} clients not back" if missing else "")
    )
    if refused:
        lines.append(f"  refused: {len(refused)} ({refused[:3]})")
    if limits is not None:
        queue = (
            f"accept queue {storm.queue_limit} (the socket's, as ss shows it)"
            if storm.queue_limit is not None
            else "accept queue unknown (not Linux)"
        )
        lines.append(
            f"  kernel: gunicorn backlog {storm.backlog}, net.core.somaxconn {limits.somaxconn}, "
            f"tcp_max_syn_backlog {limits.max_syn_backlog}, tcp_syncookies {limits.syncookies}: "
            f"{queue}; peak queued {storm.peak_queued}"
        )
    if storm.counters is not None:
        lines.append(
            f"  ListenOverflows +{storm.counters.overflows}, ListenDrops +{storm.counters.drops} "
            "during the storm (host-wide counters)"
        )
    cores = os.cpu_count() or 1
    if storm.all_back_s is not None:
        lines.append(
            f"  CPU from the kill until all were back ({storm.all_back_s:.1f} s x {cores} cores"
            f" = {storm.all_back_s * cores:.1f} core-s): "
            + ", ".join(
                f"{who} {seconds:.1f} s"
                for who, seconds in sorted(storm.cpu.items(), key=lambda item: -item[1])
            )
        )
    lines.append(f"  target: all back within {TARGET_S:g} s, nothing lost: {verdict}")

    cpu = storm.cpu
    result = (
        f"{len(results):,} clients ({mix(kinds)}) on one gunicorn worker, SIGKILLed under "
        f"{sizes.shared_rate:g} + {sizes.own_rate:g} durable publications/s, load average "
        f"{storm.load_at_kill:.2f} at the kill: "
        + (
            f"**all back and resubscribed {max(back):.1f} s** after the kill "
            f"(p50 {quantile(back, 0.5):.1f} s, p99 {quantile(back, 0.99):.1f} s; "
            if back and not missing
            else f"**{missing} not back** within {sizes.deadline:g} s ("
        )
        + f"new worker forked at {storm.forked_s or 0:.2f} s); "
        f"**lost {lost}, twice {twice}**, out of order {disorder}, gaps {gaps}, of "
        f"{delivered:,} deliveries"
        + (f" ({pending:,} pending for the clients not back)" if missing else "")
        + "; first reconnection attempt after the disconnect, ms "
        "(min/p10/p50/p90/max): "
        + "; ".join(
            f"{kind} {spread(first_attempts(r for r in results if r.kind == kind))}"
            for kind in KINDS
            if kinds[kind]
        )
        + f"; accept queue {storm.queue_limit} = min(backlog {storm.backlog}, somaxconn "
        f"{limits.somaxconn if limits else '?'}), peak {storm.peak_queued} queued, "
        + (
            f"ListenOverflows +{storm.counters.overflows}"
            if storm.counters is not None
            else "ListenOverflows unknown"
        )
        + (
            f"; CPU until all back: web worker {cpu.get('new web worker', 0):.1f} s, "
            f"Node clients {cpu.get('Node clients', 0):.1f} s, others on the machine "
            f"{cpu.get('everything else on the machine', 0):.1f} s of "
            f"{storm.all_back_s * cores:.1f} core-s"
            if storm.all_back_s is not None
            else ""
        )
        + f"; target (20 s, nothing lost) {verdict}"
    )
    return lines, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, help="all clients (default 5000; --quick 50)")
    parser.add_argument(
        "--browser-clients", type=int, help="of which tidings.js on socket.io-client (a tenth)"
    )
    parser.add_argument("--python-clients", type=int, help="of which Python (default 20)")
    parser.add_argument("--quick", action="store_true", help="a small storm, for a smoke test")
    parser.add_argument("--no-record", action="store_true", help="do not write RESULTS.md")
    parser.add_argument(
        "--profile", type=Path, help="py-spy the new worker into this file (raw collapsed stacks)"
    )
    parser.add_argument(
        "--backlog",
        type=int,
        help="gunicorn's backlog instead of gunicorn.conf.py's (not recorded)",
    )
    parser.add_argument(
        "--worker-cpu",
        type=float,
        help="hold the new worker to this fraction of a core (cgroup v1, root; not recorded)",
    )
    args = parser.parse_args()
    sizes = Sizes(**vars(QUICK)) if args.quick else Sizes()
    if args.clients is not None:
        # The default mix at any size: a tenth tidings.js, up to 20 Python.
        sizes.clients = args.clients
        sizes.browser_clients = args.clients // 10
        sizes.python_clients = min(20, args.clients // 10)
    if args.browser_clients is not None:
        sizes.browser_clients = args.browser_clients
    if args.python_clients is not None:
        sizes.python_clients = args.python_clients
    if min(sizes.browser_clients, sizes.python_clients) < 0 or (
        sizes.browser_clients + sizes.python_clients > sizes.clients
    ):
        parser.error("--browser-clients and --python-clients must add up to at most --clients")
    storm = run(
        sizes,
        log=lambda line: print(line, file=sys.stderr, flush=True),
        profile=args.profile,
        backlog=args.backlog,
        worker_cpu=args.worker_cpu,
    )
    lines, result = summary(storm)
    print("\n".join(lines))
    if not (args.no_record or args.quick or args.backlog or args.profile or args.worker_cpu):
        command = "python -m bench.storm " + " ".join(sys.argv[1:])
        record_separate(RESULTS, "storm", command.strip(), result)
    failed = any(r.lost or r.twice or r.out_of_order or r.gaps for r in storm.results) or (
        storm.all_back_s is None
    )
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
