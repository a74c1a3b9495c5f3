"""The listener as a Celery task, and the bootstep that keeps exactly one running.

Every worker runs `ListenerSupervisor` in its main process: once a second it
checks the lease and, when nobody holds it, dispatches the listener task to
the `tidings.listener` queue. Whichever process picks it up first takes the
lease; any other copy finds the lease held and returns at once. On warm
shutdown the supervisor sends SIGTERM to the pool process running the
listener (Celery's own shutdown signal stays in the main process), so the
listener stops, releases the lease and the task returns: the next worker's
supervisor takes over within a second.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from typing import ClassVar

import redis
from celery import bootsteps
from celery.worker import state as worker_state

from tasks import app
from tidings.connection import connect
from tidings.keys import LEASE_KEY
from tidings.listener import Listener
from tidings.logs import configure
from tidings.settings import load_or_exit

log = logging.getLogger("tidings.supervisor")

TASK_NAME = "tidings.listener"
QUEUE = "tidings.listener"
CHECK_EVERY_SECONDS = 1.0
# A dispatched listener that no process picks up within this long is
# dropped: the next check dispatches a fresh one if still needed.
DISPATCH_EXPIRES_SECONDS = 10


@app.task(name=TASK_NAME, bind=True, ignore_result=True, acks_late=False)
def run_listener(self) -> bool:
    """Hold the listener lease and forward until stopped; False when another holds it."""
    settings = load_or_exit()
    configure("listener", settings.log_level, settings.log_format)
    listener = Listener(settings)
    previous = signal.signal(signal.SIGTERM, lambda *_: listener.stop())
    try:
        return listener.run()
    finally:
        signal.signal(signal.SIGTERM, previous)


class ListenerSupervisor(bootsteps.StartStopStep):
    """Dispatches the listener when no lease is held; stops it on shutdown."""

    requires: ClassVar = {"celery.worker.components:Pool", "celery.worker.components:Timer"}

    def __init__(self, worker, **kwargs) -> None:
        super().__init__(worker, **kwargs)
        self._tref = None
        self._redis: redis.Redis | None = None
        self._down = False

    def start(self, worker) -> None:
        settings = load_or_exit()
        configure("worker", settings.log_level, settings.log_format)
        # Short timeouts: the check runs in the worker's event loop.
        self._redis = connect(
            settings.redis_url, "supervisor", socket_timeout=0.5, socket_connect_timeout=0.5
        )
        self._tref = worker.timer.call_repeatedly(CHECK_EVERY_SECONDS, self.check, priority=10)
        self.check()

    def check(self) -> None:
        """Dispatch the listener task if nobody holds the lease."""
        assert self._redis is not None
        try:
            if self._redis.exists(LEASE_KEY):
                self._down = False
                return
            run_listener.apply_async(queue=QUEUE, expires=DISPATCH_EXPIRES_SECONDS, retry=False)
            self._down = False
            log.info("no listener holds the lease; dispatched one")
        except Exception as exc:  # Redis or the broker down: try again next tick
            if not self._down:
                log.warning("cannot check or dispatch the listener (%s); retrying", exc)
                self._down = True

    def stop(self, worker) -> None:
        if self._tref is not None:
            self._tref.cancel()
            self._tref = None
        for request in list(worker_state.active_requests):
            if request.name == TASK_NAME and request.worker_pid:
                log.info("stopping the listener in pool process %d", request.worker_pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(request.worker_pid, signal.SIGTERM)
        if self._redis is not None:
            self._redis.close()

    def shutdown(self, worker) -> None:
        self.stop(worker)


app.steps["worker"].add(ListenerSupervisor)

__all__ = ["ListenerSupervisor", "run_listener"]
