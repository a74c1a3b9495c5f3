"""What presence costs: CPU of churn with presence on and off; read latency at 10,000 members.

    .venv/bin/python -m bench.presence [--part all|churn|reads] [--clients 1000] [--rate 50]
        [--seconds 20] [--rounds 5] [--members 10000] [--calls 1000] [--baseline COMMIT]
        [--no-record]

Churn: three web nodes (one gunicorn worker each, a Redis each), the same
but for TIDINGS_PRESENCE_TOPICS: off, on, and on with join/leave events.
Each holds `--clients` connections (four tabs per user, tokens with `sub`),
each subscribed to one of 50 topics; in each round, every node in turn
gets `--rate` moves per second for `--seconds` (a client leaves its topic
and joins another: one join and one leave), and the web worker's CPU
seconds over that window are read with psutil. Rounds alternate the order;
medians.

Reads: three web nodes on one Redis, `--members` clients (5,000 on each of
the first two with the default), each a user of its own, on one presence
topic; then a Socket.IO client on a member node, and one on the third node,
each call `presence_stats` `--calls` times and `presence` a tenth as often,
one after the other, and the HTTP route is asked as often; the latency is
the round trip as the caller sees it.

`--baseline COMMIT` adds a fourth node running that commit's code (exported
with `git archive`), e.g. the commit before presence, to show what the
hooks cost with presence off.

Needs Node.js (bench/peers/presence.js holds the clients).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from subprocess import PIPE, Popen
from typing import Any

import psutil
import requests
import socketio

from bench.measure import cpu_seconds
from bench.report import RESULTS, record_separate
from bench.systems import PEERS, export, node_binary
from tests.presence_support import API_KEY, SECRET, token
from tests.support import VENV_BIN, Proc, RedisServer, Stack, wait_for

TOPICS = [f"room.{i}" for i in range(50)]
TABS = 4
SYSTEMS = {
    "off": {},
    "on": {"TIDINGS_PRESENCE_TOPICS": "room.*"},
    "joins": {"TIDINGS_PRESENCE_TOPICS": "room.*", "TIDINGS_JOIN_LEAVE_TOPICS": "room.*"},
}
BASE_ENV = {
    "TIDINGS_SECRET": SECRET,
    "TIDINGS_API_KEY": API_KEY,
    # One loopback address holds every client: no per-IP cap here.
    "TIDINGS_MAX_CONNECTIONS_PER_IP": "1000000",
    "TIDINGS_LOG_LEVEL": "WARNING",
}


class Clients:
    """One presence.js process: `count` clients of one node, driven by stdin commands."""

    def __init__(self, url: str, tokens: Path, first: int, count: int, topics: list[str]) -> None:
        node = node_binary()
        if node is None:
            raise SystemExit("bench.presence needs Node.js (node) for its clients")
        config = {"url": url, "tokens": str(tokens), "first": first, "count": count}
        self.proc = Popen(
            [node, str(PEERS / "presence.js"), json.dumps({**config, "topics": topics})],
            stdin=PIPE,
            stdout=PIPE,
            text=True,
        )

    def read(self, event: str) -> dict[str, Any]:
        """Wait for the next line of the process and check it is `event`."""
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("presence.js exited")
        answer = json.loads(line)
        if answer.get("event") != event:
            raise RuntimeError(f"expected {event}, got {answer}")
        return answer

    def ready(self) -> None:
        """Wait until every client is subscribed; fail if any could not."""
        answer = self.read("ready")
        if answer["failed"]:
            raise RuntimeError(f"{answer['failed']} clients failed: {answer['errors']}")

    def send(self, **command: Any) -> None:
        """Send one command."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        """Close the clients and end the process."""
        if self.proc.poll() is None:
            self.send(cmd="close")
            self.proc.wait(timeout=30)


def write_tokens(path: Path, subs: list[str]) -> Path:
    """One token per line, for the clients."""
    path.write_text("\n".join(token(sub, ["room.*"]) for sub in subs) + "\n")
    return path


class ExportedStack(Stack):
    """A Stack whose web tier runs the code exported in `source` (another commit)."""

    def __init__(self, server: RedisServer, directory: Path, source: Path, **env: str) -> None:
        super().__init__(server, directory, **env)
        self.source = source

    def start_web(self, wait: bool = True, **env: str) -> Proc:
        """Start gunicorn in the exported tree."""
        gunicorn = shlex.quote(str(VENV_BIN / "gunicorn"))
        command = f"cd {shlex.quote(str(self.source))} && exec {gunicorn} -c gunicorn.conf.py"
        log = self.directory / "web.log"
        self.web = Proc("web", ["sh", "-c", command], {**self.env, **env}, log)
        if wait:
            wait_for(self.serves, timeout=30)
        return self.web


@contextmanager
def web_node(
    directory: Path, server: RedisServer, source: Path | None = None, **env: str
) -> Iterator[Stack]:
    """A gunicorn node (web only: no listener needed) on `server`, stopped after."""
    directory.mkdir(parents=True, exist_ok=True)
    if source is None:
        stack = Stack(server, directory, **BASE_ENV, **env)
    else:
        stack = ExportedStack(server, directory, source, **BASE_ENV, **env)
    try:
        stack.start_web()
        client = server.client()
        wait_for(lambda: stack_subscribed(client), timeout=30)
        client.close()
        yield stack
    finally:
        stack.stop()


def stack_subscribed(client: Any) -> bool:
    """Tell whether a web worker hears the message queue (it answers subscribes then)."""
    return int(dict(client.pubsub_numsub("tidings:socketio")).get(b"tidings:socketio", 0)) >= 1


def worker_pid(stack: Stack) -> int:
    """The pid of the node's one gunicorn worker."""
    assert stack.web is not None
    [child] = psutil.Process(stack.web.pid).children()
    return child.pid


