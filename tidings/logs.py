"""One log line per event that matters, tagged with role and pid."""

from __future__ import annotations

import logging
import sys
import time

_FORMAT = "%(asctime)s %(levelname)s [%(tidings_role)s pid=%(process)d] %(name)s: %(message)s"


class _RoleFilter(logging.Filter):
    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def filter(self, record: logging.LogRecord) -> bool:
        record.tidings_role = self.role
        return True


def configure(role: str, level: str = "INFO") -> None:
    """Send the `tidings` loggers to stderr, one line each, tagged with `role`."""
    logger = logging.getLogger("tidings")
    for handler in list(logger.handlers):
        if getattr(handler, "_tidings", False):
            logger.removeHandler(handler)
    # The real stderr: Celery swaps sys.stderr for a logger proxy that would
    # wrap each line in a second prefix.
    handler = logging.StreamHandler(sys.__stderr__)
    handler._tidings = True  # type: ignore[attr-defined]
    handler.addFilter(_RoleFilter(role))
    handler.setFormatter(logging.Formatter(_FORMAT))
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

    def warning(self, key: str, message: str, *args: object) -> None:
        """Log `message` unless `key` was logged within the interval."""
        now = time.monotonic()
        if now - self._last.get(key, -self._interval) < self._interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last[key] = now
        skipped = self._suppressed.pop(key, 0)
        suffix = f" ({skipped} more since last report)" if skipped else ""
        self._logger.warning(message + suffix, *args)
