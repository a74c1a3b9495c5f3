"""The common real use, shown working: a long Celery job reporting progress live."""

from __future__ import annotations

import time

from tasks import app
from tidings import publish


@app.task(name="tidings.demo.progress", ignore_result=True)
def progress(topic: str, steps: int = 20, step_seconds: float = 0.15) -> None:
    """Run a job in `steps` steps and publish its progress on `topic`."""
    for step in range(1, steps + 1):
        time.sleep(step_seconds)  # stands in for one step of real work
        publish(
            topic,
            {"step": step, "steps": steps, "percent": step * 100 // steps, "done": step == steps},
        )
