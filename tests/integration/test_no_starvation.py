"""Nothing of Tidings blocks the gevent hub of a web worker under load.

The web workers run with gevent's blocked-loop monitor on
(GEVENT_MONITOR_THREAD_ENABLE, GEVENT_MAX_BLOCKING_TIME=0.1): any greenlet
that keeps the hub from running for more than 100 ms gets its stack printed
to the worker's stderr (the web log). Under load (50 websocket clients, 2000
publications in bursts, subscribe/unsubscribe and connect/disconnect churn,
/readyz polls, history recovery), no report may show a frame of Tidings' own code.

A self-check proves that the test can fail: the same gunicorn worker class
with the same environment, serving a tiny app that blocks on purpose, prints
a report that the same parser finds, with the app's frame in it.
"""

from __future__ import annotations

import os
import re
import subprocess
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support import ROOT, VENV_BIN, Proc, Stack, free_port, wait_for
from tidings.client import TidingsClient

pytestmark = pytest.mark.integration

MONITOR_ENV = {"GEVENT_MONITOR_THREAD_ENABLE": "true", "GEVENT_MAX_BLOCKING_TIME": "0.1"}
OUR_CODE = (ROOT / "webapp", ROOT / "tidings")
CLIENTS = 50
TOPICS = [f"public.load.{k}" for k in range(5)]
EVERYONE = "public.load.all"
PUBLICATIONS = 2000
BURST = 200

REPORT_SEPARATOR = "=" * 80
BLOCKED = re.compile(r"Greenlet .* appears to be blocked")
FRAME = re.compile(r'^\s*File "([^"]+)", line \d+, in (\S+)', re.MULTILINE)


def blocking_reports(text: str) -> list[str]:
    """Return gevent's blocked-hub reports found in a log, one string each."""
    chunks = text.split(REPORT_SEPARATOR)
    return [chunk for chunk in chunks if BLOCKED.search(chunk)]


def blocked_frames(report: str) -> list[tuple[str, str]]:
    """Return the (file, function) frames of a report's blocked stack.

    That is the stack of the hub's thread at the moment it was found
    blocked; the report's other sections (every thread, greenlet spawn
    sites) are context, not the culprit.
    """
    start = report.find("Blocked Stack")
    end = report.find("\nInfo:", start)
    section = report[start : end if end != -1 else len(report)] if start != -1 else ""
    return FRAME.findall(section)


def frames_in(report: str, roots: tuple[Path, ...]) -> list[tuple[str, str]]:
    """Return the blocked-stack frames whose file lies under one of `roots`."""
    prefixes = tuple(str(root) + "/" for root in roots)
    return [frame for frame in blocked_frames(report) if frame[0].startswith(prefixes)]


def headline(report: str) -> str:
    match = BLOCKED.search(report)
    frames = blocked_frames(report)
    where = "; ".join(f"{Path(f).name}:{fn}" for f, fn in frames[-4:])
    return f"{match.group(0) if match else '?'} at {where}"


class CountingClient(TidingsClient):
    """A TidingsClient that counts raw publications per topic and keeps their offsets."""

    def __init__(self, url: str) -> None:
        self.delivered: list[dict[str, Any]] = []
        self.raw: Counter[str] = Counter()
        self.offsets: list[tuple[str, str]] = []
        self._raw_lock = threading.Lock()
        super().__init__(url, on_publication=self.delivered.append, transports=["websocket"])

    def _on_publications(self, publications: Any) -> None:
        with self._raw_lock:
            if isinstance(publications, list):
                for pub in publications:
                    if isinstance(pub, dict):
                        self.raw[pub.get("topic")] += 1
                        self.offsets.append((pub.get("topic"), pub.get("offset")))
        super()._on_publications(publications)


def test_monitor_reports_a_blocked_hub_under_this_worker(tmp_path: Path) -> None:
    """Self-check: the monitor is on with these variables, and the parser finds its reports."""
    app = tmp_path / "blocker.py"
    app.write_text(
        textwrap.dedent(
            """
            import time

            def block_the_hub():
                end = time.perf_counter() + 0.5
                while time.perf_counter() < end:  # no I/O, no switch: blocks the hub
                    pass

            def app(environ, start_response):
                if environ["PATH_INFO"] == "/block":
                    block_the_hub()
                start_response("200 OK", [("Content-Type", "text/plain")])
                return [b"ok"]
            """
        )
    )
    config = tmp_path / "conf.py"
    config.write_text("control_socket_disable = True\nworkers = 1\n")
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    def serve(env: dict[str, str], name: str) -> str:
        proc = Proc(
            name,
            [
                str(VENV_BIN / "gunicorn"),
                "-c",
                str(config),
                "--chdir",
                str(tmp_path),
                "-b",
                f"127.0.0.1:{port}",
                # The web tier's worker class (gunicorn.conf.py).
                "-k",
                "geventwebsocket.gunicorn.workers.GeventWebSocketWorker",
                "blocker:app",
            ],
            {**os.environ, "PYTHONUNBUFFERED": "1", **env},
            tmp_path / f"{name}.log",
        )
        try:

            def serves() -> bool:
                try:
                    return requests.get(url + "/", timeout=2).ok
                except requests.RequestException:
                    return False

            wait_for(serves, timeout=30)
            assert requests.get(url + "/block", timeout=5).ok
            assert requests.get(url + "/", timeout=5).ok
            if env:
                wait_for(lambda: blocking_reports(proc.log()), timeout=5)
            else:
                time.sleep(0.5)  # a report, if any, is printed within 0.1 s
        finally:
            proc.stop()
        return proc.log()

    with_monitor = serve(MONITOR_ENV, "monitor-on")
    reports = blocking_reports(with_monitor)
    assert reports, with_monitor[-3000:]
    ours = [frames_in(report, (tmp_path,)) for report in reports]
    assert any("block_the_hub" in [fn for _, fn in frames] for frames in ours), reports
    print(f"\n[self-check] {len(reports)} report(s): {headline(reports[0])}")

    without_monitor = serve({}, "monitor-off")
    assert not blocking_reports(without_monitor), without_monitor[-3000:]


