"""The web tier's observability in-process: /metrics, /api/ops, /readyz, the sampler."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from flask import Flask
from prometheus_client.parser import text_string_to_metric_families

from tests.support import ROOT, wait_for
from tidings import stats
from tidings.keys import LEASE_KEY
from tidings.lease import Lease
from tidings.settings import Settings
from webapp import create_app
from webapp import queue as queue_module
from webapp.extensions import socketio

KEY = {"Authorization": "Bearer k3y"}


@pytest.fixture
def app(redis_client: redis.Redis, redis_server) -> Iterator[Flask]:
    """The app as a serving worker would build it: queue subscribed, sampler running."""
    settings = Settings.from_env(
        {"TIDINGS_REDIS_URL": redis_server.url(0), "TIDINGS_API_KEY": "k3y"}
    )
    app = create_app({"SETTINGS": settings, "SUBSCRIBE_QUEUE": True, "TESTING": True})
    wait_for(lambda: app.extensions["tidings.queue"].subscribed, timeout=5)
    yield app
    app.extensions["tidings.queue"].close()


def samples(app: Flask) -> dict[tuple[str, tuple], float]:
    answer = app.test_client().get("/metrics")
    assert answer.status_code == 200 and answer.mimetype == "text/plain"
    found = {}
    for family in text_string_to_metric_families(answer.get_data(as_text=True)):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_metrics_renders_the_listener_lease_and_backlog(
    app: Flask, redis_client: redis.Redis
) -> None:
    before = samples(app)
    assert before[("tidings_redis_up", ())] == 1
    assert before[("tidings_listener_up", ())] == 0
    assert ("tidings_listener_lease_holder", ()) not in before
    lease = Lease(redis_client, 5000, since_ms=int(time.time() * 1000) - 2000)
    assert lease.acquire()
    counts = stats.ListenerStats()
    counts.counts["received_pubsub"] += 2
    counts.forwarded("pubsub", [1000], 1004)
    counts.dropped("too_large", "pubsub", "a")
    counts.flush(redis_client, "h:1")
    after = samples(app)
    assert after[("tidings_listener_up", ())] == 1
    holders = [k for k in after if k[0] == "tidings_listener_lease_holder"]
    assert len(holders) == 1 and dict(holders[0][1])["pid"].isdigit()
    assert 1.5 < after[("tidings_listener_lease_age_seconds", ())] < 60
    assert after[("tidings_received_total", (("path", "pubsub"),))] == 2
    assert after[("tidings_forwarded_total", (("path", "pubsub"),))] == 1
    assert after[("tidings_dropped_total", (("path", "pubsub"), ("reason", "too_large")))] == 1
    assert after[("tidings_dropped_total", (("path", "ingest"), ("reason", "invalid_utf8")))] == 0
    bucket = ("tidings_publish_to_emit_seconds_bucket", (("le", "0.005"), ("path", "pubsub")))
    assert after[bucket] == 1
    assert after[("tidings_listener_restarts_total", ())] == 0
    assert after[("tidings_ingest_length", ())] == 0


def test_metrics_without_redis_says_so(redis_server) -> None:
    settings = Settings.from_env({"TIDINGS_REDIS_URL": "redis://127.0.0.1:1/0"})
    app = create_app({"SETTINGS": settings})
    found = samples(app)
    assert found[("tidings_redis_up", ())] == 0
    assert ("tidings_listener_up", ()) not in found


def test_the_sampler_shares_this_workers_numbers(app: Flask, redis_client: redis.Redis) -> None:
    def shared() -> list[dict]:
        return [w for w in stats.read_webs(redis_client) if w["queue_ready"] == "1"]

    (mine,) = wait_for(shared, timeout=5)
    assert mine["worker"] == stats.worker_name() and mine["clients"] == "0"
    numbers = app.extensions["tidings.sampler"].sample()
    assert numbers["clients"] == 0 and numbers["queue_ready"] == 1
    found = samples(app)
    assert found[("tidings_queue_subscribed_workers", ())] == 1
    assert found[("tidings_subscriptions", (("pattern", "public.*"),))] == 0


def test_ops_needs_the_key_and_shows_the_operator_view(
    app: Flask, redis_client: redis.Redis
) -> None:
    client = app.test_client()
    assert client.get("/api/ops").status_code == 401
    assert client.get("/api/ops", headers={"Authorization": "Bearer nope"}).status_code == 401
    Lease(redis_client, 5000, since_ms=int(time.time() * 1000)).acquire()
    counts = stats.ListenerStats()
    counts.counts["starts"] += 1
    counts.forwarded("ingest", [None] * 10, 0)
    counts.dropped("invalid_topic", "ingest", "<script>")
    counts.flush(redis_client, "h:1")
    wait_for(lambda: stats.read_webs(redis_client), timeout=5)
    answer = client.get("/api/ops", headers=KEY)
    assert answer.status_code == 200
    body = answer.json
    assert body["lease"]["held"] and body["lease"]["pid"] > 0
    assert body["listener"]["forwarded"] == {"ingest": 10}
    assert body["listener"]["dropped"] == {"invalid_topic:ingest": 1}
    assert body["ingest"] == {"length": 0, "pending": 0, "lag": None, "group": False}
    assert [w["worker"] for w in body["web"]] == [stats.worker_name()]
    assert body["web"][0]["clients"] == 0
    assert body["recent_drops"][0]["topic"] == "<script>"


def test_ops_is_disabled_without_a_key(redis_server) -> None:
    settings = Settings.from_env({"TIDINGS_REDIS_URL": redis_server.url(0)})
    app = create_app({"SETTINGS": settings})
    assert app.test_client().get("/api/ops", headers=KEY).status_code == 403


def test_readyz_names_a_stalled_queue_loop_then_recovers(
    app: Flask, redis_client: redis.Redis
) -> None:
    redis_client.set(LEASE_KEY, "x", px=60_000)
    client = app.test_client()
    assert client.get("/readyz").status_code == 200
    manager = app.extensions["tidings.queue"]
    # The loop polls at least every second; a last poll this old means it is stuck.
    manager.last_poll -= queue_module.STALE_AFTER_SECONDS + 1
    stalled = client.get("/readyz")
    assert stalled.status_code == 503 and stalled.json["failing"] == ["message_queue"]
    assert stalled.json["checks"]["message_queue"]["detail"] == "message queue loop stalled"
    wait_for(lambda: client.get("/readyz").status_code == 200, timeout=5)
    # A loop that really stopped stays unready.
    manager.close()
    time.sleep(queue_module.POLL_SECONDS + 0.2)
    manager.last_poll -= queue_module.STALE_AFTER_SECONDS
    answer = client.get("/readyz")
    assert answer.status_code == 503 and answer.json["failing"] == ["message_queue"]


def test_readyz_names_redis_when_it_is_down(redis_server) -> None:
    settings = Settings.from_env({"TIDINGS_REDIS_URL": "redis://127.0.0.1:1/0"})
    app = create_app({"SETTINGS": settings, "QUEUE": False})
    answer = app.test_client().get("/readyz")
    assert answer.status_code == 503
    assert answer.json["failing"] == ["redis", "listener", "message_queue"]
    assert set(answer.json["checks"]["redis"]) == {"ok", "detail"}


def test_connected_clients_and_subscriptions_are_sampled_from_the_rooms(
    redis_client: redis.Redis, redis_server
) -> None:
    settings = Settings.from_env({"TIDINGS_REDIS_URL": redis_server.url(0)})
    app = create_app({"SETTINGS": settings, "QUEUE": False})
    from webapp.metrics import Sampler

    class Rooms:
        """Flask-SocketIO's in-process test server keeps its own manager's rooms."""

        closed = False
        reconnects = 0
        received = delivered = 0

        def __init__(self) -> None:
            self.rooms = socketio.server.manager.rooms

        def channels(self) -> int:
            return 0

        def ready(self) -> tuple[bool, str]:
            return False, "no queue"

    app.extensions["tidings.queue"] = Rooms()
    sampler = Sampler(app)
    app.extensions["tidings.queue"] = None
    one = socketio.test_client(app)
    two = socketio.test_client(app)
    assert one.emit("subscribe", {"topic": "public.a"}, callback=True)["ok"]
    assert two.emit("subscribe", {"topic": "public.a"}, callback=True)["ok"]
    assert two.emit("subscribe", {"topic": "public.b"}, callback=True)["ok"]
    numbers = sampler.sample()
    assert (numbers["clients"], numbers["subscriptions"], numbers["topics"]) == (2, 3, 2)
    found = samples(app)
    assert found[("tidings_connected_clients", ())] == 2
    assert found[("tidings_subscriptions", (("pattern", "public.*"),))] == 3
    two.disconnect()
    assert sampler.sample()["subscriptions"] == 1
    one.disconnect()


# A serving worker in miniature: patched, the app built, then the hub blocked.
_BLOCKED_HUB = """
from gevent import monkey

