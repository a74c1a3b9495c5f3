"""The Tidings web tier: Flask + Flask-SocketIO, run by gunicorn's gevent websocket worker."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Flask


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    """Build the app; `test_config` may carry `SETTINGS`, `ASYNC_MODE`, `SUBSCRIBE_QUEUE`."""
    # Imported here, not at the top: gunicorn's master imports the worker
    # class (`webapp.worker`), hence this package, before any worker has
    # called gevent's patch_all(). Flask, redis-py, urllib3 and the rest must
    # first be imported in a patched worker, or they keep unpatched locks
    # and queues.
    from flask import Flask
    from gevent import monkey

    from tidings.connection import connect
    from tidings.logs import configure
    from tidings.settings import Settings, load_or_exit
    from webapp import (
        api,
        backpressure,
        cli,
        dashboard,
        doctor,
        health,
        metrics,
        operator_cli,
        ops,
        pings,
        presence,
        realtime,
        server_api,
        sse,
    )
    from webapp.extensions import socketio
    from webapp.origins import allowed_origins
    from webapp.queue import QueueManager

    app = Flask(__name__)
    serving = monkey.is_module_patched("socket")  # inside gunicorn's gevent worker
    app.config.from_mapping(
        ASYNC_MODE="gevent" if serving else "threading",
        # CLI commands build the app too; only a serving worker listens.
        SUBSCRIBE_QUEUE=serving,
        # False only for Flask-SocketIO's in-process test client, which
        # refuses a message queue.
        QUEUE=True,
    )
    if test_config:
        app.config.update(test_config)
    settings: Settings = app.config.get("SETTINGS") or load_or_exit()
    configure("web", settings.log_level, settings.log_format)
    app.extensions["tidings.settings"] = settings
    app.config["MAX_CONTENT_LENGTH"] = settings.max_publish_body  # 413 beyond
    app.extensions["tidings.redis"] = connect(settings.redis_url, "web")
    manager = (
        QueueManager(
            settings.redis_url,
            history=app.extensions["tidings.redis"],
            history_size=settings.history_size,
            linger=settings.queue_linger_ms / 1000,
        )
        if app.config["QUEUE"]
        else None
    )
    app.extensions["tidings.queue"] = manager
    socketio.init_app(
        app,
        async_mode=app.config["ASYNC_MODE"],
        client_manager=manager,
        cors_allowed_origins=allowed_origins(settings.cors_origins),
        # Inbound Socket.IO messages (websocket frames, polling bodies).
        max_http_buffer_size=settings.max_message_bytes,
        logger=False,
        engineio_logger=False,
    )
    # Subscribe to the queue now rather than at the first client's connect,
    # so that /readyz tells the truth from the start.
    if manager and app.config["SUBSCRIBE_QUEUE"] and not socketio.server.manager_initialized:
        socketio.server.manager_initialized = True
        manager.initialize()
    backpressure.install(
        socketio.server,
        max_packets=settings.client_queue_packets,
        max_bytes=settings.client_queue_bytes,
    )
    pings.install()
    # presence before realtime: the Socket.IO handlers call its hooks.
    for feature in (presence, realtime, sse, health, api, dashboard, cli, metrics, ops, doctor):
        feature.init_app(app)
    for feature in (server_api, operator_cli):  # the server API (issue 14)
        feature.init_app(app)
    return app
