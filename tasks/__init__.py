"""The Celery app: `celery -A tasks worker` runs the Tidings listener and the demo task."""

from celery import Celery

app = Celery("tasks")
app.config_from_object("celeryconfig")

from tasks import demo, listener, webhooks  # noqa: E402  (registers the tasks and bootsteps)

__all__ = ["app", "demo", "listener", "webhooks"]
