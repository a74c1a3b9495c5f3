"""The subscription owner: holds the lease, reads both publish paths, forwards.

One `Listener` runs in one process at a time (the lease sees to that). It
runs three loops, each on its own thread, each with a bounded wait so that a
stop request is seen within a second:

- the lease loop renews the lease well inside its TTL and stops everything
  when another listener holds it;
- the pub/sub loop reads `tidings:topic:*` (and `TIDINGS_SUBSCRIBE` patterns)
  on a connection it reads directly (`tidings.pubsub`): each read returns
  every complete message that has arrived, which is forwarded as one batch;
  a message cut in two by the kernel waits for its rest (redis-py's
  `get_message` took that for an outage and dropped the burst);
- the ingest loop reads `tidings:ingest` through the consumer group: first
  its own pending entries, then entries orphaned by a dead listener
  (XAUTOCLAIM), then new ones. The forward script acknowledges a batch and,
  in the same call, reads the next (only the lease holder may take entries
  from the group, so a paused or partitioned listener cannot strand entries
  in its own pending list); while nothing comes, a plain XREAD BLOCK waits.

Redis outages are expected: every loop reconnects forever with capped
backoff and logs one line per outage, never a stack trace.

Its counters (`tidings.stats.ListenerStats`) are flushed to Redis by the lease
loop once per renewal, for the web tier's `/metrics` to render.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import redis

from tidings.connection import client_name, connect
from tidings.forwarder import MAX_BATCH, MAX_BATCH_BYTES, Fenced, Forwarder, Publication, now_ms
from tidings.history import parse_offset
from tidings.keys import (
    INGEST_GROUP,
    INGEST_STREAM,
    TOPIC_CHANNEL_PATTERN,
    TOPIC_CHANNEL_PREFIX,
)
from tidings.lease import Lease
from tidings.logs import RateLimited
from tidings.payloads import DroppedPublication, to_json_text
from tidings.pubsub import PubSubConnection
from tidings.settings import Settings
from tidings.stats import ListenerStats, worker_name
from tidings.topics import is_valid_topic

log = logging.getLogger("tidings.listener")

POLL_SECONDS = 0.5
BACKOFF_START = 0.05
BACKOFF_MAX = 1.0
# Entries another consumer has held this long without acking are orphans: no
# forward takes near this long, and the fence stops a stale holder anyway.
CLAIM_IDLE_MS = 5000
CLAIM_EVERY_SECONDS = 2.0
# Durable publications arriving in batches less than BUSY_GAP_SECONDS apart
# (or twice the wait, if longer) are a busy trickle: instead of waking for
# each, the ingest loop then reads every TIDINGS_INGEST_BATCH_WAIT_US, so a
# call carries several publications. At most that much latency is added, and
# only then; sparser traffic goes out the moment it arrives, and a steady
# flood never waits (there is always more). bench/PROFILE.md finding 10 has
# the trade: at 2,000/s, the default 2 ms costs 1.4 ms of median latency and
# saves over half the CPU per publication (python -m bench.batch_wait).
BUSY_GAP_SECONDS = 0.002
TRIM_EVERY_SECONDS = 1.0

_REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)
_TOPIC_PATTERN = TOPIC_CHANNEL_PATTERN.encode()

# Drops the acknowledged head of the ingest stream: everything before the
# oldest pending entry, or up to the group's last delivered id.
_TRIM_INGEST = """
local pending = redis.call('XPENDING', KEYS[1], ARGV[1])
local minid = pending[2]
if not minid then
  for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
    for i = 1, #group, 2 do
      if group[i] == 'name' and group[i + 1] == ARGV[1] then
        for k = 1, #group, 2 do
          if group[k] == 'last-delivered-id' then
            local ms, seq = string.match(group[k + 1], '(%d+)-(%d+)')
            minid = ms .. '-' .. (tonumber(seq) + 1)
          end
        end
      end
    end
  end