def test_no_tidings_frame_blocks_the_hub_under_load(make_stack: Callable[..., Stack]) -> None:
    # The churning clients subscribe as fast as they can, past the default
    # 20 per second per connection; the rate limit is not what is tested here.
    stack = make_stack(TIDINGS_SUBSCRIBE_RATE="1000", **MONITOR_ENV)
    stack.start_worker()
    stack.start_web()
    stack.wait_ready(timeout=30)
    # Every gunicorn worker really runs with the monitor's variables.
    workers = subprocess.run(
        ["pgrep", "-P", str(stack.web.pid)], capture_output=True, text=True, check=False
    ).stdout.split()
    assert workers
    for pid in workers:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert b"GEVENT_MONITOR_THREAD_ENABLE=true" in environ
        assert b"GEVENT_MAX_BLOCKING_TIME=0.1" in environ
    startup_log = len(stack.web.log())

    clients = [CountingClient(stack.url) for _ in range(CLIENTS)]
    stop = threading.Event()
    errors: list[BaseException] = []
    polls: Counter[int] = Counter()
    churned = Counter()

    def readyz() -> None:
        try:
            while not stop.is_set():
                polls[stack.get("/readyz").status_code] += 1
                stop.wait(0.02)
        except BaseException as exc:
            errors.append(exc)

    def churn(index: int) -> None:
        try:
            while not stop.is_set():
                client = CountingClient(stack.url)
                client.connect()
                # Recovery, as after a reconnect: everything since the
                # oldest offset a steady client has seen.
                first = clients[index].offsets[:1]
                if first:
                    topic, since = first[0]
                    ack = client.sio.call("subscribe", {"topic": topic, "since": since}, timeout=10)
                    assert ack["ok"] and ack["recovered"], ack
                    churned["recovered"] += len(ack["publications"])
                    assert client.unsubscribe(topic)["ok"]
                for _ in range(10):
                    topic = f"public.churn.{index}.{churned['subscribe'] % 7}"
                    assert client.subscribe(topic)["ok"]
                    assert client.subscribe(TOPICS[churned["subscribe"] % 5])["ok"]
                    churned["subscribe"] += 2
                    assert client.unsubscribe(topic)["ok"]
                    assert client.unsubscribe(TOPICS[churned["unsubscribe"] % 5])["ok"]
                    churned["unsubscribe"] += 2
                client.disconnect()
                churned["connections"] += 1
        except BaseException as exc:
            errors.append(exc)

    background = [threading.Thread(target=readyz, daemon=True)] + [
        threading.Thread(target=churn, args=(k,), daemon=True) for k in range(4)
    ]
    try:
        for index, client in enumerate(clients):
            client.connect()
            assert client.subscribe(TOPICS[index % len(TOPICS)])["ok"]
            assert client.subscribe(EVERYONE)["ok"]
        for thread in background:
            thread.start()

        expected: Counter[str] = Counter()
        started = time.monotonic()
        for start in range(0, PUBLICATIONS, BURST):
            burst = []
            for n in range(start, start + BURST):
                topic = EVERYONE if n % 10 == 9 else TOPICS[n % len(TOPICS)]
                burst.append((topic, {"n": n, "pad": "x" * 200}))
                expected[topic] += 1
            stack.publish_many(burst)
            time.sleep(0.25)  # bursts, not a steady stream

        def everything_delivered() -> bool:
            return all(
                client.raw[TOPICS[index % len(TOPICS)]] >= expected[TOPICS[index % len(TOPICS)]]
                and client.raw[EVERYONE] >= expected[EVERYONE]
                for index, client in enumerate(clients)
            )

        wait_for(everything_delivered, timeout=60)
        took = time.monotonic() - started
    finally:
        stop.set()
        for thread in background:
            thread.join(timeout=15)
        for client in clients:
            client.disconnect()

    assert not errors, errors
    for index, client in enumerate(clients):
        topic = TOPICS[index % len(TOPICS)]
        assert client.raw[topic] == expected[topic], (index, client.raw)
        assert client.raw[EVERYONE] == expected[EVERYONE], (index, client.raw)
        assert len(client.offsets) == len(set(client.offsets)), f"client {index}: duplicates"

    log = stack.web.log()
    at_startup = blocking_reports(log[:startup_log])
    under_load = blocking_reports(log[startup_log:])
    print(
        f"\n[load] {CLIENTS} clients, {PUBLICATIONS} publications delivered in {took:.2f}s;"
        f" /readyz polls {dict(polls)}; churn {dict(churned)}"
        f"\n[load] blocking reports: {len(at_startup)} during startup, {len(under_load)} under load"
    )
    for report in at_startup + under_load:
        print("  " + headline(report))
    culprits = [report for report in under_load if frames_in(report, OUR_CODE)]
    assert not culprits, "Tidings code blocked the gevent hub:\n" + "\n".join(
        f"{headline(r)}\n  ours: {frames_in(r, OUR_CODE)}" for r in culprits
    )
