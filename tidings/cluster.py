"""The cluster-wide state of presence, kept in Redis by every web node and read by anyone.

Each web node (a gunicorn worker, `<host>:<pid>`) keeps its share in three
hashes of its own (`tidings:node:<node>:topics|members|users`) and adds it
to the cluster-wide hashes (`tidings:topics`, `tidings:presence:<topic>`,
`tidings:users`), in one Lua script per flush, so the two always agree.
Readers therefore answer from the cluster-wide hashes with O(1) commands
(`presence_stats` is an HGET and an HLEN), whatever the number of nodes.

A node proves it lives by its heartbeat (its score in `tidings:nodes`,
Redis's clock). Every script first reaps nodes silent for NODE_TTL_MS:
their share is taken away from the cluster-wide hashes and their keys
deleted, atomically, so a `kill -9`ed node drops out of presence within
NODE_TTL_MS plus a heartbeat, whoever looks first. A node that finds itself
reaped (paused past the TTL, or Redis lost its keys) syncs its whole share
again; so does a node starting under the name of a dead one (a container
restarted with the same host name and pid): nothing stays behind.

Transitions across the cluster (a topic's first subscriber in, its last
out; a user's first connection to a presence topic, their last) are found
in the same scripts and, with webhooks on, appended to `tidings:webhooks`
in the order they happened.

Not for Redis Cluster: the scripts name keys they compute (as Tidings'
pub/sub channels are global anyway).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import redis

from tidings.keys import (
    NODES_INDEX,
    PRESENCE_PREFIX,
    REVOKED_VERSION,
    TOPICS_KEY,
    USERS_KEY,
    WEBHOOK_STREAM,
    node_key,
    presence_key,
)
from tidings.presence import Batch

# A node whose heartbeat is older than this is dead: its share is taken away.
# Nodes beat every second (webapp/presence.py), so ten missed beats.
NODE_TTL_MS = 10_000
# Webhook events kept at most while the receiver is away (approximate trim).
WEBHOOK_STREAM_MAXLEN = 100_000

_PRELUDE = """
local NODES, NODE, TOPICS, USERS, PRESENCE, STREAM = %s
local node_ttl, hooks, maxlen = tonumber(ARGV[1]), ARGV[2] == '1', ARGV[3]
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)

local function event(name, topic, sub)
  if not hooks then return end
  if sub then
    redis.call('XADD', STREAM, 'MAXLEN', '~', maxlen, '*', 'name', name, 'topic', topic, 'sub', sub)
  else
    redis.call('XADD', STREAM, 'MAXLEN', '~', maxlen, '*', 'name', name, 'topic', topic)
  end
end

-- Add d to a node's field and to the cluster-wide field; return the total
-- before and after, or nil when nothing changed. A node never goes below 0.
local function bump(mine_key, mine_field, all_key, all_field, d)
  local mine = tonumber(redis.call('HGET', mine_key, mine_field) or '0')
  if mine + d < 0 then d = -mine end
  if d == 0 then return nil end
  if mine + d == 0 then
    redis.call('HDEL', mine_key, mine_field)
  else
    redis.call('HINCRBY', mine_key, mine_field, d)
  end
  local total = redis.call('HINCRBY', all_key, all_field, d)
  if total <= 0 then redis.call('HDEL', all_key, all_field) end
  return total - d, total
end

local function topic_delta(node, topic, d)
  local before, after = bump(NODE .. node .. ':topics', topic, TOPICS, topic, d)
  if before == nil then return end
  if before <= 0 and after > 0 then event('topic.occupied', topic) end
  if before > 0 and after <= 0 then event('topic.vacated', topic) end
end

local function member_delta(node, topic, sub, d)
  local field = topic .. ' ' .. sub
  local before, after = bump(NODE .. node .. ':members', field, PRESENCE .. topic, sub, d)
  if before == nil then return end
  if before <= 0 and after > 0 then event('member.added', topic, sub) end
  if before > 0 and after <= 0 then event('member.removed', topic, sub) end
end

