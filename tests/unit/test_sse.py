"""SSE delivery: ids and text built once per set of streams, direct chunked writes, bounds.

The first part checks `Positions` and `Outgoing` against the per-stream
algorithm they replace. The second serves streams with gevent's own pywsgi
server on loopback TCP, in greenlets of this thread (no monkeypatching: the
stream's Event is gevent's here); the test holds the client's end and acts
as the queue manager's greenlet.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import gevent
import gevent.event
import gevent.pywsgi
import gevent.socket
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tidings.event_stream import Event, EventParser, position
from tidings.history import parse_offset
from webapp import sse
from webapp.grants import Grant
from webapp.realtime import Connections
from webapp.sse import Outgoing, Positions, Stream, publication_events

BIG = 10**9


def pub(topic: str, offset: str, size: int = 0) -> dict[str, Any]:
    return {"topic": topic, "offset": offset, "data": {"o": offset, "pad": "x" * size}}


def queued(stream: Stream) -> bytes:
    """Everything the stream queued (its greenlet's next write)."""
    return stream.take(0) or b""


class PerStream:
    """The delivery being replaced: every stream builds its own ids, event by event."""

    def __init__(self, topics: list[str]) -> None:
        self.topics = topics
        self.positions = {topic: "" for topic in topics}
        self.pairs: dict[str, tuple[int, int]] = {}

    def move(self, topic: str, offset: str | None) -> None:
        self.positions[topic] = position(offset)
        pair = parse_offset(offset)
        if pair is not None:
            self.pairs[topic] = pair

    def send(self, topic: str, pubs: list[dict[str, Any]]) -> bytes:
        out = b""
        after = self.pairs.get(topic)
        for pair, _, text in publication_events(pubs):
            if after is not None and pair <= after:
                continue
            after = pair
            self.positions[topic] = position(f"{pair[0]}-{pair[1]}")
            body = ",".join(self.positions[t] for t in self.topics)
            out += f"id: 1:{body}\n".encode() + text
        if after is not None:
            self.pairs[topic] = after
        return out


def test_equal_positions_are_one_object() -> None:
    topics = ("a", "b")
    start = Positions.start(topics)
    assert Positions.start(("a", "b")) is start
    moved = start.moved(0, position("5-1"), (5, 1))
    assert moved is Positions.of(topics, ("5.1", ""), ((5, 1), None))
    assert moved.id_line == b"id: 1:5.1,\n"
    # The same offsets in other topics are other positions.
    assert Positions.of(("b", "a"), ("5.1", ""), ((5, 1), None)) is not moved


def test_streams_at_the_same_positions_share_one_build(monkeypatch: pytest.MonkeyPatch) -> None:
    streams = [Stream(f"sse:{n}", ["t", "u"], Grant(), bounds=(BIG, BIG)) for n in range(50)]
    for stream in streams:
        stream.move("t", "100-0")
        stream.move("u", "0-0")
    behind = Stream("sse:behind", ["t", "u"], Grant(), bounds=(BIG, BIG))
    behind.move("t", "99-0")
    behind.move("u", "0-0")
    built = []
    advance = Positions.advance

    def counting(self: Positions, *args: Any) -> Any:
        built.append(self)
        return advance(self, *args)

    monkeypatch.setattr(Positions, "advance", counting)
    outgoing = Outgoing("t", publication_events([pub("t", "100-0"), pub("t", "101-0")]))
    assert [stream.deliver(outgoing) for stream in [*streams, behind]] == [1] * 50 + [2]
    assert len(built) == 2  # once for the 50, once for the one behind
    assert len({id(stream.at) for stream in streams}) == 1
    texts = {queued(stream) for stream in streams}
    assert len(texts) == 1
    (text,) = texts
    assert text.startswith(b"id: 1:" + position("101-0").encode() + b",0\nevent: ")
    assert queued(behind).endswith(text)
    # Caught up, the one behind shares the others' positions from here on.
    assert behind.at is streams[0].at


offsets = st.tuples(st.integers(0, 6), st.integers(0, 2)).map(lambda p: f"{p[0]}-{p[1]}")


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.permutations(["a", "b", "c"]).flatmap(
                lambda order: st.integers(1, 3).map(lambda n: order[:n])
            ),
            st.lists(st.none() | offsets, min_size=3, max_size=3),
        ),
        min_size=1,
        max_size=6,
    ),
    st.lists(
        st.tuples(st.sampled_from(["a", "b", "c"]), st.lists(offsets, max_size=4)),
        max_size=8,
    ),
)
def test_shared_delivery_writes_what_each_stream_would_have_built(
    specs: list[tuple[list[str], list[str | None]]],
    messages: list[tuple[str, list[str]]],
) -> None:
    pairs = []
    for topics, starts in specs:
        stream = Stream("sse:x", topics, Grant(), bounds=(BIG, BIG))
        reference = PerStream(topics)
        for topic, start in zip(topics, starts, strict=False):
            if start is not None:
                stream.move(topic, start)
                reference.move(topic, start)
        pairs.append((stream, reference))
    for topic, offsets_ in messages:
        pubs = [pub(topic, offset) for offset in sorted(offsets_, key=parse_offset)]
        outgoing = Outgoing(topic, publication_events(pubs))
        for stream, reference in pairs:
            if topic in stream.topics:
                assert queued(stream) == b""
                stream.deliver(outgoing)
                assert queued(stream) == reference.send(topic, pubs)
    for stream, reference in pairs:
        body = ",".join(reference.positions[t] for t in reference.topics)
        assert stream.event_id() == f"id: 1:{body}\n".encode()


