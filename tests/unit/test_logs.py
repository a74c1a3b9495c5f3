"""Log lines: text for humans, one JSON object per line for collectors."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator

import pytest

from tidings.logs import RateLimited, configure


@pytest.fixture(autouse=True)
def back_to_text() -> Iterator[None]:
    yield
    configure("test", "INFO", "text")


def lines(capfd: pytest.CaptureFixture[str]) -> list[str]:
    return [line for line in capfd.readouterr().err.splitlines() if line.strip()]


def test_json_lines_carry_role_pid_logger_and_topic(capfd: pytest.CaptureFixture[str]) -> None:
    configure("listener", "INFO", "json")
    log = logging.getLogger("tidings.listener")
    log.info("acquired the listener lease; forwarding")
    log.warning("dropped a publication (%s)", "too_large", extra={"topic": "orders.eu"})
    first, second = (json.loads(line) for line in lines(capfd))
    assert set(first) == {"ts", "level", "role", "pid", "logger", "message"}
    assert first["role"] == "listener" and first["pid"] == os.getpid()
    assert first["level"] == "INFO" and first["logger"] == "tidings.listener"
    assert first["message"] == "acquired the listener lease; forwarding"
    assert first["ts"].endswith("Z") and "T" in first["ts"]
    assert second["topic"] == "orders.eu"
    assert second["message"] == "dropped a publication (too_large)"


def test_json_keeps_one_line_for_newlines_quotes_and_exceptions(
    capfd: pytest.CaptureFixture[str],
) -> None:
    configure("web", "INFO", "json")
    log = logging.getLogger("tidings.test")
    log.info('a "quoted"\nmessage with \u00e9', extra={"topic": 'x"y'})
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("unexpected")
    out = lines(capfd)
    assert len(out) == 2
    plain, failed = (json.loads(line) for line in out)
    assert plain["message"] == 'a "quoted"\nmessage with \u00e9' and plain["topic"] == 'x"y'
    assert failed["level"] == "ERROR" and "RuntimeError: boom" in failed["exc"]


def test_text_lines_are_unchanged(capfd: pytest.CaptureFixture[str]) -> None:
    configure("worker", "INFO", "text")
    logging.getLogger("tidings.supervisor").info("dispatched one")
    (line,) = lines(capfd)
    assert f"INFO [worker pid={os.getpid()}] tidings.supervisor: dispatched one" in line


def test_level_filters_and_bad_format_is_refused(capfd: pytest.CaptureFixture[str]) -> None:
    configure("web", "WARNING", "json")
    logging.getLogger("tidings.x").info("hidden")
    assert lines(capfd) == []
    with pytest.raises(ValueError, match="log format"):
        configure("web", "INFO", "xml")


def test_rate_limited_passes_the_topic_and_counts_what_it_held_back(
    capfd: pytest.CaptureFixture[str],
) -> None:
    configure("listener", "INFO", "json")
    limited = RateLimited(logging.getLogger("tidings.listener"), interval=0.0)
    limited.warning("k", "dropped %s", "one", extra={"topic": "a.b"})
    held = RateLimited(logging.getLogger("tidings.listener"), interval=60.0)
    held.warning("k", "dropped")
    held.warning("k", "dropped")
    out = [json.loads(line) for line in lines(capfd)]
    assert out[0]["topic"] == "a.b" and out[0]["message"] == "dropped one"
    assert len(out) == 2 and "topic" not in out[1]
