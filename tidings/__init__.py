"""Tidings: Redis publications pushed to browsers over Socket.IO (framework-free core)."""

from __future__ import annotations

from typing import Any

__all__ = ["publish", "publish_many"]


def __getattr__(name: str) -> Any:
    # Lazy, so that importing tidings.settings (gunicorn.conf.py does, in the
    # master) does not import redis and ssl before gevent patches the worker.
    if name in __all__:
        from tidings import publishing as module

        return getattr(module, name)
    raise AttributeError(name)
