"""The payload rules: UTF-8 text, JSON when it parses, bounded in size."""

from __future__ import annotations

import json
import math
from typing import Any


class DroppedPublication(ValueError):
    """A publication that breaks the rules; `reason` is its metrics label."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _reject_constant(name: str) -> Any:
    # NaN and Infinity are not JSON for browsers: such text is sent as a string.
    raise ValueError(name)


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e999 would come out as Infinity on the web side
        raise ValueError(text)
    return value


def to_json_text(raw: bytes | str, max_payload: int) -> str:
    """Return the JSON text clients receive for a raw payload.

    Valid JSON passes through as it is (no re-encoding on the hot path);
    anything else becomes a JSON string. Raises DroppedPublication for
    payloads over `max_payload` bytes or that are not UTF-8.
    """
    if isinstance(raw, str):
        try:
            raw = raw.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates
            raise DroppedPublication("invalid_utf8") from None
    if len(raw) > max_payload:
        raise DroppedPublication("too_large", f"{len(raw)} bytes > {max_payload}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise DroppedPublication("invalid_utf8") from None
    try:
        json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except (ValueError, RecursionError):
        return json.dumps(text)
    return text


def decode(raw: bytes | str, max_payload: int) -> Any:
    """Return the value a client receives for a raw payload."""
    return json.loads(to_json_text(raw, max_payload))


def encode(data: Any) -> str:
    """Encode a publisher's value as payload text (compact JSON, no NaN)."""
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
