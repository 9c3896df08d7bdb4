"""The exception hierarchy: everything LogStack raises on purpose is a ``LogstackError``.

``RejectError`` subclasses carry the HTTP answer a rejected ingest request gets
(SPEC §3.2): status, machine-readable code, human message, details and, where the
client should come back later, ``retry_after`` in whole seconds.
"""

from __future__ import annotations

from typing import Any, ClassVar


class LogstackError(Exception):
    """Base class of every error LogStack raises deliberately."""


class ConfigError(LogstackError):
    """Invalid configuration; ``problems`` lists every problem as ``path: message``."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems))


class PluginError(ConfigError):
    """A stage plugin could not be found, loaded or configured."""


class WalError(LogstackError):
    """The write-ahead log could not be written or read."""


class WalCorruptionError(WalError):
    """A WAL segment holds bytes that are not a valid frame."""


class RejectError(LogstackError):
    """An ingest request is refused; the HTTP layer turns this into the error answer."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        details: dict[str, Any] | None = None,
        retry_after: int | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or {}
        self.retry_after = retry_after
        # Label for logs_rejected_total{reason}; defaults to the error code.
        self.reason = reason or self.code

    def headers(self) -> dict[str, str]:
        if self.retry_after is None:
            return {}
        return {"Retry-After": str(max(1, int(self.retry_after)))}

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, "details": self.details}


class AuthenticationError(RejectError):
    status = 401
    code = "authentication_error"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="logstack"'}


class ForbiddenError(RejectError):
    status = 403
    code = "forbidden"


class ValidationError(RejectError):
    status = 400
    code = "validation_error"


class PayloadTooLargeError(RejectError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaTypeError(RejectError):
    status = 415
    code = "unsupported_media_type"


class IdempotencyKeyReusedError(RejectError):
    """``X-Idempotency-Key`` again within its window, with other entries than the request
    accepted under it (a client reusing keys): answering the first request's ``202`` would
    tell the client that entries never stored were accepted."""

    status = 422
    code = "idempotency_key_reused"


class RateLimitedError(RejectError):
    status = 429
    code = "rate_limit_exceeded"


class QuotaExceededError(RejectError):
    status = 429
    code = "quota_exceeded"


class UnavailableError(RejectError):
    status = 503
    code = "unavailable"


class InternalError(RejectError):
    status = 500
    code = "internal_error"
