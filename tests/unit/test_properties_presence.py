"""Property-based tests of the presence events and the server API: any input, a named answer."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import pytest
import redis
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tidings.settings import Settings
from webapp import create_app
from webapp.extensions import socketio

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children),
    max_leaves=12,
)
anything = json_values | st.binary() | st.text()
KEY = {"Authorization": "Bearer k3y"}
FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def app(redis_server) -> Flask:
    env = {
        "TIDINGS_REDIS_URL": redis_server.url(0),
        "TIDINGS_SECRET": "s" * 32,
        "TIDINGS_API_KEY": "k3y",
        "TIDINGS_PRESENCE_TOPICS": "public.*",
        "TIDINGS_SUBSCRIBE_RATE": "100000",
    }
    return create_app({"SETTINGS": Settings.from_env(env), "QUEUE": False})


@FUZZ
@given(
    event=st.sampled_from(["presence", "presence_stats"]),
    payload=json_values | st.fixed_dictionaries({"topic": anything}),
)
def test_presence_events_answer_with_the_contract(app: Flask, event: str, payload: Any) -> None:
    client = socketio.test_client(app)
    try:
        answer = client.emit(event, payload, callback=True)
        assert isinstance(answer, dict)
        if answer.get("ok") is True:
            assert isinstance(answer["clients"], int)
        else:
            assert answer.get("error") in {"forbidden", "invalid_topic", "presence_off"}, answer
        assert client.is_connected()
    finally:
        client.disconnect()


ROUTES = ["/api/disconnect", "/api/unsubscribe", "/api/revoke"]


@FUZZ
@given(path=st.sampled_from(ROUTES), body=json_values)
def test_operator_posts_answer_with_a_named_error_or_act(
    app: Flask, redis_server, path: str, body: Any
) -> None:
    client = redis.Redis(port=redis_server.port)
    revoked_before = client.get("tidings:revoked:version")
    answer = app.test_client().post(path, json=body, headers=KEY)
    assert answer.status_code in (200, 400), answer.data
    assert answer.is_json
    if answer.status_code == 400:
        assert answer.json["error"] in {
            "invalid_body",
            "invalid_batch",
            "invalid_sub",
            "invalid_topic",
            "invalid_jti",
            "invalid_before",
        }
        assert client.get("tidings:revoked:version") == revoked_before  # nothing revoked
    client.close()


@FUZZ
@given(
    route=st.sampled_from(["presence", "history", "presence-stats"]),
    topic=st.text(min_size=1, max_size=200),
    query=st.dictionaries(st.sampled_from(["since", "limit", "pattern"]), st.text(), max_size=3),
)
def test_operator_gets_answer_with_a_named_error_or_data(
    app: Flask, route: str, topic: str, query: dict[str, str]
) -> None:
    path = {
        "presence": f"/api/presence/{quote(topic, safe='')}",
        "presence-stats": f"/api/presence/{quote(topic, safe='')}/stats",
        "history": f"/api/history/{quote(topic, safe='')}",
    }[route]
    answer = app.test_client().get(path, query_string=query, headers=KEY)
    assert answer.status_code in (200, 400, 404), answer.data
    if answer.status_code != 200 and answer.is_json:
        assert answer.json["error"] in {
            "invalid_topic",
            "presence_off",
            "unknown_topic",
            "invalid_offset",
            "invalid_limit",
        }