def churn_cpu(directory: Path, args: argparse.Namespace) -> dict[str, list[float]]:
    """CPU (% of a core) of each system's worker while its clients churn, per round."""
    users = [f"user{i // TABS}" for i in range(args.clients)]
    tokens = write_tokens(directory / "tokens", users)
    systems: dict[str, dict[str, str]] = dict(SYSTEMS)
    source = None
    if args.baseline:
        systems = {"base": {}, **systems}
        source = export(args.baseline, directory / "base-src")
    cpu: dict[str, list[float]] = {name: [] for name in systems}
    with ExitStack() as stack:
        nodes: dict[str, tuple[Stack, Clients, int]] = {}
        for name, env in systems.items():
            server = RedisServer(directory / name / "redis")
            server.start()
            stack.callback(server.stop)
            exported = source if name == "base" else None
            node = stack.enter_context(web_node(directory / name, server, exported, **env))
            clients = Clients(node.url, tokens, 0, args.clients, TOPICS)
            stack.callback(clients.close)
            clients.ready()
            nodes[name] = (node, clients, worker_pid(node))
        for _, clients, _ in nodes.values():  # warm-up, not counted
            clients.send(cmd="churn", rate=args.rate, seconds=2, topics=TOPICS)
            clients.read("churned")
        order = list(systems)
        for round_ in range(args.rounds):
            for name in order[round_ % len(order) :] + order[: round_ % len(order)]:
                _, clients, pid = nodes[name]
                before, started = cpu_seconds([pid]), time.monotonic()
                clients.send(cmd="churn", rate=args.rate, seconds=args.seconds, topics=TOPICS)
                answer = clients.read("churned")
                used, elapsed = cpu_seconds([pid]) - before, time.monotonic() - started
                if answer["refused"]:
                    raise RuntimeError(f"{name}: {answer['refused']} moves refused")
                cpu[name].append(100 * used / elapsed)
                print(f"round {round_} {name}: {cpu[name][-1]:.1f}% CPU, {answer}")
    return cpu