def test_a_busy_stream_over_its_bounds_is_cut_by_whole_messages() -> None:
    stream = Stream("sse:x", ["t"], Grant(), bounds=(5, BIG))
    stream.move("t", "0-0")
    stream.write(b"retry: 1000\n\n")
    assert stream.take(0)  # its greenlet now writes that
    for n in (1, 3):
        stream.send("t", publication_events([pub("t", f"{n}-0"), pub("t", f"{n + 1}-0")]))
    assert not stream.closed  # 4 events queued
    stream.send("t", publication_events([pub("t", "5-0"), pub("t", "6-0")]))
    assert stream.cut and stream.closed


# -- served by gevent's pywsgi ------------------------------------------------------


def settle(condition: Callable[[], Any], timeout: float = 5) -> None:
    """Yield to the hub until `condition` holds (time.sleep would block every greenlet)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        gevent.sleep(0.005)


class Client:
    """The client's end of one connection: a chunked HTTP/1.1 response parsed as it comes."""

    def __init__(self, address: tuple[str, int], *, small_buffer: bool = False) -> None:
        self.sock = gevent.socket.socket()
        if small_buffer:
            # Set before connecting (a window shrunk later crawls on probes).
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        self.sock.connect(address)
        self.buffer = b""
        self.parser = EventParser()
        self.events: list[Event] = []
        self.comments = 0
        self.ended = False

    def request(self, method: str = "GET") -> None:
        self.sock.sendall(f"{method} /sse HTTP/1.1\r\nHost: test\r\n\r\n".encode())
        self.ended = False
        with gevent.Timeout(10):
            while b"\r\n\r\n" not in self.buffer:
                self._recv()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        assert b"Transfer-Encoding: chunked" in head, head

    def _recv(self) -> None:
        data = self.sock.recv(65536)
        assert data, "connection closed"
        self.buffer += data

    def _parse(self) -> None:
        while not self.ended:
            size_line, crlf, rest = self.buffer.partition(b"\r\n")
            if not crlf:
                return
            size = int(size_line, 16)
            if len(rest) < size + 2:
                return
            assert rest[size : size + 2] == b"\r\n", "a chunk not followed by CRLF"
            body, self.buffer = rest[:size], rest[size + 2 :]
            if size == 0:
                self.ended = True  # the last chunk (no trailers)
                return
            assert body, "an empty chunk"
            self.comments += body.count(b": keep-alive\n")
            self.events += self.parser.feed(body)

    def until(self, condition: Callable[[], Any], timeout: float = 10) -> None:
        with gevent.Timeout(timeout):
            self._parse()
            while not condition():
                self._recv()
                self._parse()

    def until_closed(self, timeout: float = 10) -> None:
        """Read and parse until the server closes the connection."""
        with gevent.Timeout(timeout):
            while data := self.sock.recv(65536):
                self.buffer += data
                self._parse()

    def publications(self) -> list[str]:
        return [e.data for e in self.events if e.event == "publication"]


