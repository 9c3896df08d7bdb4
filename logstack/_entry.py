"""The validated, masked log entry: what the WAL stores and the forwarder ships.

``LogEntry`` is an ``array_like`` msgspec struct, so its field order is part of the on-disk
WAL format: append new fields at the end with defaults, never reorder (golden-bytes tests in
``tests/core/test_wal_format.py`` guard this).
"""

from __future__ import annotations

from typing import Any

import msgspec


class LogEntry(msgspec.Struct, array_like=True, omit_defaults=False, gc=False):
    timestamp_ns: int
    """Nanoseconds since the Unix epoch (UTC), parsed from the RFC 3339 timestamp."""
    level: str
    """Normalised level: TRACE DEBUG INFO WARN ERROR FATAL."""
    message: str
    service: str
    env: str
    labels: dict[str, str] = {}
    """Allowed extra stream labels (never service/env/level)."""
    trace_id: str | None = None
    span_id: str | None = None
    metadata: dict[str, Any] | None = None
    timestamp: str = ""
    """The timestamp exactly as the client sent it."""

    def stream_labels(self) -> dict[str, str]:
        """Loki stream labels: the allowed entry labels plus service, env, level (which win)."""
        labels = dict(self.labels)
        labels["service"] = self.service
        labels["env"] = self.env
        labels["level"] = self.level
        return labels
