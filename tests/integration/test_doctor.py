"""`flask --app webapp doctor` against real stacks: healthy, broken on purpose, misconfigured."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support import ROOT, VENV_BIN, BareConnect, Stack, wait_for
from tidings.stats import read_webs

pytestmark = pytest.mark.integration


def doctor(stack: Stack, *args: str, text: bool = False) -> tuple[int, Any]:
    """Run the doctor as an operator would; return its exit status and its report."""
    done = subprocess.run(
        [
            str(VENV_BIN / "flask"),
            "--app",
            "webapp",
            "doctor",
            *([] if text else ["--json"]),
            *args,
        ],
        cwd=ROOT,
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in done.stderr, done.stderr
    if text:
        return done.returncode, done.stdout
    return done.returncode, json.loads(done.stdout)


def statuses(report: dict[str, Any]) -> dict[str, str]:
    return {check["name"]: check["status"] for check in report["checks"]}


def check(report: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in report["checks"] if c["name"] == name]
    return found


@pytest.fixture
def fake_listener(stack: Stack) -> Iterator[Any]:
    """Start a second subscriber on tidings:topic:*, named or not."""
    started: list[tuple[redis.Redis, redis.client.PubSub]] = []

    def start(name: str | None) -> None:
        # The client is kept: collecting it would close its pool, subscription and all.
        client = redis.Redis(port=stack.redis_server.port, client_name=name)
        pubsub = client.pubsub()
        pubsub.psubscribe("tidings:topic:*")
        pubsub.get_message(timeout=1)  # the psubscribe confirmation
        started.append((client, pubsub))

    yield start
    for client, pubsub in started:
        pubsub.close()
        client.close()


def test_a_healthy_stack_passes(stack: Stack) -> None:
    # 100 expected clients: a storm any kernel's accept queue holds (somaxconn >= 128).
    status, report = doctor(stack, "--timeout", "5", "--expected-clients", "100")
    assert status == 0, report
    assert report["ok"] is True
    found = statuses(report)
    # The test Redis keeps nothing on disk: the one warning it deserves.
    assert found == {
        "redis": "warn",
        "lease": "ok",
        "listeners": "ok",
        "web_workers": "ok",
        "proxies": "ok",
        "routing": "ok",
        "ingest": "ok",
        "gunicorn": "ok",
        "probe": "ok",
        "accept_queue": "ok",
    }, report
    assert "lost if Redis restarts" in check(report, "redis")["summary"]
    assert check(report, "listeners")["details"]["receivers"] == 1
    assert check(report, "web_workers")["details"]["subscribers"] == 1
    latency = check(report, "probe")["details"]["latency_ms"]
    assert 0 < latency["durable"] < 5000 and 0 < latency["fast"] < 5000
    status, text = doctor(stack, "--timeout", "5", "--expected-clients", "100", text=True)
    print("\n" + text)
    assert status == 0 and text.strip().endswith("verdict: ok, with warnings (redis)")
    assert len(text.strip().splitlines()) == 1 + 10 + 1
    # Before the probe, no client of this stack had a topic: no channel heard.
    routing = check(report, "routing")["details"]
    assert [w["queue_channels"] for w in routing["workers"]] == [0]
    assert "topic channel" in text


def test_a_second_subscriber_is_the_duplicate_listener_bug(
    stack: Stack, fake_listener: Any
) -> None:
    fake_listener("tidings:listener:fake:1")
    status, report = doctor(stack, "--no-probe")
    assert status == 1 and report["ok"] is False, report
    listeners = check(report, "listeners")
    assert listeners["status"] == "fail" and "duplicate listener" in listeners["summary"]
    assert listeners["details"]["receivers"] == 2
    assert any("tidings:listener:fake:1" in c for c in listeners["details"]["pattern_subscribers"])
    # An unnamed one is just as much a duplicate: it is counted by what it receives.
    fake_listener(None)
    status, report = doctor(stack, "--no-probe")
    assert status == 1 and check(report, "listeners")["details"]["receivers"] == 3
    assert any(
        "<unnamed>" in c for c in check(report, "listeners")["details"]["pattern_subscribers"]
    )
    assert statuses(report)["lease"] == "ok"


def test_a_stopped_listener_fails(stack: Stack) -> None:
    stack.workers[0].stop()
    wait_for(lambda: not stack.redis().exists("tidings:listener"), timeout=10)
    status, report = doctor(stack, "--timeout", "2")
    assert status == 1
    found = statuses(report)
    assert (
        found["lease"] == "fail"
        and "no listener holds the lease" in check(report, "lease")["summary"]
    )
    assert found["listeners"] == "fail" and found["probe"] == "fail"
    assert found["web_workers"] == "ok"


def test_a_proxy_that_is_not_trusted_is_named(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack()
    stack.start_web()  # web workers count what the check reads; no listener needed
    # A peer outside the default 127.0.0.1,::1 sends X-Forwarded-For, as an
    # nginx on another host would: its header is ignored, and counted.
    proxied = BareConnect(stack.port, "127.0.9.9", [("X-Forwarded-For", "203.0.113.7")])
    try:
        assert proxied.answer == "connected"
        wait_for(lambda: any("untrusted_peers" in w for w in read_webs(stack.redis())), timeout=10)
        _, report = doctor(stack, "--no-probe")
    finally:
        proxied.close()
    found = check(report, "proxies")
    assert found["status"] == "warn", found
    assert found["details"]["peers"] == ["127.0.9.9"] and found["details"]["ignored"] == 1
    assert "from 127.0.9.9 (last" in found["summary"]
    assert "add it to TIDINGS_TRUSTED_PROXIES (here: 127.0.0.1, ::1)" in found["summary"]


def write_config(tmp_path: Path, name: str, extra: str) -> Path:
    """A gunicorn config: the project's own, then `extra` on top."""
    path = tmp_path / name
    path.write_text(f"exec(open({str(ROOT / 'gunicorn.conf.py')!r}).read())\n{extra}\n")
    return path


