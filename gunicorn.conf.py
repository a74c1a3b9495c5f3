"""gunicorn settings for the Tidings web tier: `gunicorn -c gunicorn.conf.py`."""

from tidings.settings import load_or_exit

_settings = load_or_exit()

# The app is named here so the command needs no argument.
wsgi_app = "webapp.wsgi:app"
bind = [_settings.bind]  # TIDINGS_BIND, or 0.0.0.0:$PORT on platforms that set PORT

# gevent-websocket's worker: it calls gevent's patch_all() in each worker
# after fork and serves websocket upgrades (plain `-k gevent` cannot).
worker_class = "geventwebsocket.gunicorn.workers.GeventWebSocketWorker"
# WEB_CONCURRENCY, default 1. More than one worker needs websocket-only
# clients or sticky sessions: a long-polling session lives in one worker.
workers = _settings.web_concurrency
# Default 1000 refuses the 1,001st websocket; each is one greenlet and one
# file descriptor (the open-files limit bounds it too).
worker_connections = _settings.worker_connections

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
