"""The `text/event-stream` wire format (WHATWG HTML, "Server-sent events"), and Tidings' event ids.

`EventParser` turns a stream's bytes, fed as they arrive in pieces of any
size, into events. `event_id` and `read_event_id` build and read the ids of
`GET /sse` (webapp/sse.py): `1:<position>,<position>,...`, one position per
topic of the stream in the order of its query; a position is an offset
`<ms>-<seq>` written `<ms>.<seq>` in base 36, `0` for "saw the topic
empty", or empty for "unknown".
"""

from __future__ import annotations

from dataclasses import dataclass

from tidings.history import BEGINNING, parse_offset

ID_VERSION = "1"
_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


@dataclass(frozen=True)
class Event:
    """One dispatched event: its type, its data (lines joined by newlines), the last event id."""

    event: str = "message"
    data: str = ""
    id: str = ""


class EventParser:
    """Parses a `text/event-stream` fed in pieces; keeps the last event id and the retry delay."""

    def __init__(self) -> None:
        self.last_event_id = ""
        self.retry_ms: int | None = None
        self._pending = b""
        self._after_cr = False
        self._started = False
        self._event = ""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[Event]:
        """Return the events that `chunk` completes (an event ends with a blank line)."""
        events: list[Event] = []
        if self._after_cr and chunk:
            # The previous piece ended with CR: an LF opening this one is part of its CRLF.
            chunk = chunk.removeprefix(b"\n")
            self._after_cr = False
        buffer = self._pending + chunk
        start = 0
        while True:
            cr, lf = buffer.find(b"\r", start), buffer.find(b"\n", start)
            if cr == -1 and lf == -1:
                break
            end = lf if cr == -1 or (lf != -1 and lf < cr) else cr
            line = buffer[start:end]
            start = end + 1
            if end == cr:
                if start == len(buffer):
                    self._after_cr = True  # a line ends here, at once, not at the next piece
                elif buffer[start] == 0x0A:
                    start += 1
            event = self._line(line)
            if event is not None:
                events.append(event)
        self._pending = buffer[start:]
        return events

    def _line(self, raw: bytes) -> Event | None:
        if not self._started:
            self._started = True
            raw = raw.removeprefix(b"\xef\xbb\xbf")  # a byte order mark may open the stream
        line = raw.decode("utf-8", errors="replace")
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None  # a comment: keep-alive
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id":
            if "\0" not in value:
                self.last_event_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry_ms = int(value)
        return None  # any other field is ignored

    def _dispatch(self) -> Event | None:
        event, data = self._event, self._data
        self._event, self._data = "", []
        if not data:
            return None  # nothing to dispatch: an id- or retry-only block
        return Event(event or "message", "\n".join(data), self.last_event_id)


def position(offset: str | None) -> str:
    """Return an offset as an event id writes it: base 36 `<ms>.<seq>`, `0`, or empty."""
    pair = parse_offset(offset)
    if pair is None:
        return ""
    if pair == (0, 0):
        return "0"
    return f"{_base36(pair[0])}.{_base36(pair[1])}"


def event_id(offsets: list[str | None]) -> str:
    """Return the event id that resumes each topic of a stream from its offset (None: unknown)."""
    return f"{ID_VERSION}:" + ",".join(position(offset) for offset in offsets)


def read_event_id(text: str, topics: int) -> list[str | None]:
    """Return the offsets an event id holds for `topics` topics; ValueError if it holds other."""
    version, colon, body = text.partition(":")
    if version != ID_VERSION or not colon:
        raise ValueError(f"not a Tidings event id: {text[:80]!r}")
    parts = body.split(",")
    if len(parts) != topics:
        raise ValueError(f"the id holds {len(parts)} positions for {topics} topics")
    offsets: list[str | None] = []
    for part in parts:
        if part == "":
            offsets.append(None)
        elif part == "0":
            offsets.append(BEGINNING)
        else:
            ms, dot, seq = part.partition(".")
            if not dot or not (ms + seq).isalnum() or not (ms + seq).isascii():
                raise ValueError(f"bad position {part!r}")
            offsets.append(f"{int(ms, 36)}-{int(seq, 36)}")
    return offsets


def _base36(number: int) -> str:
    out = ""
    while True:
        number, rest = divmod(number, 36)
        out = _DIGITS[rest] + out
        if not number:
            return out
