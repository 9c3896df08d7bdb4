"""``logstack wal inspect DIR``: segments, records, checkpoints and damage, read-only."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import TextIO

from ._wal import SEGMENT_SUFFIX
from ._wal_format import (
    ENTRY_RECORDS,
    HEADER_SIZE,
    Checkpoint,
    FrameScan,
    IdempotencyRecord,
    decode_header,
    decode_record,
    find_next_frame,
    header_torn_at_creation,
)
from ._workers import SHARD_PREFIX


def _when(ns: int) -> str:
    return dt.datetime.fromtimestamp(ns / 1e9, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _key_dirs(root: Path) -> list[Path]:
    """Key directories: ``root`` itself, its subdirectories, and those of its worker shards."""
    if any(p.suffix == SEGMENT_SUFFIX for p in root.iterdir()):
        return [root]
    found: list[Path] = []
    for path in sorted(p for p in root.iterdir() if p.is_dir()):
        if path.name.startswith(SHARD_PREFIX):
            found += sorted(p for p in path.iterdir() if p.is_dir())
        else:
            found.append(path)
    return found


def inspect_wal(directory: str, *, show_records: bool, out: TextIO) -> int:
    """Print a report; exit status 1 if any damage was found, 2 if DIR is not a WAL."""
    root = Path(directory)
    if not root.is_dir():
        print(f"logstack: {directory}: not a directory", file=out)
        return 2
    damaged = False
    key_dirs = _key_dirs(root)
    if not key_dirs:
        print(f"{directory}: no key has written to this WAL yet", file=out)
    for key_dir in key_dirs:
        named = sorted(p for p in key_dir.iterdir() if p.suffix == SEGMENT_SUFFIX)
        segments = [p for p in named if p.stem.isdigit()]  # as the server reads the directory
        name = key_dir.relative_to(root).as_posix() if key_dir != root else key_dir.name
        print(f"key {name}: {len(segments)} segment(s)", file=out)
        for path in named:
            if not path.stem.isdigit():
                print(f"  {path.name}: not a segment's name; the server ignores it", file=out)
        last_checkpoint: Checkpoint | None = None
        for path in segments:
            if not path.is_file():
                print(f"  {path.name}: BAD HEADER: not a file", file=out)
                damaged = True
                continue
            data = path.read_bytes()
            try:
                created = decode_header(data)
            except Exception as exc:
                if path == segments[-1] and header_torn_at_creation(data):
                    print(
                        f"  {path.name}: {len(data)} bytes, TORN: its header never reached the"
                        " disk (the process stopped as it was created); no records",
                        file=out,
                    )
                else:
                    print(f"  {path.name}: {len(data)} bytes, BAD HEADER: {exc}", file=out)
                damaged = True
                continue
            counts = {"entry_batches": 0, "entries": 0, "checkpoints": 0, "idempotency": 0}
            lines: list[str] = []  # printed below the segment's own line, not above it
            damage: list[str] = []
            offset = HEADER_SIZE
            while offset < len(data):
                scan = FrameScan(memoryview(data)[offset:], offset)
                for frame in scan:
                    try:
                        record = decode_record(frame.payload)
                    except Exception as exc:
                        lines.append(f"    @{frame.offset}: UNDECODABLE record: {exc}")
                        damaged = True
                        continue
                    if isinstance(record, ENTRY_RECORDS):
                        counts["entry_batches"] += 1
                        counts["entries"] += len(record.entries)
                        if show_records:
                            lines.append(
                                f"    @{frame.offset}: entries x{len(record.entries)} "
                                f"request={record.request_id} at {_when(record.received_ns)}"
                            )
                    elif isinstance(record, Checkpoint):
                        counts["checkpoints"] += 1
                        last_checkpoint = record
                        if show_records:
                            lines.append(
                                f"    @{frame.offset}: checkpoint delivered<({record.segment}, "
                                f"{record.offset}) at {_when(record.delivered_ns)}"
                            )
                    elif isinstance(record, IdempotencyRecord):
                        counts["idempotency"] += 1
                        if show_records:
                            lines.append(
                                f"    @{frame.offset}: idempotency {record.key_hash} -> "
                                f"{record.request_id}"
                            )
                if scan.stop >= len(data):
                    break
                found = find_next_frame(data[scan.stop :], 1)
                if found is None:
                    kind = "torn tail" if scan.torn else "corrupt tail"
                    damage.append(
                        f"    DAMAGE: {kind} at offset {scan.stop} ({len(data) - scan.stop} "
                        "bytes unreadable; the server truncates it on start)"
                    )
                    break
                damage.append(
                    f"    DAMAGE: corrupt frame at offset {scan.stop} ({found} bytes skipped; "
                    "the records after it are intact)"
                )
                offset = scan.stop + found
            summary = ", ".join(f"{v} {k}" for k, v in counts.items())
            print(
                f"  {path.name}: {len(data)} bytes, created {_when(created)}: {summary}", file=out
            )
            for line in lines + damage:
                print(line, file=out)
            damaged = damaged or bool(damage)
        if last_checkpoint is not None:
            print(
                f"  delivered up to segment {last_checkpoint.segment} offset "
                f"{last_checkpoint.offset}",
                file=out,
            )
        else:
            print("  no delivery checkpoint: delivery starts at the oldest segment", file=out)
        quarantine = key_dir / "quarantine"
        if quarantine.is_dir():
            items = sorted(quarantine.iterdir())
            print(f"  quarantine: {len(items)} file(s)", file=out)
    return 1 if damaged else 0