class Served:
    """gevent's pywsgi serving `GET /sse` streams of topic `t` from `webapp.sse`."""

    def __init__(self, bounds: tuple[int, int], keepalive: float, grant: Grant) -> None:
        self.streams: list[Stream] = []
        self.readers: list[Any] = []
        self.small_send_buffer = False
        self.registry: dict[str, Stream] = {}
        app = SimpleNamespace(
            extensions={
                "tidings.sse": self.registry,
                "tidings.queue": None,
                "tidings.connections": Connections(),
                "tidings.presence": SimpleNamespace(disconnected=lambda sid: None),
            }
        )

        def application(environ: dict[str, Any], start_response: Any) -> Any:
            handler = start_response.__self__
            if self.small_send_buffer:
                handler.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            self.readers.append(handler.rfile)
            stream = Stream(f"sse:{len(self.streams)}", ["t"], grant, bounds=bounds)
            stream.move("t", "0-0")
            stream.write(b"retry: 1000\n: tidings\n\n")
            self.streams.append(stream)
            self.registry[stream.sid] = stream
            response = sse.EventStreamResponse(
                app,  # type: ignore[arg-type]
                stream,
                sse._events(app, stream, keepalive),  # type: ignore[arg-type]
                mimetype="text/event-stream",
                direct_passthrough=True,
            )
            return response(environ, start_response)

        self.server = gevent.pywsgi.WSGIServer(("127.0.0.1", 0), application, log=None)
        self.server.start()
        self.address = self.server.address

    def deliver(self, stream: Stream, first: int, count: int = 1, size: int = 10) -> int:
        """Hand the stream one message, as the queue manager's greenlet does; never blocks."""
        pubs = [pub("t", f"{n}-0", size) for n in range(first, first + count)]
        with gevent.Timeout(2):
            return stream.deliver(Outgoing("t", publication_events(pubs)))


@pytest.fixture
def serve(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., Served]]:
    monkeypatch.setattr(sse, "threading", SimpleNamespace(Event=gevent.event.Event))
    made: list[Served] = []

    def make(
        bounds: tuple[int, int] = (BIG, BIG), keepalive: float = 30.0, grant: Grant | None = None
    ) -> Served:
        made.append(Served(bounds, keepalive, grant or Grant()))
        return made[-1]

    yield make
    for served in made:
        for stream in served.streams:
            stream.close()
        served.server.stop(timeout=2)


def offsets_of(client: Client) -> list[str]:
    return [data.split('"offset":"')[1].split('"')[0] for data in client.publications()]


def test_idle_streams_get_chunks_on_the_socket_without_a_switch(
    serve: Callable[..., Served], monkeypatch: pytest.MonkeyPatch
) -> None:
    served = serve()
    client = Client(served.address)
    client.request()
    settle(lambda: served.streams and served.streams[0]._wire is not None)
    stream = served.streams[0]
    # The connection's 8 KB reader went; the small one reads what follows.
    assert served.readers[0].closed
    takes = []
    take = Stream.take

    def counting(self: Stream, timeout: float) -> Any:
        takes.append(timeout)
        return take(self, timeout)

    monkeypatch.setattr(Stream, "take", counting)
    settle(lambda: True)  # the stream's greenlet waits in take (the one before the spy)
    for n in range(1, 4):
        assert served.deliver(stream, n) == 1
        assert not stream._queue  # written at once, whole
    client.until(lambda: len(client.publications()) == 3)
    assert takes == []  # the stream's greenlet never woke
    assert offsets_of(client) == ["1-0", "2-0", "3-0"]
    assert [e.id for e in client.events] == ["1:1.0", "1:2.0", "1:3.0"]
    # Closed (an operator's disconnect): the body ends, well framed, and the
    # connection reads the next request.
    stream.close()
    client.until(lambda: client.ended)
    monkeypatch.setattr(Stream, "take", take)
    client.request()
    settle(lambda: len(served.streams) == 2 and served.streams[1]._wire is not None)
    served.deliver(served.streams[1], 7)
    client.until(lambda: len(client.publications()) == 4)
    assert offsets_of(client)[-1] == "7-0"
    assert list(served.registry) == [served.streams[1].sid]  # the first one is forgotten


