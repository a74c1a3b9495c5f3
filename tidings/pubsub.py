"""A Redis pub/sub connection read directly: every complete message per read, nothing dropped.

redis-py's `PubSub.get_message(timeout=...)` first asks whether a reply can
be read, then reads one. When the parser already holds the start of a reply
whose rest has not arrived (a burst, cut by the kernel mid-message), the
answer is yes, and the read that follows uses the caller's timeout as a
socket timeout: with `timeout=0` it fails at once with "Timeout reading from
socket", and redis-py's retry then reconnects silently, dropping everything
the socket and the parser held. A listener draining a burst lost thousands of
publications that way while Redis was up (issue 12).

Here the socket is read with a timeout that only says "nothing new yet": a
partial reply stays in the parser until its rest arrives, and every complete
reply is returned in one call, so a burst is read in a few large reads
instead of a poll and a read per message. A connection that stays silent is
asked a PING; silence after that is an outage.

The connection itself comes from a redis-py pool (AUTH, SELECT, CLIENT
SETNAME, TLS and Sentinel handled there); only its socket is used after
that. The parser is hiredis' Reader when it is installed, else `RespReader`
below (the gevent web workers hide hiredis from redis-py and keep it for
this module, see gunicorn.conf.py).
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

import redis
from redis.exceptions import InvalidResponse, ResponseError

# gunicorn.conf.py hides hiredis from redis-py in the web workers and keeps
# it for this module under another name.
hiredis = sys.modules.get("_tidings_hiredis")
if hiredis is None:
    try:
        import hiredis
    except ImportError:  # not installed: the pure-Python reader below
        hiredis = None

# At most this many channels per SUBSCRIBE or UNSUBSCRIBE command.
CHANNELS_PER_COMMAND = 512
# Bytes read from the socket at a time, and at most per `read` call.
READ_SIZE = 256 * 1024
MAX_READ_BYTES = 4 * 1024 * 1024
# A connection silent this long is sent a PING...
IDLE_PING_SECONDS = 5.0
# ...and one still silent this long after it is taken for dead.
PING_REPLY_SECONDS = 5.0


# Reply types holding other replies: * (array) and RESP3's > (push), ~ (set), % (map).
_AGGREGATES = frozenset(b"*>~%")


class RespReader:
    """A RESP reply parser with hiredis.Reader's `feed`/`gets` interface, in pure Python.

    RESP2, and of RESP3 what a pub/sub connection gets: pushes (as lists),
    sets, maps (as flat lists) and nulls.
    """

    __slots__ = ("_buf", "_pos")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0

    def feed(self, data: bytes | bytearray | memoryview, offset: int = 0, length: int = -1) -> None:
        """Append bytes received from the socket."""
        end = len(data) if length < 0 else offset + length
        self._buf += data[offset:end]

    def has_data(self) -> bool:
        """Tell whether bytes of an unfinished reply are held."""
        return self._pos < len(self._buf)

    def gets(self) -> Any:
        """Return the next complete reply, or False while it is incomplete."""
        buf = self._buf
        if self._pos >= len(buf):
            return False
        try:
            reply, self._pos = self._parse(buf, self._pos)
        except IndexError:
            return False  # the reply runs past what arrived so far
        if self._pos > 65536 and self._pos * 2 > len(buf):
            del buf[: self._pos]  # drop what was parsed, now and then
            self._pos = 0
        return reply

    def _parse(self, buf: bytearray, pos: int) -> tuple[Any, int]:
        """Parse one reply at `pos`; IndexError when it is not complete yet."""
        end = buf.find(b"\r\n", pos)
        if end < 0:
            raise IndexError
        kind = buf[pos]
        if kind == 36:  # $ bulk string
            size = int(buf[pos + 1 : end])
            if size < 0:
                return None, end + 2
            start = end + 2
            stop = start + size
            if stop + 2 > len(buf):
                raise IndexError
            return bytes(buf[start:stop]), stop + 2
        if kind in _AGGREGATES:  # * array; RESP3 > push, ~ set, % map (pairs, flattened)
            count = int(buf[pos + 1 : end]) * (2 if kind == 37 else 1)
            if count < 0:
                return None, end + 2
            pos = end + 2
            items = []
            append = items.append
            length = len(buf)
            for _ in range(count):
                if pos < length and buf[pos] == 36:
                    # A bulk string in line: every pub/sub message is made of them.
                    end = buf.find(b"\r\n", pos)
                    if end < 0:
                        raise IndexError
                    size = int(buf[pos + 1 : end])
                    if size >= 0:
                        pos = end + 2 + size
                        if pos + 2 > length:
                            raise IndexError
                        append(bytes(buf[end + 2 : pos]))
                        pos += 2
                        continue
                item, pos = self._parse(buf, pos)
                append(item)
            return items, pos
        if kind == 58:  # : integer
            return int(buf[pos + 1 : end]), end + 2
        if kind == 43:  # + simple string
            return bytes(buf[pos + 1 : end]), end + 2
        if kind == 45:  # - error: returned, as hiredis does, for the caller to raise
            return ResponseError(buf[pos + 1 : end].decode("utf-8", "replace")), end + 2
        if kind == 95:  # _ RESP3 null
            return None, end + 2
        raise InvalidResponse(f"Protocol error, got {chr(kind)!r} as reply type byte")


def _reader() -> Any:
    if hiredis is not None:
        return hiredis.Reader(replyError=ResponseError, protocolError=InvalidResponse)
    return RespReader()


class PubSubConnection:
    """One connection in subscribed mode: send (P)(UN)SUBSCRIBE, read every reply that is complete.

    One reader at a time; senders may be several (each send is one locked
    write), and may send while the reader waits.
    """

    def __init__(self, client: redis.Redis) -> None:
        # Held: a client that owns its pool disconnects it when collected.
        self._client = client
        self._pool = client.connection_pool
        # The pool connects it: AUTH, SELECT, CLIENT SETNAME, TLS.
        self._connection = self._pool.get_connection()
        sock = self._connection._sock
        if sock is None:
            raise redis.ConnectionError("no socket after connecting")
        self._sock: socket.socket = sock
        self._reader = _reader()
        self._buffer = bytearray(READ_SIZE)
        self._heard = time.monotonic()
        self._pinged = False
        self._send_lock = threading.Lock()
        self._timeout: float | None = sock.gettimeout()

    @property
    def socket(self) -> socket.socket:
        """Return the connection's socket (tests cut it to simulate a failure)."""
        return self._sock

    def send(self, commands: Iterable[Sequence[str | bytes]]) -> None:
        """Send commands in one write (replies come back through `read`)."""
        connection = self._connection
        if connection is None:
            raise redis.ConnectionError("the pub/sub connection is closed")
        packed = connection.pack_commands(list(commands))
        if packed:
            with self._send_lock:
                connection.send_packed_command(packed, check_health=False)

    def subscribe(self, channels: Sequence[str], command: str = "SUBSCRIBE") -> None:
        """Send (P)(UN)SUBSCRIBE for `channels`, at most CHANNELS_PER_COMMAND per command."""
        step = CHANNELS_PER_COMMAND
        self.send((command, *channels[i : i + step]) for i in range(0, len(channels), step))

    def read(self, timeout: float, max_replies: int = 1000) -> list[Any]:
        """Return the complete replies arriving within `timeout` (or none), at most `max_replies`.

        Raises redis.ConnectionError when the connection closed, and
        redis.TimeoutError when it stayed silent past a PING.
        """
        replies = self._drain(max_replies)
        if replies:
            return replies
        sock = self._sock
        buffer = self._buffer
        if timeout != self._timeout:
            # Set only when it changes: a settimeout per read was a fifth of
            # the cost of a read in a gevent worker.
            sock.settimeout(timeout)
            self._timeout = timeout
        try:
            received = sock.recv_into(buffer)
        except (TimeoutError, BlockingIOError):
            self._check_alive()
            return []
        except OSError as exc:
            raise redis.ConnectionError(f"Error while reading from socket: {exc}") from None
        if not received:
            raise redis.ConnectionError("Connection closed by server.")
        self._heard = time.monotonic()
        self._pinged = False
        self._reader.feed(buffer, 0, received)
        if received == len(buffer):
            # More may be waiting: it joins this read, up to a cap, so a
            # burst is taken in large batches without waiting for more.
            self._read_waiting(received)
        return self._drain(max_replies)

    def _read_waiting(self, total: int) -> None:
        """Read, without waiting, what is already in the socket (up to MAX_READ_BYTES)."""
        sock = self._sock
        buffer = self._buffer
        sock.settimeout(0.0)
        self._timeout = 0.0
        received = len(buffer)
        while received == len(buffer) and total < MAX_READ_BYTES:
            try:
                received = sock.recv_into(buffer)
            except (BlockingIOError, TimeoutError, InterruptedError):
                break
            except OSError as exc:
                raise redis.ConnectionError(f"Error while reading from socket: {exc}") from None
            if not received:
                break  # closed: the next read reports it, after these replies
            self._reader.feed(buffer, 0, received)
            total += received

    def _drain(self, max_replies: int) -> list[Any]:
        replies = []
        gets = self._reader.gets
        while len(replies) < max_replies:
            reply = gets()
            if reply is False:
                break
            replies.append(reply)
        return replies

    def _check_alive(self) -> None:
        """PING a connection silent for a while; give up on one that stays silent after it."""
        silent = time.monotonic() - self._heard
        if not self._pinged:
            if silent >= IDLE_PING_SECONDS:
                self.send([("PING",)])
                self._pinged = True
                self._heard = time.monotonic()
        elif silent >= PING_REPLY_SECONDS:
            raise redis.TimeoutError(f"no reply to PING within {PING_REPLY_SECONDS:g}s")

    def close(self) -> None:
        """Close the connection (its subscriptions end with it)."""
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.disconnect()
            self._pool.release(connection)


def is_pong(reply: Any) -> bool:
    """Tell whether a reply answers a PING sent in subscribed mode (RESP2 or RESP3)."""
    if isinstance(reply, list):
        return len(reply) == 2 and reply[0] == b"pong"
    return reply == b"PONG"
