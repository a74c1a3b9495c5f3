"""Operator commands to every web node, on the pub/sub channel `tidings:control`.

A command is one JSON object `{"op", ..., "reply"}`: `disconnect` (`subs`),
`unsubscribe` (`pairs` of [sub, topic]) or `revoke` (nothing more: nodes
reload the revocations and close what they now refuse). Each node that hears
it acts on its own connections and pushes how many it touched to the list
named by `reply`; the sender knows how many nodes heard it (PUBLISH answers
the receiver count) and waits for that many answers, up to a deadline.

Pub/sub is at most once: a node that is not subscribed at that moment (its
Redis connection is down) misses the command, and the answer says so
(`answered` < `nodes`). Revocations are not lost that way: nodes also reload
them when their version moves.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

import redis

from tidings.keys import CONTROL_CHANNEL, REPLY_PREFIX
from tidings.revocation import valid_sub
from tidings.topics import is_valid_topic

OPS = ("disconnect", "unsubscribe", "revoke")
# The contract: a disconnect or unsubscribe reaches every node within 2 s.
DEFAULT_TIMEOUT = 2.0
# Answers outlive a sender that gave up waiting by this long, then vanish.
REPLY_TTL_MS = 10_000


@dataclass(frozen=True)
class Answer:
    """What the nodes answered to a command."""

    count: int  # connections touched, summed over the nodes that answered
    nodes: int  # nodes that heard the command
    answered: int  # nodes that answered before the deadline


def send(
    client: redis.Redis, op: str, body: dict[str, Any], timeout: float = DEFAULT_TIMEOUT
) -> Answer:
    """Publish a command to every web node and collect their answers until `timeout`."""
    reply = REPLY_PREFIX + uuid.uuid4().hex
    message = json.dumps({"op": op, **body, "reply": reply}, separators=(",", ":"))
    nodes = int(client.publish(CONTROL_CHANNEL, message))
    count = answered = 0
    deadline = time.monotonic() + timeout
    try:
        while answered < nodes:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            # BLPOP takes a timeout of 0 as "forever": never ask for less than 10 ms.
            item = client.blpop([reply], timeout=max(left, 0.01))
            if item is None:
                break
            answered += 1
            try:
                count += int(item[1])
            except ValueError:
                continue
    finally:
        client.delete(reply)
    return Answer(count, nodes, answered)


def answer(client: redis.Redis, reply: str, count: int) -> None:
    """Tell the sender of a command how many connections this node touched."""
    pipe = client.pipeline(transaction=False)
    pipe.rpush(reply, count)
    pipe.pexpire(reply, REPLY_TTL_MS)
    pipe.execute()


def parse(raw: bytes | str) -> dict[str, Any] | None:
    """Return a well-formed command, or None (anything else on the channel is ignored)."""
    try:
        command = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(command, dict) or command.get("op") not in OPS:
        return None
    reply = command.get("reply")
    if not isinstance(reply, str) or not reply.startswith(REPLY_PREFIX):
        return None
    op = command["op"]
    if op == "disconnect":
        subs = command.get("subs")
        if not isinstance(subs, list) or not all(valid_sub(s) for s in subs):
            return None
    elif op == "unsubscribe":
        pairs = command.get("pairs")
        if not isinstance(pairs, list) or not all(
            isinstance(p, list) and len(p) == 2 and valid_sub(p[0]) and is_valid_topic(p[1])
            for p in pairs
        ):
            return None
    return command