def test_gunicorn_settings_that_break_socketio_fail(stack: Stack, tmp_path: Path) -> None:
    def gunicorn(*args: str) -> dict[str, Any]:
        status, report = doctor(stack, "--no-probe", *args)
        found = check(report, "gunicorn")
        assert (status == 1) == (found["status"] == "fail")
        return found

    preload = gunicorn(
        "--gunicorn-config", str(write_config(tmp_path, "a.py", "preload_app = True"))
    )
    assert preload["status"] == "fail" and "preload_app = True" in preload["summary"]
    several = write_config(tmp_path, "b.py", "workers = 4")
    found = gunicorn("--gunicorn-config", str(several))
    assert found["status"] == "fail" and "Invalid session" in found["summary"]
    assert gunicorn("--gunicorn-config", str(several), "--websocket-only")["status"] == "ok"
    plain = gunicorn(
        "--gunicorn-config", str(write_config(tmp_path, "c.py", 'worker_class = "gevent"'))
    )
    assert plain["status"] == "fail" and "websocket upgrade fails" in plain["summary"]
    sync = gunicorn(
        "--gunicorn-config", str(write_config(tmp_path, "d.py", 'worker_class = "sync"'))
    )
    assert sync["status"] == "fail" and "not gevent's websocket worker" in sync["summary"]
    few = write_config(tmp_path, "e.py", "worker_connections = 100")
    assert gunicorn("--gunicorn-config", str(few))["status"] == "warn"
    found = gunicorn("--gunicorn-config", str(few), "--expected-clients", "500")
    assert found["status"] == "fail" and "500 expected clients" in found["summary"]
    assert gunicorn("--expected-clients", "500")["status"] == "ok"  # the project's own file


def test_an_accept_queue_too_short_for_a_reconnect_storm_warns(
    stack: Stack, tmp_path: Path
) -> None:
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    running = min(stack.settings.backlog, somaxconn)

    def accept_queue(*args: str) -> dict[str, Any]:
        status, report = doctor(stack, "--no-probe", *args)
        assert status == 0, report  # a warning, never a failure
        return check(report, "accept_queue")

    found = accept_queue("--expected-clients", str(running))
    assert found["status"] == "ok", found
    assert f"accept queue {running}" in found["summary"]
    assert found["details"]["somaxconn"] == somaxconn
    # gunicorn.conf.py's backlog reached listen(), capped by the kernel.
    assert found["details"]["live"]["limit"] == running
    # One client more than the queue holds.
    found = accept_queue("--expected-clients", str(running + 1))
    assert found["status"] == "warn"
    assert f"< {running + 1} clients a reconnect storm brings back at once" in found["summary"]
    # A short backlog in the config (the next start's) warns and names the backlog.
    short = write_config(tmp_path, "short.py", "backlog = 64")
    found = accept_queue("--gunicorn-config", str(short), "--expected-clients", "500")
    assert found["status"] == "warn" and found["details"]["accept_queue"] == 64
    assert "set gunicorn's backlog to at least 500" in found["summary"]
