"""The JavaScript client (clients/js) against the real stack: `node --test test/stack/`.

The stack is the usual one (gunicorn, Celery, Redis) with an API key for the
Node tests to publish through `POST /api/publish?wait=1`, a secret and a
token for private topics, and a small history so that a gap is cheap to make.
Any failing Node test fails this one, with Node's report.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest

from tests.js.conftest import run
from tests.support import Stack
from webapp.grants import make_token

pytestmark = pytest.mark.integration

API_KEY = "node-client-tests"
SECRET = "node-client-tests-secret-of-32-bytes-or-more"
HISTORY_SIZE = 200


def test_node_client_against_the_stack(node: str, make_stack: Callable[..., Stack]) -> None:
    stack = make_stack(
        TIDINGS_API_KEY=API_KEY,
        TIDINGS_SECRET=SECRET,
        TIDINGS_HISTORY_SIZE=str(HISTORY_SIZE),
        # Presence and its events for the Node tests of them (a server
        # without presence ignores both).
        TIDINGS_PRESENCE_TOPICS="public.presence.*",
        TIDINGS_JOIN_LEAVE_TOPICS="public.presence.*",
    )
    stack.start_worker()
    stack.start_web()
    stack.wait_ready()
    env = {
        **stack.env,
        "TIDINGS_URL": stack.url,
        "TIDINGS_API_KEY": API_KEY,
        "TIDINGS_TOKEN": make_token(SECRET, "node", ["private.node.*"], 600),
        "TIDINGS_HISTORY_SIZE": str(HISTORY_SIZE),
    }
    # One file at a time: the tests share one web worker and its rate limits.
    done = run([node, "--test", "--test-concurrency=1", "test/stack/"], timeout=170, env=env)
    report = done.stdout + done.stderr
    assert done.returncode == 0, report[-12000:]
    counts = dict(re.findall(r"^# (pass|fail|skipped) (\d+)$", done.stdout, re.MULTILINE))
    assert counts.get("fail") == "0", report[-12000:]
    assert int(counts.get("pass", "0")) >= 12, report[-12000:]