monkey.patch_all()

import json
import os
import sys
import time

import gevent
from gevent import events, util

from tidings.settings import Settings
from webapp import create_app

# Every full report walks all greenlets through this function.
reports = []
format_greenlets = util._format_greenlet_info


def counted(*args, **kwargs):
    reports.append(1)
    return format_greenlets(*args, **kwargs)


util._format_greenlet_info = counted
infos = []


def on_event(event):
    if isinstance(event, events.EventLoopBlocked):
        infos.append(len(event.info))


events.subscribers.append(on_event)
if os.environ.get("HUB_FIRST"):
    gevent.sleep(0.01)  # the hub, and gevent's own monitor, run before the app loads
app = create_app({"SETTINGS": Settings.from_env({"TIDINGS_REDIS_URL": sys.argv[1]})})
sampler = app.extensions["tidings.sampler"]
gevent.sleep(0.3)
before = (sampler.hub_blocked, len(reports), len(infos))
end = time.perf_counter() + 0.5
while time.perf_counter() < end:  # no I/O, no switch: the hub is blocked
    pass
deadline = time.monotonic() + 5
while sampler.hub_blocked == before[0] and time.monotonic() < deadline:
    gevent.sleep(0.1)
app.extensions["tidings.queue"].close()
print(json.dumps({
    "counted": sampler.hub_blocked - before[0],
    "reports": len(reports) - before[1],
    "info_lines": infos[before[2]:],
}))
"""


@pytest.mark.parametrize(
    ("print_reports", "hub_first"), [("false", False), ("false", True), ("true", False)]
)
def test_a_blocked_hub_is_counted_without_building_gevents_report(
    redis_server, tmp_path: Path, print_reports: str, hub_first: bool
) -> None:
    script = tmp_path / "blocked_hub.py"
    script.write_text(_BLOCKED_HUB)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "GEVENT_MONITOR_THREAD_ENABLE": "true",
        "GEVENT_MAX_BLOCKING_TIME": "0.1",
        "GEVENT_MONITOR_PRINT_BLOCKING_REPORTS": print_reports,
    }
    if hub_first:
        env["HUB_FIRST"] = "1"
    done = subprocess.run(
        [sys.executable, str(script), redis_server.url(0)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["counted"] >= 1  # tidings_gevent_hub_blocked_total moved
    if print_reports == "true":  # asked for: gevent's full report, printed
        assert found["reports"] >= 1 and min(found["info_lines"]) > 1
        assert "appears to be blocked" in done.stderr
    else:
        assert found["reports"] == 0 and found["info_lines"] == [1] * len(found["info_lines"])
        assert "appears to be blocked" not in done.stderr
