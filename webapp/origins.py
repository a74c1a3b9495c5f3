"""Which browser origins may open a Socket.IO connection (TIDINGS_CORS_ORIGINS)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def _same_origin(environ: dict[str, Any]) -> set[str]:
    host = environ.get("HTTP_HOST")
    if not host:
        return set()
    origins = {f"{environ.get('wsgi.url_scheme', 'http')}://{host}"}
    # Behind a proxy that says how it was reached (nginx in deploy/ does).
    forwarded_host = environ.get("HTTP_X_FORWARDED_HOST", host).split(",")[0].strip()
    forwarded_proto = environ.get("HTTP_X_FORWARDED_PROTO", "").split(",")[0].strip()
    if forwarded_proto:
        origins.add(f"{forwarded_proto}://{forwarded_host}")
    return origins


def allowed_origins(configured: tuple[str, ...]) -> str | Callable[..., bool] | None:
    """Return python-engineio's `cors_allowed_origins` for the configured origins.

    Unset: same origin only. `*`: any origin. Otherwise the listed origins
    and always the same origin, so the dashboard keeps working when other
    sites are allowed too.
    """
    if not configured:
        return None
    if "*" in configured:
        return "*"
    listed = set(configured)

    def allowed(origin: str | None, environ: dict[str, Any]) -> bool:
        return origin in listed or origin in _same_origin(environ)

    return allowed
