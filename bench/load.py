"""The load: Node client processes (bench/peers/loadgen.js) and a pipelined publisher."""

from __future__ import annotations

import json
import math
import os
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import PIPE, Popen
from typing import Any, Self

import redis
import websocket
from hiredis import pack_command

from bench.measure import cpu_seconds
from bench.systems import PEERS, node_binary

TOPIC_PREFIX = "tidings:topic:"
INGEST_STREAM = "tidings:ingest"
# How a `publications` event's frame starts (a Socket.IO EVENT packet, no ack id).
PUBLICATIONS = '42["publications"'


def now_ms() -> float:
    """Wall-clock milliseconds: what publications carry and clients compare with."""
    return time.time() * 1000


class LoadError(RuntimeError):
    """The load generator could not do what it was asked."""


@dataclass
class Delivery:
    """What the clients of one measurement received, merged over generator processes."""

    clients: int = 0
    ready: int = 0
    delivered: int = 0
    duplicated: int = 0
    lost: int = 0
    unexpected: int = 0
    events: int = 0
    unexpected_closes: int = 0
    last_ms: float = 0.0
    latencies: array = field(default_factory=lambda: array("d"))
    # With `trace`: the sequence number (`n`) of each latency.
    sequence: array = field(default_factory=lambda: array("d"))
    errors: list[str] = field(default_factory=list)

    def percentile(self, q: float) -> float | None:
        """Return the q-quantile of the latencies in ms (nearest rank), None if none."""
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        rank = max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))
        return ordered[rank]


