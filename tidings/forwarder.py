"""The one atomic step of forwarding: fence, write history, emit, acknowledge.

A single Lua script per batch checks that the caller still holds the listener
lease, appends every publication to its topic's history stream (the stream id
is the offset), publishes one Socket.IO `publications` event per topic on the
topic's own message-queue channel (`tidings:socketio:<topic>`, heard only by
the web workers that have clients of the topic), and acknowledges the batch's
ingest entries. Redis runs it
atomically, so a stale listener can neither write nor emit, and an ingest
entry is acknowledged exactly when it was forwarded: a crash on either side of
the script leaves it either fully forwarded and acked or untouched and
pending, never forwarded twice. One round trip per batch, however large.

The emitted message is python-socketio's pub/sub manager format (what
`RedisManager(write_only=True).emit()` publishes); building it in the script
lets the offsets go out in the same step that allocates them. It carries one
more top-level key, `tidings`, that python-socketio ignores and clients never
see: the batch's source path, the size of the publications list, its first
and last offsets, and each publication's entry time (ms, for the web tier's
publish-to-send latency). It comes before `data`, which is last, so the web
tier takes the list out by position (`webapp.queue`) instead of parsing it.

A forwarder sends its `EVALSHA` on a connection of its own, packed once per
batch, and reads the reply itself: redis-py's command path (pool checkout and
return, retry wrapper, per-argument encoding, observability hooks) cost more
CPU than the script itself when publications arrive one by one.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import redis
from redis.connection import AbstractConnection

try:
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # redis-py without its hiredis extra: its own packer
    _hiredis_pack = None

from tidings.keys import (
    INGEST_GROUP,
    INGEST_STREAM,
    LEASE_KEY,
    RECEIPT_PREFIX,
    history_key,
    queue_channel,
    room,
)

FORWARD_SCRIPT = """
local token = ARGV[1]
if token ~= '' and redis.call('GET', KEYS[1]) ~= token then
  return redis.error_reply('FENCED the listener lease is held by another listener')
end
local maxlen, ttl, head, group = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local receipts, receipt_ms = ARGV[6], ARGV[7]
local consumer, nread = ARGV[8], tonumber(ARGV[9])
local function receipt(ingest_id, value)
  local key = receipts .. ingest_id
  redis.call('RPUSH', key, value)
  redis.call('PEXPIRE', key, receipt_ms)
end
local nexpect = tonumber(ARGV[10])
local pos = 11
if nexpect > 0 then
  -- The caller saw these entries with a plain XREAD (its wake-up) and made
  -- the batch from them: it is forwarded only if the group hands exactly
  -- them to this consumer now. Otherwise nothing is forwarded, and what the
  -- group handed over goes back to the caller to forward.
  local claimed = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', nexpect,
                             'STREAMS', KEYS[2], '>')
  local entries = claimed and claimed[1][2] or {}
  local same = #entries == nexpect
  if same then
    for j = 1, nexpect do
      if entries[j][1] ~= ARGV[pos + j - 1] then
        same = false
        break
      end
    end
  end
  if not same then return {{}, entries, '', 'mismatch'} end
  pos = pos + nexpect
end
local nacks = tonumber(ARGV[pos])
pos = pos + 1
if nacks > 0 then
  local acks = {}
  for j = 1, nacks do acks[j] = ARGV[pos + j - 1] end
  pos = pos + nacks
  redis.call('XACK', KEYS[2], group, unpack(acks))
end
local ndropped = tonumber(ARGV[pos])
pos = pos + 1
for j = 1, ndropped do
  receipt(ARGV[pos], 'dropped:' .. ARGV[pos + 1])
  pos = pos + 2