-- Apply deltas in an order that reads well at the receiver: a topic is
-- occupied before its first member is added, its last member removed
-- before it is vacated.
local function apply(node, t, m, u)
  for _, e in ipairs(t) do if e[2] > 0 then topic_delta(node, e[1], e[2]) end end
  for _, e in ipairs(m) do if e[3] > 0 then member_delta(node, e[1], e[2], e[3]) end end
  for _, e in ipairs(m) do if e[3] < 0 then member_delta(node, e[1], e[2], e[3]) end end
  for _, e in ipairs(t) do if e[2] < 0 then topic_delta(node, e[1], e[2]) end end
  for _, e in ipairs(u) do bump(NODE .. node .. ':users', e[1], USERS, e[1], e[2]) end
end

-- The deltas that turn what a node's hash holds into `target` (field -> n).
local function diff(key, target, split)
  local current = {}
  local flat = redis.call('HGETALL', key)
  for i = 1, #flat, 2 do current[flat[i]] = tonumber(flat[i + 1]) end
  local out = {}
  local function push(field, d)
    if d ~= 0 then
      if split then
        local space = string.find(field, ' ', 1, true)
        table.insert(out, {string.sub(field, 1, space - 1), string.sub(field, space + 1), d})
      else
        table.insert(out, {field, d})
      end
    end
  end
  for field, n in pairs(target) do
    push(field, n - (current[field] or 0))
    current[field] = nil
  end
  for field, n in pairs(current) do push(field, -n) end
  return out
end

-- Make a node's share what `t`, `m`, `u` (full counts) say.
local function sync(node, t, m, u)
  local tt, mt, ut = {}, {}, {}
  for _, e in ipairs(t) do tt[e[1]] = e[2] end
  for _, e in ipairs(m) do mt[e[1] .. ' ' .. e[2]] = e[3] end
  for _, e in ipairs(u) do ut[e[1]] = e[2] end
  apply(node,
    diff(NODE .. node .. ':topics', tt, false),
    diff(NODE .. node .. ':members', mt, true),
    diff(NODE .. node .. ':users', ut, false))
end

local function reap(node)
  sync(node, {}, {}, {})
  redis.call('DEL', NODE .. node, NODE .. node .. ':topics', NODE .. node .. ':members',
    NODE .. node .. ':users')
  redis.call('ZREM', NODES, node)
end

-- Reap the nodes silent for node_ttl (a few per call; the next call goes on).
local function reap_dead(except)
  local dead = redis.call('ZRANGEBYSCORE', NODES, '-inf', now - node_ttl, 'LIMIT', 0, 8)
  for _, node in ipairs(dead) do
    if node ~= except then reap(node) end
  end
end
""" % (
    "'"
    + "', '".join(
        (NODES_INDEX, node_key(""), TOPICS_KEY, USERS_KEY, PRESENCE_PREFIX, WEBHOOK_STREAM)
    )
    + "'"
)

# ARGV[4] node, ARGV[5] 'delta' | 'sync', ARGV[6] the batch (JSON), ARGV[7] facts (JSON).
# Returns {status, revocations version}; status 'unknown' when a delta batch
# came from a node not registered (reaped, or Redis lost it): nothing applied.
FLUSH = (
    _PRELUDE
    + """
local node, mode = ARGV[4], ARGV[5]
local batch = cjson.decode(ARGV[6])
local facts = cjson.decode(ARGV[7])
local version = redis.call('GET', KEYS[1]) or '0'
reap_dead(node)
if mode == 'sync' then
  sync(node, batch.t, batch.m, batch.u)
elseif redis.call('ZSCORE', NODES, node) == false then
  return {'unknown', version}
else
  apply(node, batch.t, batch.m, batch.u)
end
redis.call('ZADD', NODES, now, node)
local fields = {'seen', now}
for k, v in pairs(facts) do table.insert(fields, k); table.insert(fields, tostring(v)) end
redis.call('HSET', NODE .. node, unpack(fields))
redis.call('PEXPIRE', NODE .. node, node_ttl * 3)
return {'ok', version}
"""
)

# ARGV[4] node, ARGV[5] sub, ARGV[6] the cap. 1: counted; 0: at the cap;
# -1: the node is not registered (it syncs, then asks again).
ADMIT = (
    _PRELUDE
    + """
