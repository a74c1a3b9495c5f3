"""Redis connections that say who they are (CLIENT SETNAME), fail fast, and follow failovers.

`connect()` takes any TIDINGS_REDIS_URL: `redis://`, `rediss://`, `unix://`,
or `redis+sentinel://host1:port1,host2:port2/<db>/<service>`, for which it
returns a client of the service's current master (redis-py's
`Sentinel.master_for`) with the same name and timeouts.

Following a failover takes more than redis-py does on its own. A client
re-asks the sentinels only when it opens a new connection, and a demoted
master keeps its clients: after `SENTINEL FAILOVER` the old master stays
writable for about ten seconds (until the sentinels reconfigure it as a
replica), and a pub/sub connection to it stays up for good, hearing nothing
the new master publishes. So every process that connected through a
Sentinel URL runs one watcher thread (a greenlet under gevent) that asks all
the sentinels for the master twice a second, believes the answer with the
highest configuration epoch, and when the master moved, closes the watched
clients' idle connections and shuts down the sockets of those in use: each
user's next command, or its reconnect loop, lands on the new master.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import weakref

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel, SentinelConnectionPool

from tidings.settings import SENTINEL_SCHEME, parse_sentinel_url

log = logging.getLogger("tidings.connection")

# A Redis that does not answer within this many seconds is treated as down:
# callers back off and retry instead of hanging a loop that must stay live.
SOCKET_TIMEOUT = 5.0
# Connections one process may open to Redis; more callers wait their turn.
MAX_CONNECTIONS = 256
# Sentinels answer from memory: a slow one is skipped rather than waited for.
SENTINEL_TIMEOUT = 1.0
# How often the watcher asks the sentinels where the master is. Well inside
# the listener lease (3 s), so the listener moves before its lease expires
# on the new master.
WATCH_SECONDS = 0.5

Address = tuple[str, int]


def client_name(role: str) -> str:
    """Return the CLIENT SETNAME value for this process: tidings:<role>:<host>:<pid>."""
    host = socket.gethostname().replace(" ", "_")
    return f"tidings:{role}:{host}:{os.getpid()}"


def is_sentinel_url(url: str) -> bool:
    """Tell whether `url` names a Sentinel-managed master."""
    return url.startswith(SENTINEL_SCHEME + "://")


def connect(url: str, role: str, **options: object) -> redis.Redis:
    """Return a Redis client whose connections carry this process's name.

    For a `redis+sentinel://` URL, a client of the current master that
    follows failovers (see the module's docstring).
    """
    options.setdefault("socket_timeout", SOCKET_TIMEOUT)
    options.setdefault("socket_connect_timeout", SOCKET_TIMEOUT)
    options.setdefault("health_check_interval", 10)
    max_connections = options.pop("max_connections", MAX_CONNECTIONS)
    if is_sentinel_url(url):
        return _sentinel_client(url, client_name(role), options)
    # A blocking pool: past MAX_CONNECTIONS a caller waits for a free
    # connection (up to the socket timeout) instead of failing at once, as
    # redis-py's default pool does at 100 (a burst of subscribes in one web
    # worker hit that and answered `unavailable`).
    pool = redis.BlockingConnectionPool.from_url(
        url,
        client_name=client_name(role),
        max_connections=max_connections,
        timeout=SOCKET_TIMEOUT,
        **options,
    )
    return redis.Redis(connection_pool=pool)


class _EpochSentinel(Sentinel):
    """A Sentinel manager that asks every sentinel and believes the newest configuration.

    redis-py takes the first sentinel's answer; during a failover a sentinel
    that has not heard of it yet names the old master. The configuration
    epoch orders the answers.
    """

    def discover_master(self, service_name: str) -> Address:
        best: tuple[int, Address] | None = None
        errors = []
        for sentinel in self.sentinels:
            try:
                state = sentinel.sentinel_masters().get(service_name)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                errors.append(repr(exc))
                continue
            if not state or not self.check_master_state(state, service_name):
                continue
            epoch = int(state.get("config-epoch", 0))
            if best is None or epoch > best[0]:
                best = (epoch, (state["ip"], int(state["port"])))
        if best is None:
            detail = f": {', '.join(errors)}" if errors else ""
            raise MasterNotFoundError(f"No master found for {service_name!r}{detail}")
        return best[1]


def _sentinel_client(url: str, name: str, options: dict[str, object]) -> redis.Redis:
    parsed = parse_sentinel_url(url)
    socket_timeout = options.get("socket_timeout") or SOCKET_TIMEOUT
    sentinel_timeout = min(float(socket_timeout), SENTINEL_TIMEOUT)  # type: ignore[arg-type]
    manager = _manager(parsed.sentinels, sentinel_timeout)
    kwargs = dict(options, client_name=name, db=parsed.db)
    if parsed.username:
        kwargs["username"] = parsed.username
    if parsed.password:
        kwargs["password"] = parsed.password
    client = manager.master_for(parsed.service, **kwargs)
    follow_master(client)
    return client


# One Sentinel manager per (sentinels, timeout) per process: its connections
# to the sentinels are shared by every client, and by the watcher.
_managers: dict[tuple, _EpochSentinel] = {}
_managers_lock = threading.Lock()


def _manager(sentinels: tuple[Address, ...], timeout: float) -> _EpochSentinel:
    key = (sentinels, timeout)
    with _managers_lock:
        manager = _managers.get(key)
        if manager is None:
            manager = _EpochSentinel(
                list(sentinels),
                sentinel_kwargs={
                    "socket_timeout": timeout,
                    "socket_connect_timeout": timeout,
                    "client_name": client_name("sentinel"),
                    # A sentinel that is down is skipped at once for the
                    # next one (redis-py would retry it for ~4 s).
                    "retry": Retry(NoBackoff(), 0),
                },
            )
            _managers[key] = manager
        return manager


class _Watch:
    """The clients of one service and the master they should be talking to."""

    def __init__(self, manager: _EpochSentinel, service: str) -> None:
        self.manager = manager
        self.service = service
        self.master: Address | None = None
        self.pools: weakref.WeakSet[SentinelConnectionPool] = weakref.WeakSet()
        self.unreachable = False


_watches: dict[tuple, _Watch] = {}
_watch_lock = threading.Lock()
_watcher: threading.Thread | None = None
_watcher_pid = 0


def follow_master(client: redis.Redis) -> bool:
    """Keep a Sentinel-managed client on the current master; False for any other client.

    Registers the client's pool with this process's watcher (started on
    first use). Any `master_for` client may be passed, also one built
    elsewhere (python-socketio's message queue).
    """
    global _watcher, _watcher_pid
    pool = client.connection_pool
    if not isinstance(pool, SentinelConnectionPool) or not pool.is_master:
        return False
    manager = pool.sentinel_manager
    if not isinstance(manager, _EpochSentinel):
        # Ask the sentinels our way, with our timeouts.
        kwargs = manager.sentinel_kwargs
        timeout = float(kwargs.get("socket_timeout") or SENTINEL_TIMEOUT)
        addresses = tuple(
            (
                s.connection_pool.connection_kwargs["host"],
                s.connection_pool.connection_kwargs["port"],
            )
            for s in manager.sentinels
        )
        manager = _manager(addresses, min(timeout, SENTINEL_TIMEOUT))
    key = (id(manager), pool.service_name)
    with _watch_lock:
        if _watcher_pid != os.getpid():  # first use in this process
            _watches.clear()
            _watcher, _watcher_pid = None, os.getpid()
        watch = _watches.get(key)
        if watch is None:
            watch = _watches[key] = _Watch(manager, pool.service_name)
        watch.pools.add(pool)
        if _watcher is None or not _watcher.is_alive():
            _watcher = threading.Thread(target=_watch_forever, name="tidings-sentinel", daemon=True)
            _watcher.start()
    return True


def _after_fork_in_child() -> None:
    """Forget the parent's watcher, and its locks (a fork may copy them held)."""
    global _watch_lock, _managers_lock, _watcher, _watcher_pid
    _watch_lock = threading.Lock()
    _managers_lock = threading.Lock()
    _watches.clear()
    _managers.clear()
    _watcher, _watcher_pid = None, 0


os.register_at_fork(after_in_child=_after_fork_in_child)


def _watch_forever() -> None:
    """Check every watched service until no watched client is left (then exit)."""
    global _watcher
    pause = threading.Event()  # never set: only its timed wait is used
    while not pause.wait(WATCH_SECONDS):
        with _watch_lock:
            if not any(watch.pools for watch in _watches.values()):
                # Every watched client is gone (a listener task that found
                # the lease held, in a pool process that lives on): stop
                # asking; the next follow_master() starts a watcher again.
                _watches.clear()
                _watcher = None
                return
            watches = list(_watches.values())
        for watch in watches:
            with contextlib.suppress(Exception):  # the watcher must never die
                _check(watch)


def _check(watch: _Watch) -> None:
    try:
        master = watch.manager.discover_master(watch.service)
    except redis.ConnectionError as exc:
        if not watch.unreachable:
            log.warning("Sentinel: no master for %r right now (%s)", watch.service, exc)
            watch.unreachable = True
        return
    if watch.unreachable:
        log.info("Sentinel: master of %r is %s:%d", watch.service, *master)
        watch.unreachable = False
    if watch.master is not None and master != watch.master:
        log.warning(
            "Sentinel: the master of %r moved from %s:%d to %s:%d; reconnecting",
            watch.service,
            *watch.master,
            *master,
        )
    watch.master = master
    for pool in list(watch.pools):
        current = pool.master_address
        if current is not None and (current[0], int(current[1])) != master:
            _drop_connections(pool)


def _drop_connections(pool: SentinelConnectionPool) -> None:
    """Make every connection of `pool` reconnect: idle ones now, in-use ones at their owner.

    An in-use connection belongs to another thread (or greenlet), which may be
    reading from it: closing it under that reader breaks redis-py's parser
    (ValueError, EBADF). Shutting its socket down instead makes the blocked
    read, or the next one, see the end of the stream: a ConnectionError in the
    owner, which disconnects and reconnects (redis-py's retry, or the owner's
    loop), asking the sentinels anew.
    """
    pool.disconnect(inuse_connections=False)
    with pool._lock:
        in_use = list(pool._in_use_connections)
    for connection in in_use:
        sock = getattr(connection, "_sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