def test_a_head_request_leaves_no_stream_behind(serve: Callable[..., Served]) -> None:
    served = serve()
    client = Client(served.address)
    client.request("HEAD")  # the body is never iterated
    client.until(lambda: client.ended)  # (pywsgi ends even a HEAD answer's chunked body)
    settle(lambda: not served.registry)
    assert served.streams[0].closed
    # The connection goes on.
    client.request()
    settle(lambda: len(served.streams) == 2 and served.streams[1]._wire is not None)
    assert list(served.registry) == [served.streams[1].sid]


def test_a_client_that_does_not_read_gets_the_rest_from_its_own_greenlet(
    serve: Callable[..., Served],
) -> None:
    served = serve()
    served.small_send_buffer = True
    client = Client(served.address, small_buffer=True)
    client.request()
    settle(lambda: served.streams and served.streams[0]._wire is not None)
    stream = served.streams[0]
    ever_queued = False
    for n in range(1, 41):
        served.deliver(stream, n, size=20_000)  # never blocks, though nobody reads
        ever_queued = ever_queued or bool(stream._queue)
        gevent.sleep(0)
    assert ever_queued
    # Now read, slowly, while more come: whatever its greenlet has in flight,
    # nothing goes out in the middle of it.
    reader = gevent.spawn(client.until, lambda: len(client.publications()) == 80, 30)
    for n in range(41, 81):
        served.deliver(stream, n, size=20_000)
        gevent.sleep(0.002)
    reader.get(timeout=40)
    assert offsets_of(client) == [f"{n}-0" for n in range(1, 81)]
    assert not stream.closed
    # Drained, it writes directly again.
    settle(lambda: not stream._queue and not stream._writing)
    served.deliver(stream, 81)
    assert not stream._queue
    client.until(lambda: len(client.publications()) == 81)


def test_a_stream_too_far_behind_is_cut_after_what_the_kernel_holds(
    serve: Callable[..., Served],
) -> None:
    served = serve(bounds=(10, BIG))
    served.small_send_buffer = True
    client = Client(served.address, small_buffer=True)
    client.request()
    settle(lambda: served.streams and served.streams[0]._wire is not None)
    stream = served.streams[0]
    n = 1
    while not stream.cut:
        assert n < 500, "never cut"
        served.deliver(stream, n, size=2_000)
        n += 1
        gevent.sleep(0)
    # Its queued events are dropped; what the kernel held comes, then the
    # end (no last chunk: a cut, not an end of the response).
    client.until_closed(timeout=20)
    assert not client.ended
    # What it got before the cut, in order, each once, whole events only;
    # it resumes from the last id.
    got = offsets_of(client)
    assert got == [f"{m}-0" for m in range(1, len(got) + 1)]
    assert 0 < len(got) < n - 1


def test_an_expired_token_ends_the_stream_after_the_event(serve: Callable[..., Served]) -> None:
    grant = Grant(expires_at=time.time() + 3600)
    served = serve(grant=grant)
    client = Client(served.address)
    client.request()
    settle(lambda: served.streams and served.streams[0]._wire is not None)
    stream = served.streams[0]
    served.deliver(stream, 1)
    grant.expires_at = time.time() - 1
    served.deliver(stream, 2)
    client.until(lambda: client.ended)
    assert [e.event for e in client.events] == ["publication", "publication", "token_expired"]


def test_keep_alive_only_when_nothing_went_out(serve: Callable[..., Served]) -> None:
    served = serve(keepalive=1.0)
    client = Client(served.address)
    client.request()
    settle(lambda: served.streams and served.streams[0]._wire is not None)
    stream = served.streams[0]
    started = time.monotonic()
    n = 1
    while time.monotonic() - started < 2.5:
        served.deliver(stream, n)
        n += 1
        gevent.sleep(0.1)
    client.until(lambda: len(client.publications()) == n - 1)
    assert client.comments == 0  # written directly, never idle for a second
    idle_from = time.monotonic()
    client.until(lambda: client.comments == 1)
    assert time.monotonic() - idle_from > 0.5