class NodeProcesses:
    """Node processes of bench/peers, each driven by JSON lines: commands in, events out."""

    def __init__(self, script: str, configs: list[dict[str, Any]], *, workdir: Path) -> None:
        node = node_binary()
        if node is None:
            raise LoadError("node not found: the load generator needs Node.js")
        self.workdir = workdir
        self.name = Path(script).stem
        workdir.mkdir(parents=True, exist_ok=True)
        self.procs: list[Popen] = []
        for index, config in enumerate(configs):
            with open(workdir / f"{self.name}{index}.err", "ab") as errors:
                self.procs.append(
                    Popen(
                        # BENCH_LOADGEN_NODE_ARGS: e.g. --cpu-prof, to profile the generator.
                        [
                            node,
                            *os.environ.get("BENCH_LOADGEN_NODE_ARGS", "").split(),
                            str(PEERS / script),
                            json.dumps(config),
                        ],
                        cwd=workdir,
                        stdin=PIPE,
                        stdout=PIPE,
                        stderr=errors,
                        text=True,
                        bufsize=1,
                    )
                )

    # -- the line protocol ------------------------------------------------------

    def _read(self, proc: Popen, event: str) -> dict[str, Any]:
        assert proc.stdout is not None
        while True:
            line = proc.stdout.readline()
            if not line:
                logs = self.workdir / f"{self.name}*.err"
                raise LoadError(f"a {self.name} process exited (see {logs})")
            message = json.loads(line)
            if message.get("event") == event:
                return message

    def _ask(self, command: dict[str, Any], event: str) -> list[dict[str, Any]]:
        line = json.dumps(command) + "\n"
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(line)
            proc.stdin.flush()
        return [self._read(proc, event) for proc in self.procs]

    def cpu(self) -> float:
        """CPU seconds the processes used so far."""
        return cpu_seconds(proc.pid for proc in self.procs if proc.poll() is None)

    def close(self) -> None:
        """Close every client and end the processes."""
        for proc in self.procs:
            try:
                assert proc.stdin is not None
                proc.stdin.write(json.dumps({"cmd": "close"}) + "\n")
                proc.stdin.flush()
            except (BrokenPipeError, OSError):
                pass
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except Exception:
                proc.kill()
                proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class Generators(NodeProcesses):
    """Several loadgen.js processes sharing `clients` connections to one system.

    `transport` is "websocket" (Socket.IO clients) or "sse" (`GET /sse`
    streams, Tidings only).
    """

    def __init__(
        self,
        url: str,
        clients: int,
        *,
        processes: int,
        topics: list[str],
        own_prefix: str | None = None,
        concurrency: int = 100,
        local_address: str | None = None,
        trace: bool = False,
        transport: str = "websocket",
        workdir: Path,
    ) -> None:
        self.clients = clients
        # Subscribes the server answered `unavailable` (the generator retries them).
        self.subscribe_retries = 0
        processes = max(1, min(processes, clients or 1))
        share, extra = divmod(clients, processes)
        configs = []
        first = 0
        for index in range(processes):
            count = share + (1 if index < extra else 0)
            configs.append(
                {
                    "url": url,
                    "count": count,
                    "first": first,
                    "topics": topics,
                    "own_prefix": own_prefix,
                    "concurrency": concurrency,
                    "local_address": local_address,
                    "trace": trace,
                    "transport": transport,
                }
            )
            first += count
        super().__init__("loadgen.js", configs, workdir=workdir)

    # -- what the harness uses ---------------------------------------------------

    def wait_ready(self) -> tuple[float, int, list[str]]:
        """Wait until every client is subscribed; return (seconds, failed, errors)."""
        answers = [self._read(proc, "ready") for proc in self.procs]
        start = min(a["started_ms"] for a in answers)
        end = max(a["started_ms"] + a["connect_ms"] for a in answers)
        errors = [e for a in answers for e in a["errors"]]
        self.subscribe_retries = sum(a.get("subscribe_retries", 0) for a in answers)
        return (end - start) / 1000, sum(a["failed"] for a in answers), errors

    def stat(self) -> dict[str, float]:
        """Return the merged counters: received, open, ready, unexpected_closes, ..., last_ms."""
        answers = self._ask({"cmd": "stat"}, "stat")
        merged: dict[str, float] = Counter()
        for answer in answers:
            for key in (
                "received",
                "events",
                "open",
                "ready",
                "failed",
                "unexpected_closes",
                "server_closes",
                "keepalives",
            ):
                merged[key] += answer[key]
        merged["last_ms"] = max(a["last_ms"] for a in answers)
        return merged

    def wait_received(self, total: int, *, idle: float, deadline: float) -> float:
        """Wait until `total` publications arrived, or none arrived for `idle` seconds."""
        last_count, last_change = -1, time.monotonic()
        while True:
            received = self.stat()["received"]
            now = time.monotonic()
            if received >= total or now > deadline:
                return received
            if received != last_count:
                last_count, last_change = received, now
            elif now - last_change > idle:
                return received
            time.sleep(0.02)

    def reset(self) -> None:
        """Forget what was received so far."""
        self._ask({"cmd": "reset"}, "reset")

    def _ask_with_files(self, command: dict[str, Any], event: str) -> list[dict[str, Any]]:
        """Send `command` with a latency file of its own to each process; return the answers."""
        for proc, path in zip(self.procs, self._latency_files(), strict=True):
            assert proc.stdin is not None
            proc.stdin.write(json.dumps({**command, "latfile": str(path)}) + "\n")
            proc.stdin.flush()
        return [self._read(proc, event) for proc in self.procs]

    def _latency_files(self) -> list[Path]:
        return [self.workdir / f"latencies{i}.bin" for i in range(len(self.procs))]

    def window(self) -> array:
        """Return the latencies (ms) received since the last window, and forget them."""
        self._ask_with_files({"cmd": "window"}, "window")
        latencies = array("d")
        for path in self._latency_files():
            latencies.frombytes(path.read_bytes())
            path.unlink()
            path.with_name(path.name + ".n").unlink(missing_ok=True)
        return latencies

    def report(self, expected: dict[str, int]) -> Delivery:
        """Return what every client received, against `expected` publications per topic."""
        files = self._latency_files()
        answers = self._ask_with_files({"cmd": "report", "expected": expected}, "report")
        result = Delivery()
        for answer, path in zip(answers, files, strict=True):
            result.clients += answer["clients"]
            result.ready += answer["ready"]
            result.delivered += answer["delivered"]
            result.duplicated += answer["duplicated"]
            result.lost += answer["lost"]
            result.unexpected += answer["unexpected"] + answer["stray"]
            result.events += answer["events"]
            result.unexpected_closes += answer["unexpected_closes"]
            result.last_ms = max(result.last_ms, answer["last_ms"])
            result.errors += answer["errors"]
            chunk = array("d")
            chunk.frombytes(path.read_bytes())
            result.latencies.extend(chunk)
            path.unlink()
            numbers = path.with_name(path.name + ".n")
            if numbers.exists():
                chunk = array("d")
                chunk.frombytes(numbers.read_bytes())
                result.sequence.extend(chunk)
                numbers.unlink()
        return result


