import pytest

from tidings.keys import room
from tidings.topics import is_valid_pattern, is_valid_topic, matches_any


@pytest.mark.parametrize("topic", ["a", "orders.eu.42", "A-Z_0.9", "x" * 128])
def test_valid_topics(topic: str) -> None:
    assert is_valid_topic(topic)


@pytest.mark.parametrize(
    "topic", ["", "x" * 129, "a b", "a:b", "a*", "é", "a\n", None, 42, ["a"], {"a": 1}]
)
def test_invalid_topics(topic: object) -> None:
    assert not is_valid_topic(topic)


def test_patterns_are_case_sensitive_globs() -> None:
    assert matches_any("orders.eu.42", ("orders.*",))
    assert matches_any("news.uk", ("public.*", "news.??"))
    assert not matches_any("Orders.eu", ("orders.*",))
    assert not matches_any("private", ("public.*",))
    assert is_valid_pattern("orders.[a-c]*") and not is_valid_pattern("a b*")


def test_rooms_cannot_collide_with_socketio_sids() -> None:
    # Every client's sid is a room; topic rooms carry a character topics cannot.
    assert room("abc") == "t:abc" and not is_valid_topic(room("abc"))
