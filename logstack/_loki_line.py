"""The Loki line of an entry, rendered once: when its request is written to the WAL.

SPEC §7: the line is compact JSON of the masked entry's ``message``, ``metadata``,
``trace_id`` and ``span_id``. With ``loki.structured_metadata`` the two ids travel as Loki
structured metadata instead, and that setting may change (SIGHUP) between the write and the
push. So the WAL keeps the line without the ids (:class:`~logstack._wal_format.LineEntry`)
and delivery adds them to its end when the line must carry them (:func:`line_with_ids`):
the ids are the line's last fields, so the bytes are exactly what encoding the whole entry
gives (a property test holds the two equal).

Rendering at the write costs the request path ~0.3 µs per entry and saves delivery the
decode of each entry's message and metadata and their encoding as JSON: ~0.9 µs less to
read and deliver it (timed in a loop, ``docs/performance.md``).
"""

from __future__ import annotations

from typing import Any

import msgspec

from ._entry import LogEntry
from ._wal_format import LineBatch, LineEntry

_encoder = msgspec.json.Encoder()


class LokiLine(msgspec.Struct, omit_defaults=True, gc=False):
    """The Loki log line: compact JSON of the masked entry's content fields, in this order;
    absent ones are left out."""

    message: str
    metadata: dict[str, Any] | None = None
    trace_id: str | None = None
    span_id: str | None = None


def render_line(entry: LogEntry, *, with_ids: bool) -> bytes:
    """The entry's Loki line; ``with_ids`` puts its ``trace_id``/``span_id`` in it."""
    if with_ids:
        return _encoder.encode(
            LokiLine(entry.message, entry.metadata or None, entry.trace_id, entry.span_id)
        )
    return _encoder.encode(LokiLine(entry.message, entry.metadata or None))


def line_with_ids(line: bytes, trace_id: str | None, span_id: str | None) -> bytes:
    """``line`` (a line rendered without the ids) with ``trace_id`` and ``span_id`` added
    as its last fields, as :func:`render_line` with ``with_ids`` would have written them."""
    if trace_id is None and span_id is None:
        return line
    parts = [line[:-1]]  # the closing brace comes back after the ids
    if trace_id is not None:
        parts += (b',"trace_id":', _encoder.encode(trace_id))
    if span_id is not None:
        parts += (b',"span_id":', _encoder.encode(span_id))
    parts.append(b"}")
    return b"".join(parts)


def line_batch(request_id: str, received_ns: int, entries: list[LogEntry]) -> LineBatch:
    """The WAL record of an accepted request: its entries with their lines rendered."""
    encode = _encoder.encode  # render_line(entry, with_ids=False), inlined: it runs per entry
    return LineBatch(
        request_id,
        received_ns,
        [
            LineEntry(
                entry.timestamp_ns,
                entry.level,
                entry.service,
                entry.env,
                entry.labels,
                encode(LokiLine(entry.message, entry.metadata or None)),
                entry.trace_id,
                entry.span_id,
            )
            for entry in entries
        ],
    )
