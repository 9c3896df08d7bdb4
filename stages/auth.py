"""The ``auth`` stage: bearer-token authentication and per-key token-bucket rate limiting."""

from __future__ import annotations

import hashlib
import hmac
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from logstack._config import ApiKey, Settings
from logstack._context import AUTHENTICATE, RATE_LIMIT
from logstack._envelope import Envelope
from logstack._errors import AuthenticationError, RateLimitedError
from logstack._stage import Stage, StageConfig

UNKNOWN_OR_INACTIVE = "unknown or inactive API key"
MAX_RETRY_AFTER_S = 3600
"""The longest ``Retry-After`` a rate-limited request is told (an hour)."""


@dataclass(slots=True)
class TokenBucket:
    """Continuously refilled bucket; fractions of a token are kept between requests."""

    rate: float
    burst: float
    tokens: float
    updated: float

    def refill(self, now: float) -> None:
        """Add what accrued since the last update at the current rate (capped at burst)."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def take(self, now: float) -> float:
        """Take one token; return 0 if allowed, else the seconds until one is available."""
        self.refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate

    def give_back(self) -> None:
        """Return a token taken for a request the service then refused on its own account."""
        self.tokens = min(self.burst, self.tokens + 1.0)


class AuthStage(Stage):
    """Authenticate the bearer token in constant time and apply the key's rate limit."""

    Config = StageConfig

    def __init__(self, config: StageConfig, context: object) -> None:
        super().__init__(config, context)
        self.name = "auth"
        self._buckets: dict[str, TokenBucket] = {}
        self._keys: dict[bytes, tuple[bytes, ApiKey]] = {}
        self._clock = time.monotonic
        self.reload(self.context.settings)
        services = getattr(context, "services", None)
        if services is not None:  # the HTTP layer refuses a bad or busy key before the body
            services[AUTHENTICATE] = self.authenticate
            services[RATE_LIMIT] = self.take_token

    def reload(self, settings: Settings) -> None:
        # Look tokens up by their SHA-256 so the dict probe leaks nothing about the token,
        # then confirm with a constant-time comparison.
        self._keys = {
            hashlib.sha256(token.encode()).digest(): (token.encode(), key)
            for token, key in settings.security.api_keys.items()
        }
        self._default_rate = settings.security.rate_limit_rps
        self._default_burst = settings.security.rate_limit_burst
        names = {key.name for key in settings.security.api_keys.values()}
        for gone in set(self._buckets) - names:
            del self._buckets[gone]  # a removed key leaves no state behind
        for key in settings.security.api_keys.values():
            bucket = self._buckets.get(key.name)
            if bucket is not None:
                # Settle what accrued at the old rate before the new limits apply.
                bucket.refill(self._clock())
                bucket.rate, bucket.burst = self._limits(key)
                bucket.tokens = min(bucket.tokens, bucket.burst)

    def _limits(self, key: ApiKey) -> tuple[float, float]:
        return (
            key.rate_limit_rps or self._default_rate,
            key.rate_limit_burst or self._default_burst,
        )

    def authenticate(self, authorization: str | None) -> ApiKey:
        if not authorization:
            raise AuthenticationError(
                "missing Authorization header; send 'Authorization: Bearer <token>'",
                reason="missing_credentials",
            )
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or " " in token:
            raise AuthenticationError(
                "malformed Authorization header; expected 'Bearer <token>'",
                reason="malformed_credentials",
            )
        raw = token.encode()
        found = self._keys.get(hashlib.sha256(raw).digest())
        if found is None or not hmac.compare_digest(found[0], raw):
            raise AuthenticationError(UNKNOWN_OR_INACTIVE, reason="unknown_key")
        if not found[1].active:
            # The same answer as for an unknown key (an inactive key's own message told
            # whoever held a revoked token that it was once real); the metric's reason
            # still tells the operator which.
            raise AuthenticationError(UNKNOWN_OR_INACTIVE, reason="inactive_key")
        return found[1]

    def process(self, envelope: Envelope) -> None:
        key = self.authenticate(envelope.authorization)
        envelope.key = key
        if not envelope.rate_checked:
            self.take_token(key)

    def take_token(self, key: ApiKey) -> Callable[[], None]:
        """Take one request's token from ``key``'s bucket, or raise ``RateLimitedError``;
        returns what gives the token back."""
        bucket = self._buckets.get(key.name)
        now = self._clock()
        if bucket is None:
            rate, burst = self._limits(key)
            bucket = self._buckets[key.name] = TokenBucket(rate, burst, burst, now)
        wait = bucket.take(now)
        if wait > 0:
            self.context.metrics.rate_limited.labels(token=key.name).inc()
            raise RateLimitedError(
                f"rate limit of {bucket.rate:g} requests/s (burst {bucket.burst:g}) exceeded",
                # Capped: a very low rate makes ``wait`` huge, or infinite (a 500 then).
                retry_after=max(1, math.ceil(min(wait, MAX_RETRY_AFTER_S))),
                details={"rate_limit_rps": bucket.rate, "rate_limit_burst": bucket.burst},
            )
        return bucket.give_back