def percentiles(samples: list[float]) -> tuple[float, float]:
    """Return the median and the 99th percentile (nearest rank), in ms."""
    ordered = sorted(samples)
    return ordered[len(ordered) // 2] * 1000, ordered[int(0.99 * (len(ordered) - 1))] * 1000


def timed(call: Any, times: int) -> list[float]:
    """Call `call` `times` times, one after the other; return each one's seconds."""
    spent = []
    for _ in range(times):
        started = time.perf_counter()
        call()
        spent.append(time.perf_counter() - started)
    return spent


def read_latency(directory: Path, args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    """Latency of presence reads with `--members` users over two nodes.

    Asked from a member node (a, which also serves half the members and
    their pings) and from a third node (c) without members, which shows
    the cost of the read apart from a busy node's own delays.
    """
    subs = [f"member{i}" for i in range(args.members)]
    tokens = write_tokens(directory / "member-tokens", subs)
    server = RedisServer(directory / "reads" / "redis")
    server.start()
    topic = "room.big"
    # Presence reads share the subscribe rate (20/s by default): the callers ask faster.
    env = {"TIDINGS_PRESENCE_TOPICS": "room.*", "TIDINGS_SUBSCRIBE_RATE": "100000"}
    result = {}
    with ExitStack() as stack:
        stack.callback(server.stop)
        nodes = {
            name: stack.enter_context(web_node(directory / "reads" / name, server, **env))
            for name in ("a", "b", "c")
        }
        half = args.members // 2
        for node, first, count in ((nodes["a"], 0, half), (nodes["b"], half, args.members - half)):
            clients = Clients(node.url, tokens, first, count, [topic])
            stack.callback(clients.close)
            clients.ready()
        for name in ("a", "c"):
            # websocket-client's pure-Python UTF-8 check would cost more than the
            # read itself on a 370 KB answer (README, "Receiving"): off, as in TidingsClient.
            caller = socketio.Client(websocket_extra_options={"skip_utf8_validation": True})
            auth = {"token": token(f"caller-{name}", ["room.*"])}
            caller.connect(nodes[name].url, auth=auth, transports=["websocket"])
            stack.callback(caller.disconnect)

            def stats(caller: socketio.Client = caller) -> dict[str, Any]:
                answer = caller.call("presence_stats", {"topic": topic}, timeout=10)
                assert answer["ok"], answer
                return answer

            def members(caller: socketio.Client = caller) -> None:
                answer = caller.call("presence", {"topic": topic}, timeout=30)
                assert answer["ok"] and len(answer["users"]) == args.members, answer.get("error")

            wait_for(lambda: stats()["users"] == args.members, timeout=60, interval=0.5)
            timed(stats, 50)  # warm-up
            result[f"presence_stats_{name}"] = percentiles(timed(stats, args.calls))
            result[f"presence_{name}"] = percentiles(timed(members, max(args.calls // 10, 10)))
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {API_KEY}"
        url = f"{nodes['c'].url}/api/presence/{topic}/stats"

        def over_http() -> None:
            assert session.get(url, timeout=10).json()["users"] == args.members

        result["http_stats"] = percentiles(timed(over_http, args.calls))
    return result


def churn_result(cpu: dict[str, list[float]], args: argparse.Namespace) -> str:
    """The churn measurement's line."""
    off, on, joins = (statistics.median(cpu[name]) for name in ("off", "on", "joins"))

    def runs(name: str) -> str:
        return "[" + ", ".join(f"{v:.1f}" for v in cpu[name]) + "]"

    def to_off(value: float) -> str:
        # A short run can use less CPU than the clock's tick (10 ms): 0% measured.
        return f"{value / off:.2f}x" if off else "n/a, presence off measured 0%"

    baseline = ""
    if args.baseline:
        base = statistics.median(cpu["base"])
        baseline = f"; {args.baseline[:7]} (before presence) {base:.1f}% {runs('base')}"
    return (
        f"{args.clients} clients ({args.clients // TABS} users x {TABS} tabs) on 50 topics,"
        f" {args.rate:g} joins/s (and as many leaves) for {args.seconds:g} s, {args.rounds}"
        f" rounds: web worker CPU, median, presence off {off:.1f}%, on {on:.1f}%"
        f" (**{to_off(on)}**), on with join/leave events {joins:.1f}% ({to_off(joins)})"
        f" (runs off {runs('off')}, on {runs('on')}, joins {runs('joins')}){baseline}"
    )


def reads_result(reads: dict[str, tuple[float, float]], args: argparse.Namespace) -> str:
    """The read-latency measurement's line."""

    def ms(name: str) -> str:
        p50, p99 = reads[name]
        return f"p50 {p50:.2f} ms, p99 {p99:.2f} ms"

    full = max(args.calls // 10, 10)
    return (
        f"{args.members} members over 2 nodes, calls one after the other from a Socket.IO"
        f" client on a member node / on a third node: `presence_stats` ({args.calls} calls)"
        f" {ms('presence_stats_a')} / {ms('presence_stats_c')} (**p99"
        f" {reads['presence_stats_a'][1]:.2f} / {reads['presence_stats_c'][1]:.2f} ms**),"
        f" `presence`, the full list ({full} calls), {ms('presence_a')} / {ms('presence_c')};"
        f" HTTP `/api/presence/<topic>/stats` on the third node {ms('http_stats')}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("all", "churn", "reads"), default="all")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=50, help="joins per second")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--members", type=int, default=10_000)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--baseline", default=None, help="also a node running this commit")
    parser.add_argument("--no-record", action="store_true", help="do not write RESULTS.md")
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="tidings-presence-"))
    # Two lines in RESULTS.md, each with the load average of its own run: at
    # its end (record_separate, this run's own processes included) and here
    # at its start (the machine's other work).
    parts = {
        "churn": (churn_cpu, churn_result),
        "reads": (read_latency, reads_result),
    }
    for part, (measure, describe) in parts.items():
        if args.part not in ("all", part):
            continue
        load = os.getloadavg()[0]
        result = describe(measure(directory, args), args) + f"; load at start {load:.2f}"
        print(result)
        if not args.no_record:
            record_separate(RESULTS, f"presence {part}", "python -m bench.presence", result)


if __name__ == "__main__":
    main()
