"""The address a web request's client is counted and logged under (TIDINGS_TRUSTED_PROXIES).

The rules are tidings/addresses.py's; this applies them to a WSGI environ and
counts the requests whose `X-Forwarded-For` was ignored because their peer is
not trusted, which `flask --app webapp doctor` reports: usually a proxy that
TIDINGS_TRUSTED_PROXIES should list.
"""

from __future__ import annotations

from typing import Any

from tidings import metrics
from tidings.addresses import UNKNOWN, resolve
from tidings.settings import Settings


def client_address(environ: dict[str, Any], settings: Settings) -> str:
    """Return the request's client address: its peer, or whom trusted proxies name."""
    peer = environ.get("REMOTE_ADDR")
    resolved = resolve(peer, environ.get("HTTP_X_FORWARDED_FOR"), settings.trusted_proxies)
    if resolved.ignored_header:
        metrics.untrusted_forwarded(peer or UNKNOWN)
    return resolved.address