local node, sub, cap = ARGV[4], ARGV[5], tonumber(ARGV[6])
if redis.call('ZSCORE', NODES, node) == false then return -1 end
if tonumber(redis.call('HGET', USERS, sub) or '0') >= cap then return 0 end
redis.call('HINCRBY', USERS, sub, 1)
redis.call('HINCRBY', NODE .. node .. ':users', sub, 1)
return 1
"""
)

STATS = (
    _PRELUDE
    + """
reap_dead('')
return {redis.call('HGET', TOPICS, ARGV[4]) or '0', redis.call('HLEN', PRESENCE .. ARGV[4])}
"""
)

ALL_TOPICS = (
    _PRELUDE
    + """
reap_dead('')
return redis.call('HGETALL', TOPICS)
"""
)

NODES = (
    _PRELUDE
    + """
reap_dead('')
local out = {}
for _, node in ipairs(redis.call('ZRANGE', NODES, 0, -1)) do
  table.insert(out, node)
  table.insert(out, redis.call('HGETALL', NODE .. node))
end
return out
"""
)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class Flushed:
    """A flush's answer: whether the node was known, and the revocations' version."""

    known: bool
    revocations_version: str


class Cluster:
    """The scripts over the cluster-wide state, bound to one Redis client."""

    def __init__(self, client: redis.Redis, *, webhooks: bool = False) -> None:
        self.client = client
        self._common = [NODE_TTL_MS, "1" if webhooks else "0", WEBHOOK_STREAM_MAXLEN]
        self._flush = client.register_script(FLUSH)
        self._admit = client.register_script(ADMIT)
        self._stats = client.register_script(STATS)
        self._topics = client.register_script(ALL_TOPICS)
        self._nodes = client.register_script(NODES)

    def flush(self, node: str, batch: Batch, *, sync: bool, facts: dict[str, Any]) -> Flushed:
        """Apply a node's deltas (or, with `sync`, make its share its whole state) and beat."""
        status, version = self._flush(
            keys=[REVOKED_VERSION],
            args=[
                *self._common,
                node,
                "sync" if sync else "delta",
                json.dumps(batch.as_script_args(), separators=(",", ":")),
                json.dumps(facts, separators=(",", ":")),
            ],
        )
        return Flushed(_text(status) == "ok", _text(version))

    def admit(self, node: str, sub: str, cap: int) -> int:
        """Count one more connection of `sub` unless it has `cap`; 1, 0, or -1 (node unknown)."""
        return int(self._admit(args=[*self._common, node, sub, cap]))

    def stats(self, topic: str) -> tuple[int, int]:
        """Return (connections, users) subscribed to `topic` across live nodes."""
        clients, users = self._stats(args=[*self._common, topic])
        return int(clients), int(users)

    def members(self, topic: str) -> tuple[int, list[dict[str, Any]]]:
        """Return connections subscribed to `topic` and its users with their connections.

        The users come from a plain HGETALL after the stats script (which
        reaps first), in one round trip: returned through Lua, the same
        hash costs Redis twice the time (14 ms against 6 for 10,000 users).
        """
        args = [*self._common, topic]
        for attempt in (1, 2):
            pipe = self.client.pipeline(transaction=False)
            pipe.evalsha(self._stats.sha, 0, *args)
            pipe.hgetall(presence_key(topic))
            try:
                (clients, _), counts = pipe.execute()
                break
            except redis.exceptions.NoScriptError:
                if attempt == 2:
                    raise
                self._stats(args=args)  # loads the script (a restarted Redis lost it)
        users = [{"sub": _text(sub), "clients": int(n)} for sub, n in counts.items()]
        users.sort(key=lambda user: user["sub"])
        return int(clients), users

    def topics(self) -> dict[str, int]:
        """Return every topic with a subscriber, and its connections, across live nodes."""
        flat = self._topics(args=self._common)
        return {_text(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}

    def nodes(self) -> list[dict[str, str]]:
        """Return the live nodes' facts (as the nodes wrote them)."""
        flat = self._nodes(args=self._common)
        nodes = []
        for i in range(0, len(flat), 2):
            raw = flat[i + 1]
            facts = {_text(raw[j]): _text(raw[j + 1]) for j in range(0, len(raw), 2)}
            nodes.append({"node": _text(flat[i]), **facts})
        return nodes
