"""gunicorn settings for the naive example, as a benchmark peer of Tidings.

    NAIVE_REDIS_URL=redis://127.0.0.1:6379/0 NAIVE_BIND=127.0.0.1:8001 NAIVE_WORKERS=2 \\
    gunicorn -c examples/naive_thread/gunicorn.conf.py

Equivalent to the command in `app.py`'s docstring. Add `--preload` on the
command line to load the app in the master (see the docstring for what that
does to delivery).
"""

import os

wsgi_app = "examples.naive_thread.app:app"
bind = [os.environ.get("NAIVE_BIND", "127.0.0.1:8001")]
worker_class = "geventwebsocket.gunicorn.workers.GeventWebSocketWorker"
workers = int(os.environ.get("NAIVE_WORKERS", "2"))
worker_connections = int(os.environ.get("NAIVE_WORKER_CONNECTIONS", "1000"))
# Several gunicorns on one host would take over each other's control socket.
control_socket_disable = True
# Websockets never finish on their own: do not wait long for them on restart.
graceful_timeout = 5
