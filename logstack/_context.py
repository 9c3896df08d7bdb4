"""What every stage can reach: the current settings, the metrics, and shared services."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import trio

from ._config import Settings
from ._metrics import Metrics


@dataclass(eq=False)
class HealthState:
    """Facts the readiness check reports, updated by the stages that learn them."""

    forwarder_running: bool = False
    loki_last_ok: float | None = None
    """``time.monotonic()`` of the last push Loki took (2xx, or a 400 about some entries)
    or ``/ready`` probe answered 200."""
    loki_failing_since: float | None = None
    """``time.monotonic()`` of the first push not taken since the last one taken: a
    ``/ready`` that answers 200 does not make a Loki that refuses every push ready."""
    loki_last_failure: float | None = None
    """``time.monotonic()`` of the last push not taken."""
    loki_push_error: str | None = None
    """Why the last push not taken was not (``loki_last_error`` may be a probe's since)."""
    loki_last_error: str | None = None
    wal_writable: bool = True
    wal_last_error: str | None = None
    wal_failing: dict[str, str] = field(default_factory=dict)
    """Keys (by name) whose WAL refused a write, with the error. ``wal_writable`` stays
    false until each of them takes a write again: a probe of the WAL root, or another
    key's fsync, cleared it while one key's directory still refused every write."""

    def wal_failed(self, key: str, error: str) -> None:
        """``key``'s WAL refused a write."""
        self.wal_failing[key] = error
        self.wal_writable = False
        self.wal_last_error = error

    def wal_recovered(self, keys: Iterable[str]) -> bool:
        """``keys`` took writes again; returns whether the whole WAL is writable now."""
        for key in keys:
            self.wal_failing.pop(key, None)
        if self.wal_failing:
            self.wal_last_error = next(iter(self.wal_failing.values()))
            return False
        recovered = not self.wal_writable
        self.wal_writable = True
        self.wal_last_error = None
        return recovered


AUTHENTICATE: Final = "authenticate"
"""``services[AUTHENTICATE]``: the ``auth`` stage's check of an ``Authorization`` header
(returns the key or raises ``AuthenticationError``), which the ingest route applies to the
headers before it reads a body."""

RATE_LIMIT: Final = "rate_limit"
"""``services[RATE_LIMIT]``: the ``auth`` stage's rate limit (takes a token from the key's
bucket and returns what gives it back, or raises ``RateLimitedError``), which the ingest
route applies once the headers passed, before it reads the body, and undoes for a request
the service itself then refuses before the pipeline (503: the body budget or the pipeline
full, shutting down: under overload those 503s burned the tokens, and the key got 429s for
requests the pipeline could have taken; the overload scenario accepted a third as much).
A refusal for the client's own fault (413, 408, gone) keeps the token.
A key over its rate holds no body memory and takes no
pipeline step, so a flooding key's bodies no longer fill the budget other keys' requests
need (beside such a flood a modest key had a quarter to half of its requests refused 503;
``benchmarks/rate_limit_flood.py``). The envelope then says ``rate_checked``, and ``auth``
does not take a second token."""


@dataclass(eq=False)
class StageContext:
    """Handed to every stage at construction. ``settings`` is replaced on SIGHUP reload."""

    settings: Settings
    metrics: Metrics = field(default_factory=Metrics)
    health: HealthState = field(default_factory=HealthState)
    shutdown: trio.Event = field(default_factory=trio.Event)
    """Set when the service starts to stop; long waits (retry backoff) give up on it."""
    services: dict[str, Any] = field(default_factory=dict)
    """Shared resources opened by the runtime (``"wal"``: the ``WalStore``)."""
    requests_in_flight: int = 0
    """HTTP requests being served right now (kept by the runtime). Background work that
    runs in steps (the batcher) yields more often while there are any."""
