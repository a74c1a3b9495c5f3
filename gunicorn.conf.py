"""gunicorn settings for the Tidings web tier: `gunicorn -c gunicorn.conf.py`."""

import glob
import os
import shutil
import sys
import tempfile

# redis-py in the web tier parses replies in Python: its hiredis parser asks
# select.poll() whether a reply is waiting, and under gevent every such poll
# is a trip through the hub (one per pool checkout): more CPU than hiredis
# saves, and the switches let other greenlets run first. Hiding the module
# here, in the master before any worker forks, makes redis-py pick its own
# parser. The message-queue connection (tidings.pubsub) only feeds hiredis'
# Reader bytes it has read itself, no poll: it finds it under another name
# (3x faster than the pure-Python reader per queue message).
# (A process that imported it already, such as `flask doctor` reading this
# file, keeps it: its redis-py may be using it.)
if "hiredis" not in sys.modules:
    try:
        import hiredis as _hiredis

        sys.modules["_tidings_hiredis"] = _hiredis
    except ImportError:  # pragma: no cover - hiredis is in requirements.lock
        pass
    sys.modules["hiredis"] = None

from tidings.settings import load_or_exit

_settings = load_or_exit()

# The app is named here so the command needs no argument.
wsgi_app = "webapp.wsgi:app"
bind = [_settings.bind]  # TIDINGS_BIND, or 0.0.0.0:$PORT on platforms that set PORT

# gevent-websocket's worker: it calls gevent's patch_all() in each worker
# after fork and serves websocket upgrades (plain `-k gevent` cannot).
worker_class = "webapp.worker.GeventWebSocketWorker"  # that one, reading websockets via 512 B
# WEB_CONCURRENCY, default 1. More than one worker needs websocket-only
# clients or sticky sessions: a long-polling session lives in one worker.
workers = _settings.web_concurrency
# Default 1000 refuses the 1,001st websocket; each is one greenlet and one
# file descriptor (the open-files limit bounds it too).
worker_connections = _settings.worker_connections
# The accept queue must hold a reconnect storm: after a worker dies, or the
# whole tier restarts, every client comes back within its first jittered
# retry (under a second), before a new worker has booted and accepts
# (bench/storm.py: 3,700 of 5,000 queued at once). A connection past the
# queue is dropped, and its client's TCP tries again only after 1 s, 3 s,
# 7 s... (gunicorn's default 2048 dropped 2,043 of them). So: room for every
# connection this host allows (workers x worker_connections), never less
# than 2048. The kernel silently caps it at net.core.somaxconn (4096 on
# Linux >= 5.4, 128 before); `flask --app webapp doctor` warns when that is
# too small.
backlog = _settings.backlog

# Never import the app in the master: it would run unpatched and its Redis
# connections and greenlets would be copied into every worker.
preload_app = False

# A second gunicorn on this host would silently take over the control socket
# (gunicorn >= 25.1); Tidings does not use it.
control_socket_disable = True

# Websockets never finish on their own, so a restart waits the whole grace
# period: keep it short; clients reconnect and recover from history.
graceful_timeout = 5
timeout = 30

# -- metrics -----------------------------------------------------------------

# gevent's monitor thread reports an event loop blocked longer than
# GEVENT_MAX_BLOCKING_TIME (default 0.1 s): /metrics counts it as
# tidings_gevent_hub_blocked_total and the worker logs one line. Its stack
# dumps stay off unless asked for (GEVENT_MONITOR_PRINT_BLOCKING_REPORTS=true),
# and off, webapp/metrics.py keeps gevent from building them at all: a walk of
# every greenlet on the heap per block, which itself blocks a busy worker.
# Set before any worker starts: gevent reads them when its hub starts.
os.environ.setdefault("GEVENT_MONITOR_THREAD_ENABLE", "true")
os.environ.setdefault("GEVENT_MONITOR_PRINT_BLOCKING_REPORTS", "false")


def on_starting(server):
    """Give prometheus_client's multiprocess mode a clean directory for this master.

    Every worker writes its metrics there and /metrics sums them, whichever
    worker answers. An operator's PROMETHEUS_MULTIPROC_DIR is emptied of
    stale files; otherwise a fresh temporary directory is made, and removed
    at exit.
    """
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if directory:
        os.makedirs(directory, exist_ok=True)
        for name in glob.glob(os.path.join(directory, "*.db")):
            os.remove(name)
        return
    # Directories of masters that died without their on_exit (SIGKILL) go too.
    pattern = os.path.join(tempfile.gettempdir(), "tidings-metrics-*-*")
    for stale in glob.glob(pattern):
        pid = os.path.basename(stale).split("-")[2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    directory = tempfile.mkdtemp(prefix=f"tidings-metrics-{os.getpid()}-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    server._tidings_metrics_dir = directory


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def child_exit(server, worker):
    """Drop a dead worker's live gauges (connections, subscriptions) from /metrics."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    """Remove the metrics directory this master made."""
    directory = getattr(server, "_tidings_metrics_dir", None)
    if directory:
        shutil.rmtree(directory, ignore_errors=True)
