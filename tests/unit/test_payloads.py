import json

import pytest

from tidings.payloads import DroppedPublication, decode, encode, to_json_text


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        (b'{"a": [1, 2.5, null, true]}', {"a": [1, 2.5, None, True]}),
        (b"42", 42),
        (b'"quoted"', "quoted"),
        (b"plain text", "plain text"),
        (b"", ""),
        (b"  ", "  "),
        ("caf\u00e9 \u2603".encode(), "caf\u00e9 \u2603"),
        (b"NaN", "NaN"),
        (b"[1e999]", "[1e999]"),
        (b"{broken", "{broken"),
    ],
)
def test_json_passes_through_and_anything_else_is_a_string(raw: bytes, value: object) -> None:
    assert decode(raw, 1000) == value
    json.loads(to_json_text(raw, 1000))  # always valid JSON for browsers


def test_valid_json_is_not_re_encoded() -> None:
    assert to_json_text(b'{"a":  1}', 100) == '{"a":  1}'


def test_deeply_nested_json_becomes_a_string_instead_of_crashing() -> None:
    raw = b"[" * 100_000 + b"]" * 100_000
    assert isinstance(decode(raw, 10**6), str)


def test_invalid_utf8_is_dropped() -> None:
    with pytest.raises(DroppedPublication) as caught:
        to_json_text(b"\xff\xfe", 100)
    assert caught.value.reason == "invalid_utf8"
    with pytest.raises(DroppedPublication):
        to_json_text("\ud800", 100)


def test_oversized_payload_is_dropped_at_the_byte_limit() -> None:
    assert to_json_text(b"x" * 10, 10) == '"xxxxxxxxxx"'
    with pytest.raises(DroppedPublication) as caught:
        to_json_text(b"x" * 11, 10)
    assert caught.value.reason == "too_large"


def test_encode_is_compact_and_refuses_nan() -> None:
    assert encode({"a": [1, "\u00e9"]}) == '{"a":[1,"\u00e9"]}'
    with pytest.raises(ValueError):
        encode(float("nan"))
