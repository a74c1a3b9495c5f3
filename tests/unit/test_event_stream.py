"""The event-stream parser and the ids of GET /sse, checked against the server's own reading."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tidings.event_stream import Event, EventParser, event_id, position, read_event_id
from webapp.grants import Grant
from webapp.sse import Stream, decode_positions


def parse(*chunks: bytes) -> list[Event]:
    parser = EventParser()
    return [event for chunk in chunks for event in parser.feed(chunk)]


def test_fields_make_an_event_and_a_blank_line_dispatches_it() -> None:
    assert parse(b"event: publication\nid: 1:a.b\ndata: {}\n") == []
    assert parse(b"event: publication\nid: 1:a.b\ndata: {}\n\n") == [
        Event("publication", "{}", "1:a.b")
    ]
    # No `event:` field: a "message"; one leading space only is the separator's.
    assert parse(b"data:x\n\ndata:  two spaces\n\n") == [
        Event("message", "x"),
        Event("message", " two spaces"),
    ]
    # A field without a colon is the field with an empty value; unknown fields are ignored.
    assert parse(b"data\nfoo: bar\n\n") == [Event("message", "")]


def test_data_lines_join_with_newlines() -> None:
    assert parse(b"data: one\ndata:\ndata: three\n\n") == [Event("message", "one\n\nthree")]


def test_comments_and_retry_are_not_events() -> None:
    parser = EventParser()
    assert parser.feed(b": keep-alive\n\nretry: 1000\n: tidings\n\n") == []
    assert parser.retry_ms == 1000
    parser.feed(b"retry: soon\n\n")
    assert parser.retry_ms == 1000


def test_the_last_event_id_outlives_its_event() -> None:
    parser = EventParser()
    assert parser.feed(b"id: 1:1.0\ndata: a\n\ndata: b\n\nid: 1:2.0\n\nid: x\0y\ndata: c\n\n") == [
        Event("message", "a", "1:1.0"),
        Event("message", "b", "1:1.0"),
        # An id-only block dispatches nothing but moves the id; one with NUL is ignored.
        Event("message", "c", "1:2.0"),
    ]
    assert parser.last_event_id == "1:2.0"


@pytest.mark.parametrize("end", [b"\n", b"\r\n", b"\r"])
def test_every_line_ending_is_one(end: bytes) -> None:
    stream = b"event: e" + end + b"data: a" + end + b"data: b" + end + end
    assert parse(stream) == [Event("e", "a\nb")]


def test_a_crlf_split_between_pieces_is_one_line_end() -> None:
    assert parse(b"data: a\r", b"\n\r", b"\ndata: b\r\n\r\n") == [
        Event("message", "a"),
        Event("message", "b"),
    ]


def test_a_stream_cut_mid_event_dispatches_nothing_of_it() -> None:
    parser = EventParser()
    assert parser.feed(b'data: whole\n\nevent: publication\ndata: {"to') == [
        Event("message", "whole")
    ]
    # The connection ends here: what is pending never becomes an event.
    assert parser.feed(b"") == []


def test_utf8_split_between_pieces_and_a_leading_bom() -> None:
    text = "data: café ✓\n\n".encode()
    assert parse(b"\xef\xbb\xbf" + text[:10], text[10:]) == [Event("message", "café ✓")]


@given(st.lists(st.integers(min_value=0, max_value=200), max_size=8))
def test_any_cutting_into_pieces_gives_the_same_events(cuts: list[int]) -> None:
    stream = (
        b"retry: 1000\r\n: tidings\r\n\r\nid: 1:0\nevent: subscribed\ndata: {}\n\n"
        b': keep-alive\r\rid: 1:a.0\revent: publication\rdata: {"n": 1}\rdata: \xc3\xa9\r\r'
        b"event: token_expired\r\ndata: {}\r\n\r\n"
    )
    points = sorted({min(cut, len(stream)) for cut in cuts})
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    assert parse(*pieces) == parse(stream)
    assert [e.event for e in parse(stream)] == ["subscribed", "publication", "token_expired"]


def test_positions_are_base_36_offsets() -> None:
    assert position("1700000000000-5") == "loyw3v28.5"
    assert position("0-0") == "0"
    assert position(None) == position("garbage") == ""
    assert event_id(["1700000000000-5", None, "0-0"]) == "1:loyw3v28.5,,0"
    assert read_event_id("1:loyw3v28.5,,0", 3) == ["1700000000000-5", None, "0-0"]


@pytest.mark.parametrize(
    "bad",
    ["", "2:1.1", "1", "1:1.1,2.2", "1:11", "1:1_0.1", "1: 1.1", "1:+1.1", "1:.1", "1:1.é"],
)
def test_ids_that_are_not_the_servers_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        read_event_id(bad, 1)


offsets = (
    st.none()
    | st.just("0-0")
    | st.tuples(st.integers(0, 2**48), st.integers(0, 2**20)).map(
        lambda pair: f"{pair[0]}-{pair[1]}"
    )
)


@given(st.lists(offsets, min_size=1, max_size=5))
def test_the_client_and_the_server_read_each_others_ids(wanted: list[str | None]) -> None:
    # What the client sends as Last-Event-ID, the server resumes from.
    assert decode_positions(event_id(wanted), len(wanted)) == wanted
    # What the server writes as an event's id, the client reads.
    topics = [f"t{i}" for i in range(len(wanted))]
    stream = Stream("sse:x", topics, Grant(), bounds=(1, 1))
    for topic, offset in zip(topics, wanted, strict=True):
        if offset is not None:
            stream.move(topic, offset)
    line = stream.event_id().decode()
    assert line.startswith("id: ") and line.endswith("\n")
    assert read_event_id(line[4:-1], len(topics)) == wanted
