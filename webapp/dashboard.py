"""The live dashboard at `/` and its progress demo."""

from __future__ import annotations

import logging
import secrets

from celery import Celery
from flask import Blueprint, Flask, current_app, render_template

from tidings.connection import client_name

log = logging.getLogger("tidings.dashboard")

bp = Blueprint("dashboard", __name__)

DEMO_TASK = "tidings.demo.progress"


@bp.get("/")
def index() -> str:
    """Serve the dashboard page."""
    return render_template("index.html")


@bp.post("/api/demo/progress")
def start_demo_job() -> tuple[dict, int]:
    """Start the demo Celery job and answer with the topic its progress goes to."""
    topic = f"public.jobs.{secrets.token_hex(6)}"
    try:
        result = current_app.extensions["tidings.celery"].send_task(
            DEMO_TASK, args=[topic], queue="celery", retry=False
        )
    except Exception as exc:  # the broker is down: say so, do not crash the worker
        log.warning("demo job not started: broker unavailable (%s)", exc)
        return {"ok": False, "error": "unavailable"}, 503
    return {"ok": True, "topic": topic, "task_id": result.id}, 202


def init_app(app: Flask) -> None:
    """Register the dashboard and a send-only Celery client for the demo job."""
    settings = app.extensions["tidings.settings"]
    # Send-only: the web tier dispatches by task name and never imports tasks/.
    transport_options = {"client_name": client_name("web-celery")}
    if settings.broker_url.startswith("sentinel://"):  # as in celeryconfig.py
        transport_options["master_name"] = settings.sentinel_master
    app.extensions["tidings.celery"] = Celery(
        "tidings-web", broker=settings.broker_url, broker_transport_options=transport_options
    )
    app.register_blueprint(bp)
