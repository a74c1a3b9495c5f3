"""Property-based tests: no input makes the decoder, validator or handlers misbehave."""

from __future__ import annotations

import json
from typing import Any

import pytest
from flask import Flask
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tidings.history import parse_offset
from tidings.payloads import DroppedPublication, to_json_text
from tidings.settings import Settings
from tidings.topics import is_valid_pattern, is_valid_topic
from webapp import create_app
from webapp.extensions import socketio

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children),
    max_leaves=12,
)
anything = json_values | st.binary() | st.text()


@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_decoder_returns_browser_json_or_a_known_drop(raw: bytes) -> None:
    try:
        text = to_json_text(raw, max_payload=200)
    except DroppedPublication as drop:
        assert drop.reason in {"too_large", "invalid_utf8"}
        return
    json.loads(text)  # what browsers get always parses
    assert "NaN" not in text or json.loads(text) != float("nan")


@given(anything)
def test_validators_never_raise(value: Any) -> None:
    assert isinstance(is_valid_topic(value), bool)
    assert isinstance(is_valid_pattern(value), bool)
    parse_offset(value)


@pytest.fixture(scope="module")
def app(redis_server) -> Flask:
    env = {"TIDINGS_REDIS_URL": redis_server.url(0), "TIDINGS_SECRET": "s" * 32}
    return create_app({"SETTINGS": Settings.from_env(env), "QUEUE": False})


ERRORS = {"forbidden", "invalid_topic", "limit", "unavailable", "invalid_token"}


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    event=st.sampled_from(["subscribe", "unsubscribe", "refresh"]),
    payload=json_values
    | st.fixed_dictionaries({"topic": anything}, optional={"since": anything, "token": anything}),
)
def test_every_handler_answers_with_the_contract(app: Flask, event: str, payload: Any) -> None:
    client = socketio.test_client(app)
    try:
        answer = client.emit(event, payload, callback=True)
        assert isinstance(answer, dict)
        assert answer.get("ok") is True or answer.get("error") in ERRORS, answer
        assert client.is_connected()
    finally:
        client.disconnect()
