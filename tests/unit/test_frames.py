"""The websocket frame reader: partial frames, fragments, control frames, limits, errors."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.websocket_support import BINARY, CLOSE, PING, PONG, TEXT, client_frame, parse
from webapp.frames import FrameReader, ProtocolError, close_frame, encode_frame, unmask

LIMIT = 1000


def feed_all(data: bytes, sizes: list[int] | None = None, limit: int = LIMIT) -> list:
    """Feed `data` in pieces of the given sizes (then the rest); return every event."""
    reader = FrameReader(limit)
    events, at = [], 0
    for size in sizes or []:
        events += reader.feed(memoryview(data[at : at + size]))
        at += size
    events += reader.feed(data[at:])
    assert reader.buffered == 0
    return events


@pytest.mark.parametrize("size", [0, 1, 125, 126, 999, 1000])
def test_each_length_encoding_reads_whole_and_byte_by_byte(size: int) -> None:
    text = "é" * (size // 2) + "a" * (size % 2)
    data = client_frame(text)
    assert feed_all(data) == [(TEXT, text)]
    assert feed_all(data, [1] * (len(data) - 1)) == [(TEXT, text)]


def test_a_64_bit_length_is_read() -> None:
    data = client_frame(b"x" * 70_000, BINARY)
    assert feed_all(data, [5, 9, 100], limit=100_000) == [(BINARY, b"x" * 70_000)]


def test_several_frames_in_one_read_and_a_frame_cut_anywhere() -> None:
    frames = [client_frame(f'42["subscribe",{{"topic":"t{i}"}}]') for i in range(5)]
    data = b"".join(frames)
    expected = [(TEXT, f'42["subscribe",{{"topic":"t{i}"}}]') for i in range(5)]
    for cut in range(len(data)):
        assert feed_all(data, [cut]) == expected


def test_a_fragmented_message_is_joined_with_pings_between_its_fragments() -> None:
    data = (
        client_frame("hel", TEXT, fin=False)
        + client_frame(b"a", PING)
        + client_frame("lo ", 0, fin=False)
        + client_frame(b"", PONG)
        + client_frame("wörld", 0)
    )
    expected = [(PING, b"a"), (PONG, b""), (TEXT, "hello wörld")]
    assert feed_all(data) == expected
    assert feed_all(data, [1] * (len(data) - 1)) == expected


def test_a_character_split_between_fragments_is_valid_utf8() -> None:
    euro = "€".encode()
    data = client_frame(euro[:1], TEXT, fin=False) + client_frame(euro[1:], 0)
    assert feed_all(data) == [(TEXT, "€")]


def test_a_ping_in_the_same_read_as_half_a_data_frame() -> None:
    ping, message = client_frame(b"p", PING), client_frame("x" * 300)
    reader = FrameReader(LIMIT)
    assert reader.feed(ping + message[:100]) == [(PING, b"p")]
    assert reader.buffered == 100
    assert reader.feed(message[100:]) == [(TEXT, "x" * 300)]


def test_a_message_over_the_limit_is_refused_from_its_header() -> None:
    reader = FrameReader(LIMIT)
    header = client_frame(b"x" * (LIMIT + 1))[:8]  # 2 + 2 length bytes + 4 mask bytes
    with pytest.raises(ProtocolError) as refused:
        reader.feed(header)
    assert refused.value.code == 1009
    assert feed_all(client_frame(b"x" * LIMIT, BINARY)) == [(BINARY, b"x" * LIMIT)]


def test_fragments_together_over_the_limit_are_refused() -> None:
    reader = FrameReader(LIMIT)
    reader.feed(client_frame(b"x" * 600, TEXT, fin=False))
    with pytest.raises(ProtocolError) as refused:
        reader.feed(client_frame(b"x" * 600, 0)[:8])
    assert refused.value.code == 1009


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (client_frame("x", masked=False), 1002),
        (client_frame("x", rsv=4), 1002),
        (client_frame("x", 0x3), 1002),  # a reserved data opcode
        (client_frame("x", 0xB), 1002),  # a reserved control opcode
        (client_frame(b"x" * 126, PING), 1002),
        (client_frame(b"x", PING, fin=False), 1002),
        (client_frame("x", 0), 1002),  # continuation without a message
        (client_frame("a", TEXT, fin=False) + client_frame("b"), 1002),
        (client_frame(b"\xff\xfe"), 1007),
        (client_frame(b"\x03", CLOSE), 1002),  # a one-byte status
        (client_frame(struct.pack("!H", 1005), CLOSE), 1002),  # reserved
        (client_frame(struct.pack("!H", 999), CLOSE), 1002),
        (client_frame(struct.pack("!H", 1000) + b"\xff", CLOSE), 1007),
        (client_frame(b"", length=2**63), 1002),
    ],
)
def test_protocol_errors_name_the_close_status(data: bytes, code: int) -> None:
    with pytest.raises(ProtocolError) as refused:
        FrameReader(LIMIT).feed(data)
    assert refused.value.code == code


def test_a_close_frame_ends_the_stream() -> None:
    reader = FrameReader(LIMIT)
    data = client_frame("a") + client_frame(struct.pack("!H", 4000) + b"bye", CLOSE)
    assert reader.feed(data + client_frame("after")) == [(TEXT, "a"), (CLOSE, 4000)]
    assert reader.feed(client_frame("more")) == []
    assert FrameReader(LIMIT).feed(client_frame(b"", CLOSE)) == [(CLOSE, 1005)]


def test_server_frames_are_final_unmasked_and_shortest() -> None:
    for payload, opcode in ((b"", TEXT), (b"x" * 126, BINARY), (b"y" * 70_000, TEXT)):
        (frame,) = parse(encode_frame(payload, opcode))
        assert (frame.fin, frame.opcode, frame.mask_value, frame.data) == (1, opcode, 0, payload)
    (closing,) = parse(close_frame(1009, "too big"))
    assert closing.opcode == CLOSE and closing.data == struct.pack("!H", 1009) + b"too big"


@given(st.binary(max_size=300), st.binary(min_size=4, max_size=4))
def test_unmasking_is_the_rfc_s_xor(payload: bytes, mask: bytes) -> None:
    assert unmask(payload, mask) == bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


messages = st.lists(
    st.tuples(
        st.one_of(st.text(max_size=200), st.binary(max_size=200)),
        st.integers(min_value=1, max_value=4),  # fragments
        st.booleans(),  # a ping after the first fragment
    ),
    max_size=6,
)


@given(messages, st.lists(st.integers(min_value=1, max_value=50), max_size=30))
def test_any_messages_in_any_pieces_come_out_whole_and_in_order(
    items: list[tuple[str | bytes, int, bool]], pieces: list[int]
) -> None:
    data, expected = b"", []
    for payload, fragments, ping in items:
        raw = payload.encode() if isinstance(payload, str) else payload
        opcode = TEXT if isinstance(payload, str) else BINARY
        step = max(1, -(-len(raw) // fragments))
        chunks = [raw[i : i + step] for i in range(0, len(raw), step)] or [b""]
        for index, chunk in enumerate(chunks):
            last = index == len(chunks) - 1
            data += client_frame(chunk, opcode if index == 0 else 0, fin=last)
            if last:
                expected.append((opcode, payload))
            if ping and index == 0:
                data += client_frame(b"!", PING)
                expected.append((PING, b"!"))
    assert feed_all(data, pieces) == expected