end
if minid then return redis.call('XTRIM', KEYS[1], 'MINID', minid) end
return 0
"""


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _fields(flat: list) -> dict[bytes, bytes]:
    """Turn a script's flat [field, value, ...] list into redis-py's dict."""
    return dict(zip(flat[::2], flat[1::2], strict=True))


class Listener:
    """Owns the Redis subscription and forwards publications while it holds the lease."""

    def __init__(self, settings: Settings, *, role: str = "listener") -> None:
        self.settings = settings
        self.role = role
        self.consumer = client_name(role)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._lease: Lease | None = None
        self.stats = ListenerStats()
        self.counts: Counter[str] = self.stats.counts
        self._drops = RateLimited(log)
        self._patterns = (TOPIC_CHANNEL_PATTERN, *settings.subscribe)
        self.claim_idle_ms = CLAIM_IDLE_MS

    # -- lifecycle --------------------------------------------------------

    def run(self) -> bool:
        """Hold the lease and forward until stopped; False when another listener holds it."""
        client = self._connect_until_up()
        if client is None:
            return False
        self._lease = Lease(client, self.settings.lease_ttl_ms, since_ms=now_ms())
        try:
            acquired = self._lease.acquire()
        except _REDIS_DOWN:
            acquired = False
        if not acquired:
            log.info("lease held by another listener; exiting")
            return False
        log.info("acquired the listener lease; forwarding")
        self.counts["starts"] += 1
        self._flush_stats(client)
        self._threads = [
            threading.Thread(target=self._guard, args=(self._read_pubsub,), name="pubsub"),
            threading.Thread(target=self._guard, args=(self._read_ingest,), name="ingest"),
        ]
        for thread in self._threads:
            thread.daemon = True
            thread.start()
        try:
            self._hold_lease(client)
        finally:
            self._stop.set()
            for thread in self._threads:
                thread.join(timeout=5)
            self._flush_stats(client)
            try:
                if self._lease.release():
                    log.info("released the listener lease")
            except _REDIS_DOWN:
                log.warning("could not release the lease: Redis unavailable; it will expire")
        return True

    def stop(self) -> None:
        """Ask every loop to finish; safe from a signal handler."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        """Tell whether a stop was requested or the lease was lost."""
        return self._stop.is_set()

    # -- the lease ------------------------------------------------------------

    def _hold_lease(self, client: redis.Redis) -> None:
        assert self._lease is not None
        interval = self._lease.ttl_ms / 3000
        down_since: float | None = None
        while not self._stop.wait(interval):
            try:
                if self._lease.renew() or self._lease.acquire():
                    if down_since is not None:
                        log.info("Redis is back; lease renewed")
                        down_since = None
                    self._flush_stats(client)
                    continue
            except _REDIS_DOWN:
                if down_since is None:
                    down_since = time.monotonic()
                    log.warning("Redis unavailable; lease renewal will retry")
                continue
            log.warning("lost the listener lease to another listener; stopping")
            self._stop.set()

    def _flush_stats(self, client: redis.Redis) -> None:
        """Add the counters' increments to Redis; a failure waits for the next flush."""
        # Redis down or read-only: the increments stay pending.
        with contextlib.suppress(redis.RedisError):
            self.stats.flush(client, worker_name())

    def _guard(self, loop: Callable[[], None]) -> None:
        try:
            loop()
        except Fenced:
            log.warning("fenced: another listener holds the lease; stopping")
        except Exception:
            log.exception("listener loop crashed; stopping so a fresh listener takes over")
        finally:
            self._stop.set()

    # -- connections ----------------------------------------------------------

    def _connect_until_up(self) -> redis.Redis | None:
        backoff = BACKOFF_START
        warned = False
        while not self._stop.is_set():
            client = connect(self.settings.redis_url, self.role)
            try:
                client.ping()
                if warned:
                    log.info("Redis is back")
                return client
            except _REDIS_DOWN as exc:
                client.close()
                if not warned:
                    log.warning("Redis unavailable (%s); retrying", exc)
                    warned = True
            self._stop.wait(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)
        return None

    @contextmanager
    def _outage(self, what: str) -> Iterator[None]:
        """Turn a Redis outage inside the block into one log line and a backoff."""
        try:
            yield
        except _REDIS_DOWN as exc:
            self.counts["redis_reconnects"] += 1
            log.warning("%s: Redis unavailable (%s); reconnecting", what, exc)
            self._stop.wait(BACKOFF_START)
        except redis.ResponseError as exc:
            # The stream or its group vanished (a Redis restarted without
            # persistence, or an operator's DEL): recreate and go on.
            if "NOGROUP" not in str(exc):
                raise
            log.warning("%s: consumer group missing; recreating it", what)

    def _forwarder(self, client: redis.Redis) -> Forwarder:
        return Forwarder(
            client,
            history_size=self.settings.history_size,
            history_ttl=self.settings.history_ttl,
        )

    # -- pub/sub path -----------------------------------------------------------

    def _read_pubsub(self) -> None:
        while not self._stop.is_set():
            client = self._connect_until_up()
            if client is None:
                return
            forwarder = self._forwarder(client)
            connection: PubSubConnection | None = None
            try:
                with self._outage("pub/sub"):
                    connection = PubSubConnection(client)
                    connection.subscribe(self._patterns, "PSUBSCRIBE")
                    self._pump_pubsub(connection, forwarder)
            finally:
                # Fenced or stopped too: a subscription left open would keep
                # this process hearing every fast publication.
                if connection is not None:
                    connection.close()
                forwarder.close()
                client.close()

    def _pump_pubsub(self, connection: PubSubConnection, forwarder: Forwarder) -> None:
        """Forward what each read brings as one batch (MAX_BATCH, MAX_BATCH_BYTES at most)."""
        confirmed = 0
        while not self._stop.is_set():
            batch: list[Publication] = []
            size = 0
            for reply in connection.read(POLL_SECONDS, max_replies=MAX_BATCH):
                kind = reply[0] if isinstance(reply, list) and reply else None
                if kind == b"pmessage":
                    pub = self._from_pubsub(reply[1], reply[2], reply[3])
                    if isinstance(pub, Publication):
                        batch.append(pub)
                        size += len(pub.data_json)
                        if size >= MAX_BATCH_BYTES:
                            self._forward(forwarder, batch, [], path="pubsub")
                            batch, size = [], 0
                elif kind == b"psubscribe":
                    confirmed += 1
                    if confirmed == len(self._patterns):
                        log.info("subscribed to %s", ", ".join(self._patterns))
                elif isinstance(reply, redis.ResponseError):
                    raise reply  # a refused PSUBSCRIBE (ACL): nothing would ever arrive
            if batch:
                self._forward(forwarder, batch, [], path="pubsub")

    def _while_holding(self, call: Callable[[], Any]) -> Any:
        """Run a fenced call; if the lease merely expired, take it back and run it once more."""
        # A lease lost to a Redis restart is ours to take back; one held by
        # another listener is not (Fenced propagates). The fenced call changed
        # nothing, so running it again cannot duplicate.
        assert self._lease is not None
        try:
            return call()
        except Fenced:
            if not self._lease.acquire():
                raise
            log.info("the lease had expired (Redis restarted?); re-acquired it")
            return call()

    def _forward(
        self,
        forwarder: Forwarder,
        batch: list[Publication],
        ack_ids: list,
        dropped_receipts: Sequence[tuple[str, str]] = (),
        *,
        path: str,
        read_next: bool = False,
        expect: Sequence[bytes | str] = (),
    ) -> tuple[list, str]:
        """Forward a batch, fenced; with `read_next`, return the ingest entries read after it."""
        assert self._lease is not None
        read: tuple[list, str] = ([], "")
        forwarded = True

        def attempt() -> None:
            nonlocal read, forwarded
            if read_next:
                forwarded, entries, newest = forwarder.forward_and_read(
                    batch,
                    ack_ids=ack_ids,
                    dropped_receipts=dropped_receipts,
                    lease_token=self._lease.token,
                    consumer=self.consumer,
                    count=MAX_BATCH,
                    expect=expect,
                )
                read = (entries, newest)
                return
            forwarder.forward(
                batch,
                ack_ids=ack_ids,
                dropped_receipts=dropped_receipts,
                lease_token=self._lease.token,
                path=path,
            )

        self._while_holding(attempt)
        if batch and forwarded:
            # One clock read per batch; the loop over it is the forward's own size.
            self.stats.forwarded(path, (pub.entered_ms for pub in batch), now_ms())
        return read

    def _from_pubsub(self, pattern: bytes, channel: bytes, data: bytes) -> Publication | str | None:
        name = channel.decode("utf-8", "replace")
        if pattern == _TOPIC_PATTERN:
            topic = name[len(TOPIC_CHANNEL_PREFIX) :]
        elif name.startswith("tidings:"):
            return None  # Tidings' own channels caught by a broad extra pattern
        else:
            topic = name
        # Pub/sub carries no publish time: the listener's receipt stands in.
        return self._publication(topic, data, None, "pubsub", now_ms())

    def _publication(
        self,
        topic: str,
        raw: bytes | None,
        published_ms: int | None,
        path: str,
        entered_ms: int | None,
    ) -> Publication | str:
        """Return the publication to forward, or the reason it is dropped."""
        self.counts["received_" + path] += 1
        try:
            if not is_valid_topic(topic):
                raise DroppedPublication("invalid_topic")
            if raw is None:
                raise DroppedPublication("malformed", "no data field")
            return Publication(
                topic,
                to_json_text(raw, self.settings.max_payload),
                published_ms,
                entered_ms=entered_ms,
            )
        except DroppedPublication as drop:
            self.counts["dropped_" + drop.reason] += 1
            self.stats.dropped(drop.reason, path, topic)
            self._drops.warning(
                drop.reason,
                "dropped a publication (%s) on topic %.140r via %s",
                drop,
                topic,
                path,
                extra={"topic": topic[:140]},
            )
            return drop.reason

    # -- ingest path ------------------------------------------------------------

    def _read_ingest(self) -> None:
        while not self._stop.is_set():
            client = self._connect_until_up()
            if client is None:
                return
            forwarder = self._forwarder(client)
            with self._outage("ingest"):
                self._ensure_group(client)
                self._pump_ingest(client, forwarder)
            forwarder.close()
            client.close()

    def _ensure_group(self, client: redis.Redis) -> None:
        try:
            # Id 0: entries written before the first listener ever ran are read too.
            client.xgroup_create(INGEST_STREAM, INGEST_GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _pump_ingest(self, client: redis.Redis, forwarder: Forwarder) -> None:
        assert self._lease is not None
        trim = client.register_script(_TRIM_INGEST)
        # After any (re)connect, first everything already read and not acked:
        # this consumer's own (a forward that failed may not have happened)
        # and other consumers' (a dead or fenced listener's, which the fence
        # keeps from ever forwarding them). All are older than anything `>`
        # gives, so forwarding them first keeps each topic in publish order.
        # XAUTOCLAIM returns this consumer's own pending entries too: one copy
        # of each, or an entry would be forwarded twice (two offsets).
        backlog = {
            _text(entry_id): (entry_id, fields)
            for entry_id, fields in self._own_pending(client) + self._claim(client, min_idle_ms=0)
        }
        if backlog:
            ordered = sorted(backlog.values(), key=lambda e: parse_offset(_text(e[0])) or (0, 0))
            self._forward_entries(forwarder, ordered)

        last_claim = last_trim = time.monotonic()
        entries, newest = self._forward_entries(forwarder, [], read_next=True)
        # Whether `entries` came through the group (a fenced read), or only
        # from the wake-up (to be claimed in the same call that forwards them).
        taken = True
        # A busy trickle (batches less than `gap` apart) is batched by
        # time: see BUSY_GAP_SECONDS.
        busy = False
        last_batch = 0.0
        wait = self.settings.ingest_batch_wait_us / 1_000_000
        gap = max(BUSY_GAP_SECONDS, 2 * wait) if wait else 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now - last_claim >= CLAIM_EVERY_SECONDS:
                # A backstop: with fenced reads nothing should ever be orphaned.
                orphans = self._claim(client, min_idle_ms=self.claim_idle_ms)
                if orphans:
                    self._forward_entries(forwarder, orphans)
                last_claim = now
            if now - last_trim >= TRIM_EVERY_SECONDS:
                trim(keys=[INGEST_STREAM], args=[INGEST_GROUP])
                last_trim = now
            if busy and not entries:
                # Let more arrive before reading: a read per `wait` instead
                # of one per publication (each one a wake-up of the listener
                # and of the web workers, which cost more than the
                # publication itself). What is read is forwarded at once.
                self._stop.wait(wait)
                entries, newest = self._forward_entries(forwarder, [], read_next=True)
                busy = bool(entries)
                taken = True
                if not entries:
                    continue
            if not entries:
                # The wake-up: a plain read changes nothing, so a listener
                # that lost its lease meanwhile cannot take entries with it.
                entries = forwarder.wait(newest, block_ms=int(POLL_SECONDS * 1000), count=MAX_BATCH)
                if not entries:
                    continue
                taken = False
            now = time.monotonic()
            busy = now - last_batch < gap
            last_batch = now
            # Forward what was read (claiming it first if the wake-up read
            # it) and read what came meanwhile, in one fenced script call.
            entries, newest = self._forward_entries(
                forwarder, [(e[0], _fields(e[1])) for e in entries], read_next=True, claim=not taken
            )
            taken = True

    def _own_pending(self, client: redis.Redis) -> list:
        entries: list = []
        start = "0"
        while True:
            reply = client.xreadgroup(
                INGEST_GROUP, self.consumer, {INGEST_STREAM: start}, count=MAX_BATCH
            )
            batch = reply[0][1] if reply else []
            if not batch:
                return entries
            entries += batch
            start = batch[-1][0]

    def _claim(self, client: redis.Redis, *, min_idle_ms: int) -> list:
        """Take over entries other consumers read and left unacknowledged."""
        claimed: list = []
        start = "0-0"
        while True:
            start, entries, *_ = client.xautoclaim(
                INGEST_STREAM,
                INGEST_GROUP,
                self.consumer,
                min_idle_time=min_idle_ms,
                start_id=start,
                count=MAX_BATCH,
            )
            claimed += entries
            if _text(start) == "0-0":
                break
        if claimed:
            log.info("claimed %d ingest entries left pending by another listener", len(claimed))
        return claimed

    def _forward_entries(
        self, forwarder: Forwarder, entries: list, *, read_next: bool = False, claim: bool = False
    ) -> tuple[list, str]:
        """Forward ingest entries in batches; with `read_next`, the last call reads the next ones.

        Returns the entries read next and, when there were none, the newest
        id of the stream (to wait after); without `read_next`, nothing. With
        `claim`, the entries were only seen (XREAD), not taken from the
        group: they go in one call that takes them first, or, too large for
        one batch, are taken by a fenced read and come back to be forwarded.
        """
        batch: list[Publication] = []
        ack_ids: list = []
        dropped_receipts: list[tuple[str, str]] = []
        size = 0
        for entry_id, fields in entries:
            ack_ids.append(entry_id)
            if fields is not None:  # None: deleted from the stream while pending
                pub = self._from_ingest(entry_id, fields)
                wants_receipt = fields.get(b"receipt") == b"1"
                if isinstance(pub, Publication):
                    if wants_receipt:
                        pub = replace(pub, receipt=entry_id.decode())
                    batch.append(pub)
                    size += len(pub.data_json)
                elif wants_receipt:
                    dropped_receipts.append((entry_id.decode(), pub))
            if len(ack_ids) >= MAX_BATCH or size >= MAX_BATCH_BYTES:
                if claim:
                    return self._forward(forwarder, [], [], path="ingest", read_next=True)
                self._forward(forwarder, batch, ack_ids, dropped_receipts, path="ingest")
                batch, ack_ids, dropped_receipts, size = [], [], [], 0
        if read_next:
            return self._forward(
                forwarder,
                batch,
                ack_ids,
                dropped_receipts,
                path="ingest",
                read_next=True,
                expect=ack_ids if claim else (),
            )
        if ack_ids:
            self._forward(forwarder, batch, ack_ids, dropped_receipts, path="ingest")
        return [], ""

    def _from_ingest(self, entry_id: bytes, fields: dict[bytes, bytes]) -> Publication | str:
        topic = fields.get(b"topic", b"").decode("utf-8", "replace")
        published = fields.get(b"ts", b"")
        published_ms = int(published) if published.isdigit() else None
        # Without `ts` (a plain XADD), the entry id's time: when Redis took it.
        entered_ms = published_ms
        if entered_ms is None:
            stamp = entry_id.split(b"-", 1)[0]
            entered_ms = int(stamp) if stamp.isdigit() else None
        return self._publication(topic, fields.get(b"data"), published_ms, "ingest", entered_ms)
