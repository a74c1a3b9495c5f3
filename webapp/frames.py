"""RFC 6455 frames: the server's (unmasked, final) and an incremental reader of a client's.

No I/O here: `webapp.transport` feeds `FrameReader` whatever bytes a socket
had, in pieces of any size, and writes what `encode_frame` makes.
"""

from __future__ import annotations

import struct

CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_DATA = (CONTINUATION, TEXT, BINARY)
_CONTROL = (CLOSE, PING, PONG)

# Close status codes (RFC 6455 7.4.1).
NORMAL = 1000
PROTOCOL_ERROR = 1002
INVALID_DATA = 1007
TOO_BIG = 1009

_HEAD16 = struct.Struct("!BBH")
_HEAD64 = struct.Struct("!BBQ")


class ProtocolError(Exception):
    """The client broke RFC 6455 or the size limit; `code` is the close status to answer."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason


def encode_frame(payload: bytes, opcode: int = TEXT) -> bytes:
    """Return `payload` as one final, unmasked frame with the shortest length encoding."""
    size = len(payload)
    first = 0x80 | opcode
    if size < 126:
        head = bytes((first, size))
    elif size < 0x10000:
        head = _HEAD16.pack(first, 126, size)
    else:
        head = _HEAD64.pack(first, 127, size)
    return head + payload


def close_frame(code: int = NORMAL, reason: str = "") -> bytes:
    """Return a close frame with status `code`."""
    return encode_frame(code.to_bytes(2, "big") + reason.encode()[:120], CLOSE)


def unmask(payload: bytes | memoryview, mask: bytes | memoryview) -> bytes:
    """XOR `payload` with the 4-byte `mask`, repeated (RFC 6455 5.3)."""
    size = len(payload)
    if not size:
        return b""
    # One big-integer XOR: C speed, where a Python loop costs a microsecond a byte.
    key = (bytes(mask) * ((size + 3) // 4))[:size]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(key, "little")).to_bytes(
        size, "little"
    )


def _valid_close_code(code: int) -> bool:
    # Codes a peer may send (RFC 6455 7.4.1-2); 1004-1006 and 1015 are reserved.
    return code in (1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011) or 3000 <= code <= 4999


class FrameReader:
    """Parse a client's frames as their bytes arrive; whole messages and control frames out.

    `feed` returns events `(opcode, payload)`: `(TEXT, str)` and `(BINARY,
    bytes)` for whole messages (fragments joined), `(PING, bytes)`, `(PONG,
    bytes)`, and `(CLOSE, code)` (1005 when the frame had no status), after
    which nothing more is read. A message larger than `limit` bytes is refused
    from its header, before its payload is buffered.
    """

    __slots__ = ("_closed", "_opcode", "_parts", "_pending", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        # Bytes of a frame not yet complete; None when the last read ended on a frame's end.
        self._pending: bytearray | None = None
        # A fragmented message under way: its opcode and payloads so far.
        self._opcode = 0
        self._parts: list[bytes] | None = None
        self._closed = False

    @property
    def buffered(self) -> int:
        """Return how many bytes of an incomplete frame or message are held."""
        held = len(self._pending) if self._pending else 0
        return held + (sum(map(len, self._parts)) if self._parts else 0)

    def feed(self, data: bytes | memoryview) -> list[tuple[int, object]]:
        """Take the next bytes of the stream; return the events they complete."""
        if self._closed:
            return []
        pending = self._pending
        if pending is not None:
            pending += data
            data = pending
        events: list[tuple[int, object]] = []
        end = len(data)
        at = 0
        while end - at >= 2:
            first, second = data[at], data[at + 1]
            if first & 0x70:
                raise ProtocolError(PROTOCOL_ERROR, "reserved bits set")
            if not second & 0x80:
                raise ProtocolError(PROTOCOL_ERROR, "unmasked client frame")
            opcode = first & 0x0F
            size = second & 0x7F
            head = 6
            if size == 126:
                if end - at < 4:
                    break
                size = (data[at + 2] << 8) | data[at + 3]
                head = 8
            elif size == 127:
                if end - at < 10:
                    break
                size = int.from_bytes(data[at + 2 : at + 10], "big")
                head = 14
                if size >> 63:
                    raise ProtocolError(PROTOCOL_ERROR, "bad frame length")
            self._check(opcode, first & 0x80, size)
            if end - at < head + size:
                break
            start = at + head
            payload = unmask(data[start : start + size], data[start - 4 : start])
            at = start + size
            event = self._frame(opcode, first & 0x80, payload)
            if event is not None:
                events.append(event)
                if event[0] == CLOSE:
                    self._closed = True
                    self._pending = None
                    return events
        if at == end:
            self._pending = None
        elif pending is None:
            self._pending = bytearray(data[at:])
        else:
            del pending[:at]
        return events

    def _check(self, opcode: int, fin: int, size: int) -> None:
        """Refuse a frame by its header: bad opcode, bad control frame, a message too large."""
        if opcode in _CONTROL:
            if not fin or size > 125:
                raise ProtocolError(PROTOCOL_ERROR, "bad control frame")
            return
        if opcode not in _DATA:
            raise ProtocolError(PROTOCOL_ERROR, f"unknown opcode {opcode}")
        parts = self._parts
        if opcode == CONTINUATION:
            if parts is None:
                raise ProtocolError(PROTOCOL_ERROR, "continuation without a message")
            size += sum(map(len, parts))
        elif parts is not None:
            raise ProtocolError(PROTOCOL_ERROR, "new message inside a fragmented one")
        if size > self.limit:
            raise ProtocolError(TOO_BIG, "message too big")

    def _frame(self, opcode: int, fin: int, payload: bytes) -> tuple[int, object] | None:
        """Return the event a whole frame makes, if any (a fragment makes none until the last)."""
        if opcode == CLOSE:
            if not payload:
                return CLOSE, 1005
            if len(payload) == 1:
                raise ProtocolError(PROTOCOL_ERROR, "bad close frame")
            code = int.from_bytes(payload[:2], "big")
            if not _valid_close_code(code):
                raise ProtocolError(PROTOCOL_ERROR, "bad close code")
            _text(payload[2:])
            return CLOSE, code
        if opcode in (PING, PONG):
            return opcode, payload
        if opcode == CONTINUATION:
            assert self._parts is not None  # _check refused it otherwise
            self._parts.append(payload)
            if not fin:
                return None
            opcode, payload = self._opcode, b"".join(self._parts)
            self._parts = None
        elif not fin:
            self._opcode, self._parts = opcode, [payload]
            return None
        return (TEXT, _text(payload)) if opcode == TEXT else (BINARY, payload)


def _text(payload: bytes) -> str:
    try:
        return payload.decode()
    except UnicodeDecodeError:
        raise ProtocolError(INVALID_DATA, "invalid UTF-8") from None
