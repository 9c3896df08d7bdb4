"""Per-key dead-letter queue: pushes Loki refused for good, kept with the reason."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import msgspec

from ._delivery import PushBatch

DLQ_FILE = "dead-letters.jsonl"
_encoder = msgspec.json.Encoder()


def dead_letter(directory: Path, batch: PushBatch, reason: str, status: int | None) -> None:
    """Append ``batch`` to the key's DLQ file durably (write + fsync)."""
    record: dict[str, Any] = {
        "dead_lettered_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "reason": reason,
        "status": status,
        "entries": batch.entry_count,
        "streams": [
            {"stream": dict(labels), "values": [[str(ts), line] for ts, line in values]}
            for labels, values in batch.streams.items()
        ],
    }
    path = directory / DLQ_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, _encoder.encode(record) + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)


def read_dead_letters(directory: Path) -> list[dict[str, Any]]:
    path = directory / DLQ_FILE
    if not path.exists():
        return []
    out: list[dict[str, Any]] = []
    with path.open("rb") as handle:
        for line in handle:
            if line.strip():
                out.append(msgspec.json.decode(line))
    return out
