"""The naive design Tidings replaces: a Redis listener thread inside the web app.

This is the pattern found in most Flask-SocketIO tutorials and answers, kept
small and faithful on purpose: it is the bug exhibit of
`tests/integration/test_naive_thread.py` and a benchmark peer. It speaks the
same Socket.IO protocol as Tidings (`subscribe` joins the room `t:<topic>`,
event `publications` carries a list of `{"topic", "offset", "data"}`), so the
same clients work against both; `offset` is always null here.

    NAIVE_REDIS_URL=redis://127.0.0.1:6379/0 \\
    gunicorn -k geventwebsocket.gunicorn.workers.GeventWebSocketWorker -w 2 \\
        --no-control-socket -b 127.0.0.1:8001 examples.naive_thread.app:app

Importing the module starts a thread that runs `for m in pubsub.listen()` on
`PSUBSCRIBE tidings:topic:*` and emits each message to the topic's room
through the Socket.IO message queue (channel `naive:socketio`), as the
Flask-SocketIO docs advise for more than one worker. It goes wrong in two ways:

(a) One listener per process that imports the app, and nobody in charge.
    Without `--preload`, gunicorn's N workers each import the module, so N
    threads each forward every message into the shared queue and every
    worker delivers every copy: each client receives each publication N
    times. With `--preload` the module is imported once, in the unpatched
    master: the thread is a real OS thread of the master (fork copies no
    threads, so the workers have none) and forwards each message once, but
    the message-queue manager, and with it its random `host_id`, was also
    created in the master and copied into every worker by fork. A worker
    drops queue messages carrying its own `host_id` as "already handled
    here", so the master's emits are dropped by all workers: every
    publication is lost, silently (the same shared id would drop any emit
    from one worker to another worker's clients). Either way the listener
    is unsupervised: when Redis goes away, even for a restart, `listen()`
    raises once redis-py's few reconnection tries are refused (measured:
    0.1 s into the outage), the thread dies with a traceback, and nothing is
    forwarded again until gunicorn is restarted.

(b) The thread shares the worker's gevent hub. `patch_all()` turns it into a
    greenlet and `listen()` on a patched socket yields, but any variant that
    does not yield (a `while True: pubsub.get_message()` poll without sleep,
    a socket created before patching, a C extension doing blocking I/O, a
    CPU-heavy transform of each message) stops every other greenlet of the
    worker: websockets, heartbeats, HTTP requests, until gunicorn's timeout
    kills the worker. `NAIVE_LOOP=busy` selects the non-yielding poll so the
    starvation can be seen (`GEVENT_MONITOR_THREAD_ENABLE=true` prints it).

Tidings instead runs exactly one listener (a leased Celery task, outside the
web tier), supervised and replaced within seconds, and the web workers only
consume the message queue.
"""

from __future__ import annotations

import json
import os
import threading

import redis
from flask import Flask
from flask_socketio import SocketIO, join_room

REDIS_URL = os.environ.get("NAIVE_REDIS_URL", "redis://127.0.0.1:6379/0")
PATTERN = "tidings:topic:*"
PREFIX = "tidings:topic:"

app = Flask(__name__)
socketio = SocketIO(app, message_queue=REDIS_URL, channel="naive:socketio")
r = redis.Redis.from_url(REDIS_URL)


def forward(message: dict) -> None:
    """Emit one Redis message to its topic's room."""
    topic = message["channel"].decode()[len(PREFIX) :]
    data = json.loads(message["data"])
    socketio.emit("publications", [{"topic": topic, "offset": None, "data": data}], to="t:" + topic)


def listen() -> None:
    """The listener thread: forward every published message, forever (or so it seems)."""
    pubsub = r.pubsub(ignore_subscribe_messages=True)
    pubsub.psubscribe(PATTERN)
    print(f"naive listener started in pid {os.getpid()}", flush=True)
    if os.environ.get("NAIVE_LOOP") == "busy":
        while True:  # never yields to the gevent hub
            message = pubsub.get_message()
            if message:
                forward(message)
    for message in pubsub.listen():
        if message["type"] == "pmessage":
            forward(message)
    print(f"naive listener ended in pid {os.getpid()}", flush=True)


@socketio.on("subscribe")
def subscribe(payload: dict) -> dict:
    """Join the topic's room."""
    join_room("t:" + payload["topic"])
    return {"ok": True}


@app.get("/healthz")
def healthz() -> str:
    """Answer while the process serves."""
    return "ok"


threading.Thread(target=listen, daemon=True).start()
