"""One log line per event that matters, tagged with role and pid; text or JSON.

`TIDINGS_LOG_FORMAT=json` prints one JSON object per line with the fields
`ts` (UTC, ISO 8601, milliseconds), `level`, `role`, `pid`, `logger`,
`message`, and `topic` when the call passes `extra={"topic": ...}`; an
unexpected exception adds `exc` (its traceback, as one string).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import UTC, datetime
from typing import Any

_FORMAT = "%(asctime)s %(levelname)s [%(tidings_role)s pid=%(process)d] %(name)s: %(message)s"
FORMATS = ("text", "json")


class _RoleFilter(logging.Filter):
    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def filter(self, record: logging.LogRecord) -> bool:
        record.tidings_role = self.role
        return True


class JsonFormatter(logging.Formatter):
    """Format a record as one line of JSON for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, UTC)
        entry: dict[str, Any] = {
            "ts": stamp.strftime("%Y-%m-%dT%H:%M:%S.") + f"{stamp.microsecond // 1000:03d}Z",
            "level": record.levelname,
            "role": getattr(record, "tidings_role", None),
            "pid": record.process,
            "logger": record.name,
            "message": record.getMessage(),
        }
        topic = getattr(record, "topic", None)
        if topic is not None:
            entry["topic"] = str(topic)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exc"] = record.exc_text
        # default=str: a stray object in a message's args never breaks a line.
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure(role: str, level: str = "INFO", fmt: str = "text") -> None:
    """Send the `tidings` loggers to stderr, one line each, tagged with `role`.

    `fmt` is "text" (human) or "json" (one object per line).
    """
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    logger = logging.getLogger("tidings")
    for handler in list(logger.handlers):
        if getattr(handler, "_tidings", False):
            logger.removeHandler(handler)
    # The real stderr: Celery swaps sys.stderr for a logger proxy that would
    # wrap each line in a second prefix.
    handler = logging.StreamHandler(sys.__stderr__)
    handler._tidings = True  # type: ignore[attr-defined]
    handler.addFilter(_RoleFilter(role))
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(_FORMAT))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False


class RateLimited:
    """Logs a recurring condition at most once per `interval` seconds, with a count."""

    def __init__(self, logger: logging.Logger, interval: float = 5.0) -> None:
        self._logger = logger
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(
        self, key: str, message: str, *args: object, extra: dict[str, Any] | None = None
    ) -> None:
        """Log `message` unless `key` was logged within the interval."""
        now = time.monotonic()
        if now - self._last.get(key, -self._interval) < self._interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last[key] = now
        skipped = self._suppressed.pop(key, 0)
        suffix = f" ({skipped} more since last report)" if skipped else ""
        self._logger.warning(message + suffix, *args, extra=extra)