class Publisher:
    """Publishes {"t": <epoch ms>, "n": <per-topic sequence>} on one Redis, pipelined.

    Commands are packed by hiredis and written on one kept connection, the
    replies read back after: about 4x cheaper than redis-py's pipeline
    objects (300,000 PUBLISH or 200,000 XADD per second of one core here), so
    the publisher takes less of the machine the servers share with it.
    """

    def __init__(self, redis_url: str, *, durable: bool = False) -> None:
        self.redis = redis.Redis.from_url(redis_url)
        self._connection = self.redis.connection_pool.get_connection()
        self.durable = durable
        self.sequence: Counter[str] = Counter()

    def restart(self) -> None:
        """Number every topic from 0 again."""
        self.sequence.clear()

    def expected(self) -> dict[str, int]:
        """How many publications each topic got since `restart()`."""
        return dict(self.sequence)

    def _command(self, topic: str, stamp: float) -> bytes:
        n = self.sequence[topic]
        self.sequence[topic] = n + 1
        payload = f'{{"t":{stamp:.3f},"n":{n}}}'
        if self.durable:
            return pack_command(("XADD", INGEST_STREAM, "*", "topic", topic, "data", payload))
        return pack_command(("PUBLISH", TOPIC_PREFIX + topic, payload))

    def send(self, topics: list[str]) -> None:
        """Publish one publication to each of `topics`, in one round trip."""
        if not topics:
            return
        stamp = now_ms()
        self._connection.send_packed_command([b"".join(self._command(t, stamp) for t in topics)])
        for _ in topics:
            self._connection.read_response()

    def burst(self, topic: str, count: int, chunk: int = 100) -> None:
        """Publish `count` publications to `topic` as fast as Redis takes them."""
        self.burst_over([topic], count, chunk)

    def burst_over(self, topics: list[str], count: int, chunk: int = 100) -> None:
        """Publish `count` publications round robin over `topics`, as fast as Redis takes them."""
        for start in range(0, count, chunk):
            end = min(start + chunk, count)
            self.send([topics[k % len(topics)] for k in range(start, end)])

    def paced(self, streams: list[tuple[float, Callable[[int], str]]], seconds: float) -> None:
        """Publish each stream at its rate for `seconds`; stream k-th topic is topic_of(k).

        Whatever fell due since the last wake-up goes out in one pipeline, so
        a late wake-up never lowers the rate; each publication is stamped
        when it is sent, so the publisher's lateness is not counted as latency.
        """
        totals = [int(rate * seconds) for rate, _ in streams]
        sent = [0] * len(streams)
        start = time.monotonic()
        while sent != totals:
            elapsed = time.monotonic() - start
            due: list[str] = []
            for k, (rate, topic_of) in enumerate(streams):
                upto = min(totals[k], int(elapsed * rate) + 1)
                due += [topic_of(i) for i in range(sent[k], upto)]
                sent[k] = max(sent[k], upto)
            if due:
                self.send(due)
            pending = [sent[k] / rate for k, (rate, _) in enumerate(streams) if sent[k] < totals[k]]
            if pending:
                time.sleep(max(0.0, start + min(pending) - time.monotonic()))

    def close(self) -> None:
        """Close the Redis connection."""
        self.redis.connection_pool.release(self._connection)
        self.redis.close()


class RawClientError(RuntimeError):
    """A raw client's server did not answer as the protocol says, or not in time."""


class RawClient:
    """One Socket.IO client on a websocket, its frames read by hand: each step visible, cheap."""

    def __init__(self, url: str, timeout: float = 10) -> None:
        self.timeout = timeout
        self.ack_id = 0
        # Sees every text frame as it is read (whoever waits for what).
        self.on_frame: Callable[[str], None] = lambda frame: None
        self.ws = websocket.create_connection(
            url.replace("http", "ws", 1) + "/socket.io/?EIO=4&transport=websocket",
            timeout=timeout,
            skip_utf8_validation=True,
        )
        try:
            self.until(lambda frame: frame.startswith("0"), "engine.io open")
            self.ws.send("40")
            self.until(lambda frame: frame.startswith("40"), "namespace connect")
        except BaseException:
            self.ws.shutdown()
            raise

    def frames(self, seconds: float) -> Iterator[str]:
        """Yield the text frames that arrive within `seconds`, answering engine.io's pings."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.ws.settimeout(left)
            try:
                frame = self.ws.recv()
            except websocket.WebSocketTimeoutException:
                return
            if not isinstance(frame, str):
                continue
            if frame == "2":
                self.ws.send("3")
                continue
            self.on_frame(frame)
            yield frame

    def until(self, found: Callable[[str], bool], what: str) -> str:
        """Read frames until one is `found`; raise if none is within the timeout."""
        for frame in self.frames(self.timeout):
            if found(frame):
                return frame
        raise RawClientError(f"no {what} within {self.timeout:g}s")

    def call(self, event: str, topic: str) -> dict[str, Any]:
        """Emit `event` {"topic"} and return its ack; a refusal raises."""
        self.ack_id += 1
        ack = f"43{self.ack_id}["
        self.ws.send(f"42{self.ack_id}" + json.dumps([event, {"topic": topic}]))
        frame = self.until(lambda f: f.startswith(ack), f"{event} ack")
        answer = json.loads(frame[len(ack) - 1 :])
        if not answer or not isinstance(answer[0], dict) or not answer[0].get("ok"):
            raise RawClientError(f"{event} {topic}: {answer}")
        return answer[0]

    def close(self) -> None:
        """Drop the connection at once (no close handshake)."""
        self.ws.shutdown()
