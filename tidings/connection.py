"""Redis connections that say who they are (CLIENT SETNAME) and fail fast."""

from __future__ import annotations

import os
import socket

import redis

# A Redis that does not answer within this many seconds is treated as down:
# callers back off and retry instead of hanging a loop that must stay live.
SOCKET_TIMEOUT = 5.0


def client_name(role: str) -> str:
    """Return the CLIENT SETNAME value for this process: tidings:<role>:<host>:<pid>."""
    host = socket.gethostname().replace(" ", "_")
    return f"tidings:{role}:{host}:{os.getpid()}"


def connect(url: str, role: str, **options: object) -> redis.Redis:
    """Return a Redis client whose connections carry this process's name."""
    options.setdefault("socket_timeout", SOCKET_TIMEOUT)
    options.setdefault("socket_connect_timeout", SOCKET_TIMEOUT)
    options.setdefault("health_check_interval", 10)
    return redis.Redis.from_url(url, client_name=client_name(role), **options)
