"""The listener lease: one holder at a time, renewed, released, visible."""

from __future__ import annotations

import json
import os
import socket
import uuid
from dataclasses import dataclass

import redis

from tidings.keys import LEASE_KEY

# Compare-and-act scripts: only the token's owner may extend or delete.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


@dataclass(frozen=True)
class Holder:
    """Who holds the lease, since when (ms), and for how much longer."""

    host: str
    pid: int
    since_ms: int
    ttl_ms: int


class Lease:
    """A Redis lease (SET NX PX with a random token) held by one process.

    `key` is the listener's lease unless told otherwise (the webhook
    delivery task holds one of its own).
    """

    def __init__(
        self, client: redis.Redis, ttl_ms: int, *, since_ms: int, key: str = LEASE_KEY
    ) -> None:
        self._client = client
        self.ttl_ms = ttl_ms
        self.key = key
        # The value is the token: unique per holder, and readable by operators.
        self.token = json.dumps(
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "since": since_ms,
                "id": uuid.uuid4().hex,
            },
            separators=(",", ":"),
        )
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    def acquire(self) -> bool:
        """Take the lease if nobody holds it; True when it is ours."""
        return bool(self._client.set(self.key, self.token, nx=True, px=self.ttl_ms))

    def renew(self) -> bool:
        """Extend the lease if it is still ours; False when it was lost."""
        return bool(self._renew(keys=[self.key], args=[self.token, self.ttl_ms]))

    def release(self) -> bool:
        """Give the lease up if it is still ours, so a successor starts at once."""
        return bool(self._release(keys=[self.key], args=[self.token]))


def current_holder(client: redis.Redis) -> Holder | None:
    """Return the lease holder, or None when nobody holds it."""
    pipe = client.pipeline(transaction=False)
    pipe.get(LEASE_KEY)
    pipe.pttl(LEASE_KEY)
    raw, ttl = pipe.execute()
    if raw is None:
        return None
    try:
        value = json.loads(raw)
        return Holder(str(value["host"]), int(value["pid"]), int(value["since"]), int(ttl))
    except (ValueError, KeyError, TypeError):
        return Holder("?", 0, 0, int(ttl))
