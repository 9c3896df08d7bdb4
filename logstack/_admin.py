"""Admin endpoints (SPEC §3): admin-token authentication and the routes behind it.

The admin token is not an API key: without a token (or with an unknown one) the answer is
401, with a valid API key that is not the admin token it is 403.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import TYPE_CHECKING

from quart import request

from ._errors import AuthenticationError, ForbiddenError

if TYPE_CHECKING:
    from ._service import Service


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def require_admin(service: Service) -> None:
    """Raise ``AuthenticationError`` (401) or ``ForbiddenError`` (403) unless the request
    carries the admin token. Comparisons are constant-time on SHA-256 digests."""
    settings = service.context.settings
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationError(
            "admin endpoints need 'Authorization: Bearer <admin token>'",
            reason="missing_credentials",
        )
    presented = _digest(token)
    admin = settings.security.admin_token
    if admin is not None and hmac.compare_digest(presented, _digest(admin)):
        return
    for api_token in settings.security.api_keys:
        if hmac.compare_digest(presented, _digest(api_token)):
            raise ForbiddenError("this API key may ingest but not use admin endpoints")
    raise AuthenticationError("unknown admin token", reason="unknown_key")