end
local path = ARGV[pos]
pos = pos + 1
local offsets = {}
for k = 3, #KEYS do
  local topic_json, room_json, channel = ARGV[pos], ARGV[pos + 1], ARGV[pos + 2]
  local n = tonumber(ARGV[pos + 3])
  pos = pos + 4
  local parts = {}
  local entered = {}
  for j = 1, n do
    local data, ts, wants_receipt, t = ARGV[pos], ARGV[pos + 1], ARGV[pos + 2], ARGV[pos + 3]
    pos = pos + 4
    local id = redis.call('XADD', KEYS[k], 'MAXLEN', maxlen, '*', 'd', data, 't', ts)
    parts[j] = '{"topic":' .. topic_json .. ',"offset":"' .. id .. '","data":' .. data .. '}'
    entered[j] = t
    offsets[#offsets + 1] = id
    if wants_receipt ~= '' then receipt(wants_receipt, id) end
  end
  redis.call('EXPIRE', KEYS[k], ttl)
  local body = table.concat(parts, ',')
  -- `tidings` (ignored by python-socketio) comes before `data`, which ends
  -- the message, so a web worker slices the list out without parsing it.
  redis.call('PUBLISH', channel, head .. room_json .. ',"tidings":{"path":"' .. path
    .. '","n":' .. #body .. ',"first":"' .. offsets[#offsets - n + 1] .. '","last":"'
    .. offsets[#offsets] .. '","t":[' .. table.concat(entered, ',') .. ']},"data":[['
    .. body .. ']]}')
end
if nread == 0 then return offsets end
-- And the next batch, in the same call (fenced by the same lease check):
-- one round trip per batch while entries keep coming.
local reply = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', nread,
                         'STREAMS', KEYS[2], '>')
if reply then return {offsets, reply[1][2], '', ''} end
-- Nothing new: the id to wait after (a plain XREAD BLOCK, outside any script).
local newest = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
return {offsets, {}, newest[1] and newest[1][1] or '0-0', ''}
"""

# A receipt nobody collects is gone after this long.
RECEIPT_TTL_MS = 60_000

# Batches above either bound are split: they bound how long one script holds
# Redis and how large one queue message (one client packet) gets.
MAX_BATCH = 1000
MAX_BATCH_BYTES = 128 * 1024


class Fenced(Exception):
    """The caller no longer holds the listener lease; it must stop forwarding."""


@dataclass(frozen=True)
class Publication:
    """A publication ready to forward: topic, JSON text, publish time in ms."""

    topic: str
    data_json: str
    published_ms: int | None = None
    # The ingest id of a durable publication whose publisher waits for a receipt.
    receipt: str | None = None
    # When it entered Tidings (publish time, else when Redis or the listener
    # first saw it), in ms: the start of the latency metrics, nothing else.
    entered_ms: int | None = None


_FORWARD_SHA = hashlib.sha1(FORWARD_SCRIPT.encode()).hexdigest()


class Forwarder:
    """Forwards batches of publications through the atomic script.

    Not thread-safe: each forwarding loop has its own (and its own connection).
    """

    def __init__(self, client: redis.Redis, *, history_size: int, history_ttl: int) -> None:
        self._client = client
        self._connection: AbstractConnection | None = None
        self._history_size = str(history_size)
        self._history_ttl = str(history_ttl)
        host_id = f"tidings-{uuid.uuid4().hex}"
        # Everything of the queue message but the room and the data, whose
        # keys the script appends; python-socketio reads it with json.loads.
        self._head = (
            '{"method":"emit","event":"publications","binary":false,"namespace":"/",'
            f'"skip_sid":null,"callback":null,"host_id":"{host_id}","room":'
        )

    def forward(
        self,
        publications: Iterable[Publication],
        *,
        ack_ids: Iterable[bytes | str] = (),
        dropped_receipts: Iterable[tuple[str, str]] = (),
        lease_token: str = "",
        path: str = "",
    ) -> list[str]:
        """Forward publications (grouped per topic, order kept) and ack ingest ids.

        Publications with a `receipt` get their offset pushed to
        `tidings:receipt:<ingest id>`; `dropped_receipts` (ingest id, reason)
        tell waiting publishers of dropped ones. Returns the offsets in the
        order the topics were first seen. Raises Fenced when `lease_token` is
        given and no longer holds the lease. `path` (pubsub, ingest) labels
        the web tier's latency metrics.
        """
        acks, drops = list(ack_ids), list(dropped_receipts)
        pubs = list(publications)
        if not pubs and not acks and not drops:
            return []
        offsets = self._call(pubs, acks, drops, lease_token, path, "", 0, ())
        return [offset.decode() for offset in offsets]

    def forward_and_read(
        self,
        publications: Iterable[Publication],
        *,
        ack_ids: Iterable[bytes | str],
        dropped_receipts: Iterable[tuple[str, str]] = (),
        lease_token: str,
        consumer: str,
        count: int,
        expect: Sequence[bytes | str] = (),
    ) -> tuple[bool, list, str]:
        """`forward` (path ingest), then read up to `count` new ingest entries for `consumer`.

        With `expect`, the ids of entries seen by `wait` (not yet taken from
        the group), the batch is forwarded only if the group hands exactly
        those to `consumer` first; else nothing is, and what it handed over
        is returned as read. Returns whether the batch was forwarded, the
        entries read ([id, [field, value, ...]], as XREADGROUP gives them),
        and, when none were, the stream's newest id to wait after. One script
        call: the read is fenced by the lease too.
        """
        _, entries, newest, mismatch = self._call(
            list(publications),
            list(ack_ids),
            list(dropped_receipts),
            lease_token,
            "ingest",
            consumer,
            count,
            expect,
        )
        return not mismatch, entries, newest.decode()

    def wait(self, after: str, *, block_ms: int, count: int) -> list:
        """Block up to `block_ms` for ingest entries after `after`; return them (maybe none).

        A plain XREAD on the forwarder's connection: it takes nothing from the
        consumer group, so a listener that lost its lease meanwhile strands
        nothing; `forward_and_read(expect=...)` takes them.
        """
        command = ("XREAD", "COUNT", count, "BLOCK", block_ms, "STREAMS", INGEST_STREAM, after)
        connection = self._checked_out()
        try:
            connection.send_packed_command(
                [_hiredis_pack(command)] if _hiredis_pack else connection.pack_command(*command)
            )
            reply = connection.read_response()
        except BaseException:
            connection.disconnect()
            raise
        if not reply:
            return []
        streams = reply.values() if isinstance(reply, dict) else (entries for _, entries in reply)
        return next(iter(streams), [])

    def _call(
        self,
        pubs: list[Publication],
        acks: list[bytes | str],
        drops: list[tuple[str, str]],
        lease_token: str,
        path: str,
        consumer: str,
        count: int,
        expect: Sequence[bytes | str],
    ) -> Any:
        by_topic: dict[str, list[Publication]] = {}
        for pub in pubs:
            by_topic.setdefault(pub.topic, []).append(pub)
        keys = [LEASE_KEY, INGEST_STREAM]
        args: list[str | bytes] = [
            lease_token,
            self._history_size,
            self._history_ttl,
            self._head,
            INGEST_GROUP,
            RECEIPT_PREFIX,
            str(RECEIPT_TTL_MS),
            consumer,
            str(count),
            str(len(expect)),
            *expect,
            str(len(acks)),
            *acks,
            str(len(drops)),
        ]
        for ingest_id, reason in drops:
            args += [ingest_id, reason]
        args.append(path if path in ("pubsub", "ingest") else "")
        for topic, topic_pubs in by_topic.items():
            keys.append(history_key(topic))
            args += [json.dumps(topic), json.dumps(room(topic)), queue_channel(topic)]
            args.append(str(len(topic_pubs)))
            for pub in topic_pubs:
                published = "" if pub.published_ms is None else str(pub.published_ms)
                entered = pub.entered_ms if pub.entered_ms is not None else pub.published_ms
                args += [
                    pub.data_json,
                    published,
                    pub.receipt or "",
                    "null" if entered is None else str(int(entered)),
                ]
        try:
            return self._run(keys, args)
        except redis.ResponseError as exc:
            if str(exc).startswith("FENCED"):
                raise Fenced(str(exc)) from None
            raise

    def close(self) -> None:
        """Give the forwarder's connection back to its client's pool."""
        connection, self._connection = self._connection, None
        if connection is not None:
            self._client.connection_pool.release(connection)

    def _run(self, keys: list[str], args: list[str | bytes]) -> list[bytes]:
        """Run the script on this forwarder's connection: one packed EVALSHA, one reply."""
        command = ("EVALSHA", _FORWARD_SHA, len(keys), *keys, *args)
        connection = self._checked_out()
        try:
            # hiredis packs the whole command in C; redis-py's wrapper around
            # it first walks every argument in Python.
            packed = (
                [_hiredis_pack(command)] if _hiredis_pack else connection.pack_command(*command)
            )
            connection.send_packed_command(packed)
            try:
                return connection.read_response()
            except redis.exceptions.NoScriptError:
                # A restarted (or flushed) Redis lost the script: load it and
                # run the batch once more; nothing of it ran.
                connection.send_command("SCRIPT", "LOAD", FORWARD_SCRIPT)
                connection.read_response()
                connection.send_packed_command(packed)
                return connection.read_response()
        except BaseException as exc:
            # Anything but a script error may leave a reply unread, so the
            # connection cannot be reused. Never sent again here: the script
            # may have run, and a second run would forward the batch twice.
            if not isinstance(exc, redis.ResponseError):
                connection.disconnect()
            raise

    def _checked_out(self) -> AbstractConnection:
        """Return this forwarder's connection, replaced if it broke while idle."""
        connection = self._connection
        if connection is None:
            # The pool checks a connection it hands out, and connects it.
            connection = self._connection = self._client.connection_pool.get_connection()
            return connection
        # The same check, each batch: a connection Redis closed while idle (a
        # restart, CLIENT KILL) or whose socket the Sentinel watcher shut (a
        # demoted master) would take the batch and fail on reading the reply,
        # when whether the script ran is unknown. A fresh one is sure.
        try:
            connection.connect()  # no-op while connected
            if connection.can_read(timeout=0):
                raise redis.ConnectionError("unexpected data on an idle connection")
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            connection.disconnect()
            connection.connect()
        return connection


def now_ms() -> int:
    """Return the wall clock in milliseconds (publish and forward times)."""
    return time.time_ns() // 1_000_000
