"""The API key (TIDINGS_API_KEY) that guards every `/api/*` route but the demo's."""

from __future__ import annotations

import hmac

from flask import request

from tidings.settings import Settings


def authorised(api_key: str) -> bool:
    """Tell whether the request carries `Authorization: Bearer <api_key>`."""
    header = request.headers.get("Authorization", "")
    scheme, _, presented = header.partition(" ")
    # Constant-time: the comparison must not leak how much of the key matched.
    return scheme.lower() == "bearer" and hmac.compare_digest(
        presented.strip().encode(), api_key.encode()
    )


def refusal(settings: Settings) -> tuple[dict, int] | None:
    """Return the answer to a request without the right key (403 while unset, 401), or None."""
    if settings.api_key is None:
        return {"ok": False, "error": "disabled", "detail": "set TIDINGS_API_KEY"}, 403
    if not authorised(settings.api_key):
        return {"ok": False, "error": "unauthorized"}, 401
    return None
