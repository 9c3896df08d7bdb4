"""What flows through the delivery half: a push batch cut from one key's WAL range."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
import trio

from ._entry import LogEntry
from ._wal import Position
from ._wal_format import EntryBatch

_line_encoder = msgspec.json.Encoder()


def entry_line(entry: LogEntry) -> str:
    """The Loki log line: compact JSON of the masked entry's content fields."""
    doc: dict[str, Any] = {"message": entry.message}
    if entry.metadata:
        doc["metadata"] = entry.metadata
    if entry.trace_id is not None:
        doc["trace_id"] = entry.trace_id
    if entry.span_id is not None:
        doc["span_id"] = entry.span_id
    return _line_encoder.encode(doc).decode()


def stream_key(entry: LogEntry) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(entry.stream_labels().items()))


@dataclass(eq=False)
class PushBatch:
    """Entries of one key's WAL range ``[start, end)``, grouped into Loki streams.

    The batcher sends it to the forwarder and waits on ``done``; the forwarder sets it
    once the range is delivered (or dead-lettered) and the checkpoint is durable.
    """

    key_name: str
    tenant: str | None
    start: Position
    end: Position
    streams: dict[tuple[tuple[str, str], ...], list[tuple[int, str]]]
    entry_count: int
    oldest_received_ns: int
    done: trio.Event = field(default_factory=trio.Event)
    created: float = field(default_factory=time.monotonic)

    @classmethod
    def from_wal(
        cls,
        key_name: str,
        tenant: str | None,
        start: Position,
        end: Position,
        batches: list[EntryBatch],
    ) -> PushBatch:
        streams: dict[tuple[tuple[str, str], ...], list[tuple[int, str]]] = {}
        count = 0
        for batch in batches:
            for entry in batch.entries:
                streams.setdefault(stream_key(entry), []).append(
                    (entry.timestamp_ns, entry_line(entry))
                )
                count += 1
        oldest = batches[0].received_ns if batches else time.time_ns()
        return cls(key_name, tenant, start, end, streams, count, oldest)

    def __repr__(self) -> str:
        return (
            f"<PushBatch {self.key_name} {self.start}->{self.end} streams={len(self.streams)} "
            f"entries={self.entry_count} done={self.done.is_set()}>"
        )
