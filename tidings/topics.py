"""Topic names and the glob patterns that select them."""

from __future__ import annotations

import re
from fnmatch import fnmatchcase

MAX_TOPIC_LENGTH = 128
_TOPIC = re.compile(r"[A-Za-z0-9_.\-]{1,128}")
# Patterns are topics plus the glob characters `*`, `?` and `[...]`.
_PATTERN = re.compile(r"[A-Za-z0-9_.\-*?\[\]!]{1,128}")


def is_valid_topic(topic: object) -> bool:
    """Tell whether `topic` is a string of 1 to 128 `A-Z a-z 0-9 _ . -` characters."""
    return isinstance(topic, str) and _TOPIC.fullmatch(topic) is not None


def is_valid_pattern(pattern: object) -> bool:
    """Tell whether `pattern` is a usable topic glob."""
    return isinstance(pattern, str) and _PATTERN.fullmatch(pattern) is not None


def matches_any(topic: str, patterns: tuple[str, ...] | list[str]) -> bool:
    """Tell whether `topic` matches one of the glob `patterns` (case-sensitive)."""
    return any(fnmatchcase(topic, pattern) for pattern in patterns)
