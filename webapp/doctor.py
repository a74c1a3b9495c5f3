"""`flask --app webapp doctor`: what an operator runs when something is off.

One verdict line per check, each about one thing that has broken Tidings
deployments before:

- redis: reachable, version (>= 6.2), persistence (AOF or RDB; without
  either, durable publications do not survive a Redis restart);
- lease: who holds the listener lease and for how long (nobody: no delivery);
- listeners: how many connections receive `tidings:topic:*` (a probe
  PUBLISH answers its receiver count); more than one is the duplicate
  listener bug;
- web_workers: how many web workers are subscribed to `tidings:socketio`;
- proxies: peers whose `X-Forwarded-For` the web workers ignored (a proxy
  missing from TIDINGS_TRUSTED_PROXIES makes all its clients one address);
- routing: the per-topic queue channels, and how much of what the web
  workers receive on them they deliver (the rest came for topics whose last
  client here had left);
- ingest: the stream's length, pending entries, consumer lag;
- gunicorn: the settings of gunicorn.conf.py that break Socket.IO
  (preload_app, several workers with polling clients, too few
  worker_connections, a worker class that is not gevent's websocket one);
- accept_queue: whether the listening socket's accept queue,
  min(backlog, net.core.somaxconn), holds a reconnect storm: every client
  of this host (workers x worker_connections, or --expected-clients) back
  at once, before a new worker accepts; and whether the kernel dropped
  connections at a full accept queue while the doctor ran;
- probe: a durable and a fast publication on a probe topic, through the
  listener and the web tier, to a real Socket.IO client, with latencies.

Exit status 1 when any check fails (warnings do not), `--json` for machines.
The probe publishes on `public.tidings.probe` (capped history like any
topic); with no public pattern covering it, it uses `tidings.probe` and a
token signed with TIDINGS_SECRET.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import secrets
import shlex
import socket
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import click
import redis
from flask import Flask, current_app
from flask.cli import with_appcontext

from tidings.addresses import describe
from tidings.forwarder import now_ms
from tidings.history import parse_offset
from tidings.keys import (
    INGEST_GROUP,
    INGEST_STREAM,
    QUEUE_TOPIC_PREFIX,
    SOCKETIO_CHANNEL,
    topic_channel,
)
from tidings.lease import current_holder
from tidings.listenqueue import (
    KernelLimits,
    ListenCounters,
    ListeningSocket,
    kernel_limits,
    listen_counters,
    listening_socket,
)
from tidings.publishing import publish
from tidings.settings import Settings
from tidings.stats import ingest_backlog, read_listener, read_webs
from tidings.topics import is_valid_topic, matches_any

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
MIN_REDIS = (6, 2)
LAG_WARN = 1000
PENDING_AGE_WARN_S = 30
STATS_STALE_S = 5
GUNICORN_DEFAULT_CONNECTIONS = 1000
PUBLIC_PROBE_TOPIC = "public.tidings.probe"
PRIVATE_PROBE_TOPIC = "tidings.probe"


@dataclass
class Check:
    """One verdict: a name, ok/warn/fail/skip, one line, and the numbers behind it."""

    name: str
    status: str
    summary: str
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Options:
    """What the command line says."""

    url: str
    gunicorn_config: Path | None
    expected_clients: int | None
    websocket_only: bool
    timeout: float
    probe: bool
    probe_topic: str | None


# -- Redis ----------------------------------------------------------------------------


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:3] if part.isdigit())


def check_redis(client: redis.Redis) -> Check:
    """Redis answers; its version; whether anything persists the ingest stream."""
    started = time.perf_counter()
    try:
        client.ping()
    except redis.RedisError as exc:
        return Check("redis", FAIL, f"Redis unreachable: {exc}")
    rtt_ms = (time.perf_counter() - started) * 1000
    info = client.info("server") | client.info("persistence")
    version = str(info.get("redis_version", "?"))
    aof = bool(int(info.get("aof_enabled", 0)))
    try:
        save = client.config_get("save").get("save", "")
        rdb: bool | None = bool(str(save).strip())
    except redis.RedisError:  # CONFIG disabled (managed Redis, ACL)
        rdb = None
    details = {"version": version, "rtt_ms": round(rtt_ms, 2), "aof": aof, "rdb": rdb}
    persistence = ", ".join(
        part
        for part in (
            "AOF on" if aof else "AOF off",
            {True: "RDB snapshots on", False: "RDB snapshots off", None: "RDB unknown"}[rdb],
        )
    )
    line = f"Redis {version} answers in {rtt_ms:.1f} ms; persistence: {persistence}"
    if _version(version) < MIN_REDIS:
        return Check("redis", FAIL, line + "; Tidings needs Redis >= 6.2", details)
    errors = [
        name
        for name, key in (("AOF", "aof_last_write_status"), ("RDB", "rdb_last_bgsave_status"))
        if str(info.get(key, "ok")) != "ok"
    ]
    if errors:
        details["errors"] = errors
        return Check("redis", WARN, line + f"; last {' and '.join(errors)} write failed", details)
    if not aof and rdb is False:
        return Check(
            "redis",
            WARN,
            line + ": durable publications waiting in tidings:ingest are lost if Redis restarts",
            details,
        )
    return Check("redis", OK, line, details)


def check_lease(client: redis.Redis) -> Check:
    """Who holds the listener lease, since when, and whether it keeps its stats fresh."""
    holder = current_holder(client)
    if holder is None:
        return Check(
            "lease",
            FAIL,
            "no listener holds the lease: nothing is forwarded (is `celery -A tasks worker` "
            "running, with access to the broker?)",
        )
    age = max(time.time() - holder.since_ms / 1000, 0) if holder.since_ms else None
    details = {"host": holder.host, "pid": holder.pid, "age_s": age, "ttl_ms": holder.ttl_ms}
    line = f"held by {holder.host} pid {holder.pid}"
    if age is not None:
        line += f" for {_duration(age)}"
    line += f" (expires in {holder.ttl_ms / 1000:.1f} s unless renewed)"
    stats = read_listener(client)
    if stats.updated_ms is not None:
        stale = time.time() - stats.updated_ms / 1000
        details["stats_age_s"] = round(stale, 1)
        if stale > STATS_STALE_S and (age is None or age > STATS_STALE_S):
            return Check(
                "lease",
                WARN,
                line + f"; but its stats were last flushed {stale:.0f} s ago (stuck?)",
                details,
            )
    return Check("lease", OK, line, details)


def _client_list(client: redis.Redis) -> list[dict[str, Any]] | None:
    try:
        return client.client_list()
    except redis.RedisError:  # CLIENT LIST refused (ACL)
        return None


def _describe(entry: dict[str, Any]) -> str:
    name = entry.get("name") or "<unnamed>"
    return f"{name} ({entry.get('addr', '?')})"


def check_listeners(client: redis.Redis, settings: Settings, probe_topic: str) -> Check:
    """Count the connections that receive tidings:topic:* (more than one: duplicate listener).

    A probe PUBLISH on the probe topic's channel answers how many
    subscriptions received it, whoever they are, named or not; a listener
    whose TIDINGS_SUBSCRIBE patterns also match the channel counts once per
    matching pattern.
    """
    channel = topic_channel(probe_topic)
    payload = json.dumps({"tidings_probe": "count", "sent_ms": now_ms()})
    receivers = int(client.publish(channel, payload))
    per_listener = 1 + sum(fnmatchcase(channel, p) for p in settings.subscribe)
    listeners = receivers / per_listener
    clients = _client_list(client)
    candidates = None
    if clients is not None:
        candidates = [
            _describe(c)
            for c in clients
            if int(c.get("psub", 0)) > 0 and not str(c.get("name", "")).startswith("tidings:celery")
        ]
    details = {"receivers": receivers, "pattern_subscribers": candidates}
    who = f": {', '.join(candidates)}" if candidates else ""
    if receivers == 0:
        return Check(
            "listeners",
            FAIL,
            "no connection receives tidings:topic:*: no listener, fast publications are lost",
            details,
        )
    if listeners > 1:
        return Check(
            "listeners",
            FAIL,
            f"duplicate listener: {receivers} subscriptions receive tidings:topic:* "
            f"(expected {per_listener}); every fast publication is forwarded more than once"
            + (f"; pattern subscribers{who}" if who else ""),
            details,
        )
    return Check("listeners", OK, f"1 connection receives tidings:topic:*{who}", details)


def check_web_workers(client: redis.Redis, gunicorn_workers: int | None) -> Check:
    """Count the web workers subscribed to the Socket.IO message queue."""
    ((_, subscribers),) = client.pubsub_numsub(SOCKETIO_CHANNEL)
    clients = _client_list(client)
    named = None
    details: dict[str, Any] = {"subscribers": int(subscribers)}
    if clients is not None:
        named = [
            str(c.get("name"))
            for c in clients
            if str(c.get("name", "")).startswith("tidings:web:") and int(c.get("sub", 0)) > 0
        ]
        details["workers"] = named
    if int(subscribers) == 0:
        return Check(
            "web_workers",
            FAIL,
            f"no web worker is subscribed to {SOCKETIO_CHANNEL}: clients receive nothing "
            "(is gunicorn running, and able to reach Redis?)",
            details,
        )
    count = len(named) if named is not None else int(subscribers)
    line = f"{count} web worker{'s' if count != 1 else ''} subscribed to {SOCKETIO_CHANNEL}"
    if named:
        hosts: dict[str, list[str]] = {}
        for name in named:
            _, _, host, pid = [*name.split(":"), "", "", "", ""][:4]
            hosts.setdefault(host, []).append(pid)
        line += " (" + "; ".join(f"{h}: pids {', '.join(p)}" for h, p in hosts.items()) + ")"
        here = len(hosts.get(socket.gethostname().replace(" ", "_"), []))
        if gunicorn_workers and here and here < gunicorn_workers:
            return Check(
                "web_workers",
                WARN,
                line + f"; gunicorn.conf.py runs {gunicorn_workers} on this host",
                details,
            )
    if named is not None and int(subscribers) > len(named):
        line += f"; {int(subscribers) - len(named)} other subscriber(s)"
    return Check("web_workers", OK, line, details)


def check_proxies(client: redis.Redis, settings: Settings) -> Check:
    """Peers whose X-Forwarded-For the web workers ignored (proxies not yet trusted?)."""
    workers = read_webs(client)
    trusted = describe(settings.trusted_proxies)
    details: dict[str, Any] = {"workers": len(workers), "trusted_here": trusted}
    if not workers:
        return Check("proxies", SKIP, "no web worker reports its stats", details)
    ignored = 0
    peers: dict[str, int] = {}  # peer -> last seen (ms), across workers
    for worker in workers:
        try:
            ignored += int(worker.get("untrusted_forwarded", 0))
            seen = json.loads(worker.get("untrusted_peers") or "{}")
            for peer, when in seen.items():
                peers[str(peer)] = max(peers.get(str(peer), 0), int(when))
        except (ValueError, TypeError, AttributeError):
            continue  # an older worker's or a hand-edited field
    details.update(ignored=ignored, peers=sorted(peers))
    if not ignored:
        return Check(
            "proxies",
            OK,
            f"no X-Forwarded-For from an untrusted peer ({len(workers)} web worker(s) report; "
            f"trusted here: {trusted})",
            details,
        )
    now = time.time()
    named = ", ".join(
        f"{peer} (last {_duration(max(now - when / 1000, 0))} ago)"
        for peer, when in sorted(peers.items(), key=lambda item: -item[1])
    )
    return Check(
        "proxies",
        WARN,
        f"X-Forwarded-For ignored on {ignored} connection(s) from {named or 'unknown peers'}: "
        "a proxy there is not trusted, so all its clients count as one address "
        "(TIDINGS_MAX_CONNECTIONS_PER_IP); if it is yours, add it to TIDINGS_TRUSTED_PROXIES "
        f"(here: {trusted}) and restart the web tier; if not, a client sent the header itself",
        details,
    )


# A web worker that drops more than this share of what its topic channels
# bring (no client for it any more) churns its subscriptions.
UNWANTED_SHARE = 0.2


def check_routing(client: redis.Redis) -> Check:
    """Interest routing: per-topic queue channels, and what the web workers receive vs deliver."""
    channels = len(client.pubsub_channels(QUEUE_TOPIC_PREFIX + "*"))
    workers = read_webs(client)
    details: dict[str, Any] = {"topic_channels": channels, "workers": []}
    if not workers:
        return Check("routing", SKIP, "no web worker reports its stats", details)
    received = delivered = 0
    for worker in workers:
        try:
            numbers = {
                key: int(worker.get(key, 0))
                for key in ("queue_channels", "routed_received", "routed_delivered")
            }
        except (TypeError, ValueError):
            continue  # an older worker's or a hand-edited field
        details["workers"].append({"worker": worker.get("worker"), **numbers})
        received += numbers["routed_received"]
        delivered += numbers["routed_delivered"]
    line = (
        f"{channels} topic channel{'s' if channels != 1 else ''} in Redis; the web workers "
        f"received {received} publications on theirs and delivered {delivered}"
    )
    unwanted = received - delivered
    if unwanted > 1000 and unwanted > UNWANTED_SHARE * received:
        return Check(
            "routing",
            WARN,
            line + f": {unwanted} came for topics with no client left on the worker "
            "(subscriptions shorter than the channels' 2 s linger?)",
            details,
        )
    return Check("routing", OK, line, details)


def check_ingest(client: redis.Redis) -> Check:
    """The ingest stream: length, entries read and not acked, entries not yet read."""
    backlog = ingest_backlog(client)
    details = asdict(backlog)
    if not backlog.group:
        return Check(
            "ingest",
            WARN,
            f"no consumer group {INGEST_GROUP!r} on {INGEST_STREAM} yet "
            f"({backlog.length} entries): no listener has run against this Redis",
            details,
        )
    lag = f"{backlog.lag}{'+' if backlog.lag_capped else ''}"
    line = f"length {backlog.length}, pending {backlog.pending}, lag {lag}"
    problems = []
    if backlog.lag is not None and backlog.lag >= LAG_WARN:
        problems.append("the listener is behind")
    if backlog.pending:
        summary = client.xpending(INGEST_STREAM, INGEST_GROUP)
        oldest = parse_offset(
            summary["min"].decode() if isinstance(summary["min"], bytes) else summary["min"]
        )
        if oldest is not None:
            age = max(time.time() - oldest[0] / 1000, 0)
            details["oldest_pending_s"] = round(age, 1)
            if age > PENDING_AGE_WARN_S:
                problems.append(f"the oldest pending entry is {_duration(age)} old")
    if problems:
        return Check("ingest", WARN, line + ": " + "; ".join(problems), details)
    return Check("ingest", OK, line, details)


# -- gunicorn ---------------------------------------------------------------------------


def default_gunicorn_config() -> Path | None:
    """Return ./gunicorn.conf.py, else the one beside the webapp package."""
    for candidate in (Path("gunicorn.conf.py"), Path(__file__).parent.parent / "gunicorn.conf.py"):
        if candidate.is_file():
            return candidate
    return None


def load_gunicorn_config(path: Path) -> Any:
    """Read a gunicorn config file the way gunicorn does; return its `Config`.

    The file is executed as a module (as gunicorn's own loader does) and
    its settings applied to gunicorn's `Config`, then GUNICORN_CMD_ARGS on
    top, as gunicorn itself would.
    """
    from gunicorn.config import Config

    spec = importlib.util.spec_from_file_location("_tidings_gunicorn_conf", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = Config()
    for key, value in vars(module).items():
        if key in cfg.settings and value is not None:
            cfg.set(key.lower(), value)
    env_args = os.environ.get("GUNICORN_CMD_ARGS")
    if env_args:
        parsed = cfg.parser().parse_args(shlex.split(env_args))
        for key, value in vars(parsed).items():
            if key in cfg.settings and value is not None:
                cfg.set(key.lower(), value)
    return cfg


def check_gunicorn(path: Path | None, options: Options) -> tuple[Check, int | None]:
    """The gunicorn settings that break Socket.IO; also returns the worker count."""
    if path is None:
        return Check("gunicorn", WARN, "no gunicorn.conf.py found (--gunicorn-config)"), None
    try:
        cfg = load_gunicorn_config(path)
    except (Exception, SystemExit) as exc:
        return Check("gunicorn", FAIL, f"cannot read {path}: {exc}"), None
    worker_class = cfg.worker_class_str
    details = {
        "config": str(path),
        "worker_class": worker_class,
        "workers": cfg.workers,
        "worker_connections": cfg.worker_connections,
        "preload_app": cfg.preload_app,
        "backlog": cfg.backlog,
        "bind": list(cfg.bind),
    }
    failures: list[str] = []
    warnings: list[str] = []
    if cfg.preload_app:
        failures.append(
            "preload_app = True: the app is imported unpatched in the master and its "
            "connections are shared by every worker"
        )
    if "GeventWebSocketWorker" not in worker_class:
        if worker_class in ("gevent", "gunicorn.workers.ggevent.GeventWorker"):
            failures.append(
                f"worker_class {worker_class!r}: with gevent-websocket installed every "
                "websocket upgrade fails; use geventwebsocket.gunicorn.workers."
                "GeventWebSocketWorker"
            )
        else:
            failures.append(
                f"worker_class {worker_class!r} is not gevent's websocket worker "
                "(geventwebsocket.gunicorn.workers.GeventWebSocketWorker)"
            )
    if cfg.workers > 1 and not options.websocket_only:
        failures.append(
            f"workers = {cfg.workers}: long-polling clients fail with 'Invalid session' "
            "without sticky sessions (pass --websocket-only if every client is "
            "websocket-only or the load balancer is sticky)"
        )
    capacity = cfg.workers * cfg.worker_connections
    details["capacity"] = capacity
    if options.expected_clients is not None and capacity < options.expected_clients:
        failures.append(
            f"{cfg.workers} worker(s) x worker_connections {cfg.worker_connections} = "
            f"{capacity} < {options.expected_clients} expected clients"
        )
    elif options.expected_clients is None and cfg.worker_connections <= (
        GUNICORN_DEFAULT_CONNECTIONS
    ):
        warnings.append(
            f"worker_connections = {cfg.worker_connections}: the next websocket of a worker "
            "is refused (--expected-clients N to check against your load)"
        )
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    details["open_files_limit"] = soft
    if soft != resource.RLIM_INFINITY and cfg.worker_connections > soft:
        warnings.append(
            f"worker_connections {cfg.worker_connections} > this shell's open-files limit "
            f"{soft} (ulimit -n): each websocket is a file descriptor"
        )
    line = (
        f"{path.name}: {cfg.workers} worker(s) of {worker_class.rsplit('.', 1)[-1]}, "
        f"worker_connections {cfg.worker_connections}, preload_app {cfg.preload_app}"
    )
    if failures:
        details["problems"] = failures + warnings
        return Check("gunicorn", FAIL, line + ": " + "; ".join(failures), details), cfg.workers
    if warnings:
        details["problems"] = warnings
        return Check("gunicorn", WARN, line + ": " + "; ".join(warnings), details), cfg.workers
    return Check("gunicorn", OK, line, details), cfg.workers


# -- the accept queue ---------------------------------------------------------------------


def _bind_port(binds: list[str]) -> int | None:
    """The TCP port of gunicorn's first `host:port` bind (None for unix sockets)."""
    for bind in binds:
        _, sep, port = bind.rpartition(":")
        if sep and port.isdigit() and not bind.startswith(("unix:", "fd://")):
            return int(port)
    return None


def accept_queue_problems(
    *,
    storm: int,
    backlog: int,
    limits: KernelLimits,
    live: ListeningSocket | None,
    overflowed: int | None,
) -> tuple[int, list[str]]:
    """Return the accept queue's length and what is wrong with it for a storm of `storm` clients.

    The rule: a reconnect storm brings every client back within its first
    jittered retry, under a second, while a new worker is still booting, so
    the whole storm waits in the accept queue at once (bench/storm.py
    measured it: every client was queued at the peak). A connection past the
    queue is dropped and comes back only with TCP's SYN retries (1 s, 3 s,
    7 s...). So the queue, min(backlog, net.core.somaxconn), must hold them
    all. The SYN queue matters only with syncookies off: then new peers'
    SYNs are dropped once it is 3/4 full (tcp_max_syn_backlog).
    """
    configured = min(backlog, limits.somaxconn)
    problems = []
    # The running socket's queue was fixed when it started listening; the
    # configured one is what the next start gets. Both must hold the storm.
    length = configured
    if live is not None and live.limit != configured:
        problems.append(
            f"the running gunicorn listens with an accept queue of {live.limit}, the "
            f"settings now give {configured}: restart it to apply them"
        )
        length = min(configured, live.limit)
    if length < storm:
        fixes = []
        if limits.somaxconn < storm:
            fixes.append(
                f"raise net.core.somaxconn to at least {storm} "
                f"(sysctl -w net.core.somaxconn={storm}; keep it in /etc/sysctl.d/)"
            )
        if backlog < storm:
            fixes.append(f"set gunicorn's backlog to at least {storm}")
        if configured >= storm:
            fixes.append("restart gunicorn")
        problems.append(
            f"accept queue {length} (min(backlog {backlog}, net.core.somaxconn "
            f"{limits.somaxconn})"
            + (f", {live.limit} listening now" if live is not None else "")
            + f") < {storm} clients a reconnect storm brings back at once: the rest are "
            "dropped and wait for TCP's SYN retries (1 s, 3 s, 7 s...): " + " and ".join(fixes)
        )
    if limits.syncookies == 0 and limits.max_syn_backlog * 3 // 4 < storm:
        problems.append(
            f"tcp_syncookies off and tcp_max_syn_backlog {limits.max_syn_backlog}: past "
            f"{limits.max_syn_backlog * 3 // 4} half-open connections, new peers' SYNs are "
            "dropped during a storm (turn syncookies on, or raise tcp_max_syn_backlog)"
        )
    if overflowed:
        problems.append(
            f"the kernel dropped {overflowed} connection(s) at a full accept queue while "
            "this check ran (ListenOverflows, any listening socket on this host)"
        )
    return length, problems


def check_accept_queue(gunicorn: Check, options: Options, before: ListenCounters | None) -> Check:
    """Whether the listening socket's accept queue holds a reconnect storm; overflows seen."""
    limits = kernel_limits()
    if limits is None:
        return Check("accept_queue", SKIP, "skipped: no /proc/sys/net (not Linux)")
    found = gunicorn.details
    if "backlog" not in found:
        return Check("accept_queue", SKIP, "skipped: gunicorn's config could not be read")
    storm = options.expected_clients or found["workers"] * found["worker_connections"]
    port = _bind_port(found["bind"])
    live = listening_socket(port) if port is not None else None
    after = listen_counters()
    overflowed = None if before is None or after is None else (after - before).overflows
    length, problems = accept_queue_problems(
        storm=storm, backlog=found["backlog"], limits=limits, live=live, overflowed=overflowed
    )
    details: dict[str, Any] = {
        "storm": storm,
        "backlog": found["backlog"],
        **asdict(limits),
        "accept_queue": length,
        "live": None if live is None else asdict(live),
        "listen_overflows": None if after is None else after.overflows,
        "listen_drops": None if after is None else after.drops,
        "overflowed_during_check": overflowed,
    }
    since_boot = (
        f"; ListenOverflows {after.overflows}, ListenDrops {after.drops} since boot"
        if after is not None
        else ""
    )
    if problems:
        details["problems"] = problems
        return Check("accept_queue", WARN, "; ".join(problems) + since_boot, details)
    source = f"listening on :{port}" if live is not None else "min(backlog, net.core.somaxconn)"
    return Check(
        "accept_queue",
        OK,
        f"accept queue {length} ({source}) holds a reconnect storm of {storm} clients" + since_boot,
        details,
    )


# -- the end-to-end probe -------------------------------------------------------------


def probe_topic(settings: Settings, requested: str | None) -> tuple[str, bool]:
    """Return the probe topic and whether it needs a token."""
    topic = requested or (
        PUBLIC_PROBE_TOPIC
        if matches_any(PUBLIC_PROBE_TOPIC, settings.public_topics)
        else PRIVATE_PROBE_TOPIC
    )
    return topic, not matches_any(topic, settings.public_topics)


def check_probe(
    client: redis.Redis, settings: Settings, options: Options, topic: str, needs_token: bool
) -> Check:
    """Publish on the probe topic (durable, then fast) and receive both through the web tier."""
    from socketio.exceptions import SocketIOError

    from tidings.client import TidingsClient

    token = None
    if needs_token:
        if not settings.secret:
            return Check(
                "probe",
                FAIL,
                f"probe topic {topic!r} is not public and TIDINGS_SECRET is unset: "
                "pass --probe-topic with a topic TIDINGS_PUBLIC_TOPICS covers",
            )
        from webapp.grants import make_token

        token = make_token(settings.secret, "tidings-doctor", [topic], 300)
    nonce = secrets.token_hex(8)
    arrived: dict[str, float] = {}
    event = threading.Event()

    def on_publication(pub: dict[str, Any]) -> None:
        data = pub.get("data")
        if isinstance(data, dict) and data.get("tidings_probe") == nonce:
            arrived.setdefault(str(data.get("kind")), time.monotonic())
            event.set()

    probe = TidingsClient(options.url, on_publication=on_publication, token=token)
    details: dict[str, Any] = {"url": options.url, "topic": topic}
    try:
        probe.sio.connect(
            options.url,
            auth={"token": token} if token else None,
            transports=["websocket"],
            wait_timeout=options.timeout,
            retry=False,
        )
    except (SocketIOError, OSError, ValueError) as exc:
        return Check("probe", FAIL, f"cannot connect to {options.url}: {exc}", details)
    try:
        ack = probe.subscribe(topic, timeout=options.timeout)
        if not isinstance(ack, dict) or not ack.get("ok"):
            return Check("probe", FAIL, f"subscribe {topic!r} refused: {ack}", details)
        results: dict[str, float | None] = {}
        for kind, durable in (("durable", True), ("fast", False)):
            event.clear()
            sent = time.monotonic()
            publish(
                topic,
                {"tidings_probe": nonce, "kind": kind, "sent_ms": now_ms()},
                durable=durable,
                client=client,
                settings=settings,
            )
            deadline = sent + options.timeout
            while kind not in arrived and time.monotonic() < deadline:
                event.wait(0.05)
            results[kind] = (arrived[kind] - sent) * 1000 if kind in arrived else None
        details["latency_ms"] = {k: None if v is None else round(v, 1) for k, v in results.items()}
    except (SocketIOError, OSError, redis.RedisError) as exc:
        return Check("probe", FAIL, f"probe failed: {exc}", details)
    finally:
        probe.sio.disconnect()
    durable_ms, fast_ms = results["durable"], results["fast"]
    if durable_ms is None:
        return Check(
            "probe",
            FAIL,
            f"a durable publication on {topic} did not reach a client of {options.url} "
            f"within {options.timeout:g} s",
            details,
        )
    line = f"{topic} via {options.url}: durable {durable_ms:.0f} ms"
    if fast_ms is None:
        return Check("probe", WARN, line + ", fast publication lost (at most once)", details)
    return Check("probe", OK, line + f", fast {fast_ms:.0f} ms publish-to-client", details)


# -- the command ------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def default_url(settings: Settings) -> str:
    """Return the web tier's URL from TIDINGS_BIND (a wildcard host means this host)."""
    host, _, port = settings.bind.rpartition(":")
    if host in ("0.0.0.0", "::", "[::]", ""):
        host = "127.0.0.1"
    return f"http://{host}:{port}"


def _safe_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        netloc = parts.netloc.replace(":" + parts.password + "@", ":***@")
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def run_checks(client: redis.Redis, settings: Settings, options: Options) -> list[Check]:
    """Run every check in order; a check that cannot run says so instead of raising."""
    listen_before = listen_counters()
    gunicorn_check, gunicorn_workers = check_gunicorn(options.gunicorn_config, options)
    redis_check = check_redis(client)
    checks = [redis_check]
    topic, needs_token = probe_topic(settings, options.probe_topic)
    redis_checks = (
        ("lease", lambda: check_lease(client)),
        ("listeners", lambda: check_listeners(client, settings, topic)),
        ("web_workers", lambda: check_web_workers(client, gunicorn_workers)),
        ("proxies", lambda: check_proxies(client, settings)),
        ("routing", lambda: check_routing(client)),
        ("ingest", lambda: check_ingest(client)),
    )
    for name, run in redis_checks:
        if redis_check.status == FAIL:
            checks.append(Check(name, SKIP, "skipped: Redis unreachable"))
            continue
        try:
            checks.append(run())
        except redis.RedisError as exc:
            checks.append(Check(name, FAIL, f"Redis error: {exc}"))
    checks.append(gunicorn_check)
    if not options.probe:
        checks.append(Check("probe", SKIP, "skipped (--no-probe)"))
    elif redis_check.status == FAIL:
        checks.append(Check("probe", SKIP, "skipped: Redis unreachable"))
    else:
        checks.append(check_probe(client, settings, options, topic, needs_token))
    # Last: overflows during the whole run, probe included, count.
    checks.append(check_accept_queue(gunicorn_check, options, listen_before))
    return checks


def render(checks: list[Check], header: str) -> str:
    """Return the human report: a header, one line per check, a verdict."""
    label = {OK: "ok", WARN: "WARN", FAIL: "FAIL", SKIP: "skip"}
    width = max(len(c.name) for c in checks)
    lines = [header]
    lines += [f"  {label[c.status]:<5} {c.name:<{width}}  {c.summary}" for c in checks]
    failing = [c.name for c in checks if c.status == FAIL]
    warning = [c.name for c in checks if c.status == WARN]
    if failing:
        verdict = f"verdict: FAIL ({', '.join(failing)})"
    elif warning:
        verdict = f"verdict: ok, with warnings ({', '.join(warning)})"
    else:
        verdict = "verdict: ok"
    lines.append(verdict)
    return "\n".join(lines)


@click.command("doctor")
@click.option("--url", help="The web tier's URL (default: from TIDINGS_BIND).")
@click.option(
    "--gunicorn-config",
    type=click.Path(dir_okay=False, path_type=Path),
    help="gunicorn config file to check (default: ./gunicorn.conf.py).",
)
@click.option(
    "--expected-clients",
    type=click.IntRange(1),
    help="Concurrent websocket clients to expect (checks worker_connections).",
)
@click.option(
    "--websocket-only",
    is_flag=True,
    help="Clients are websocket-only (or sessions are sticky): several workers are fine.",
)
@click.option(
    "--timeout", default=10.0, show_default=True, type=click.FloatRange(0.1), help="Probe wait."
)
@click.option("--probe-topic", help="The probe's topic (default: public.tidings.probe).")
@click.option("--no-probe", is_flag=True, help="Skip the end-to-end probe.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")
@with_appcontext
def doctor_command(
    url: str | None,
    gunicorn_config: Path | None,
    expected_clients: int | None,
    websocket_only: bool,
    timeout: float,
    probe_topic: str | None,
    no_probe: bool,
    as_json: bool,
) -> None:
    """Check Redis, the listener, the web workers, gunicorn's settings, and probe end to end."""
    settings: Settings = current_app.extensions["tidings.settings"]
    if probe_topic is not None and not is_valid_topic(probe_topic):
        raise click.BadParameter("not a topic", param_hint="--probe-topic")
    options = Options(
        url=(url or default_url(settings)).rstrip("/"),
        gunicorn_config=gunicorn_config or default_gunicorn_config(),
        expected_clients=expected_clients,
        websocket_only=websocket_only,
        timeout=timeout,
        probe=not no_probe,
        probe_topic=probe_topic,
    )
    client: redis.Redis = current_app.extensions["tidings.redis"]
    checks = run_checks(client, settings, options)
    ok = not any(c.status == FAIL for c in checks)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "ok": ok,
                    "redis_url": _safe_url(settings.redis_url),
                    "url": options.url,
                    "checks": [asdict(c) for c in checks],
                },
                default=str,
            )
        )
    else:
        header = f"tidings doctor: {_safe_url(settings.redis_url)}, web tier {options.url}"
        click.echo(render(checks, header))
    sys.stdout.flush()
    if not ok:
        raise SystemExit(1)


def init_app(app: Flask) -> None:
    """Register `flask --app webapp doctor`."""
    app.cli.add_command(doctor_command)
