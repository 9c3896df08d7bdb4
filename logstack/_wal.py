"""Per-key write-ahead logs: segment files, group-commit fsync, delivery checkpoints.

Layout: ``<root>/<key name>/<seq:016d>.seg``. Writers append framed records with
``os.write`` on the trio thread (page cache, cheap) and ``fdatasync`` in a worker thread;
callers await ``sync`` once for many appends (group commit). Readers (the batcher) follow
the log by position ``(segment seq, offset)`` up to what is already durable, so delivery
reads from the page cache while it keeps up and from disk when it falls behind; memory
never grows with the backlog.

Delivery progress is itself a record (``Checkpoint``) in the same log: state after a
restart is whatever replaying the log gives.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import trio

from ._errors import WalError
from ._metrics import Metrics
from ._wal_format import (
    FRAME_OVERHEAD,
    HEADER_SIZE,
    Checkpoint,
    EntryBatch,
    FrameScan,
    IdempotencyRecord,
    Record,
    decode_header,
    decode_record,
    encode_frame,
    encode_header,
    frame_bytes,
)

log = logging.getLogger("logstack.wal")

SEGMENT_SUFFIX = ".seg"
Position = tuple[int, int]
"""(segment sequence number, byte offset within that segment)."""


def segment_name(seq: int) -> str:
    return f"{seq:016d}{SEGMENT_SUFFIX}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(eq=False)
class Segment:
    seq: int
    path: Path
    size: int
    created_ns: int
    sealed: bool = False

    def __repr__(self) -> str:
        state = "sealed" if self.sealed else "active"
        return f"<Segment {self.seq} {state} {self.size}B>"


@dataclass(frozen=True, slots=True)
class ReadResult:
    batches: list[EntryBatch]
    end: Position
    """Position just past the last record returned (or skipped)."""
    payload_bytes: int = 0
    """Encoded size of the returned batches."""


@dataclass(eq=False)
class KeyLog:
    """The log of one API key. All methods run on the trio thread except the fsync."""

    name: str
    directory: Path
    segment_max_bytes: int
    metrics: Metrics
    segments: list[Segment] = field(default_factory=list)
    delivered: Position = (0, HEADER_SIZE)
    synced_end: Position = (0, HEADER_SIZE)
    idempotency: dict[str, tuple[str, int, int]] = field(default_factory=dict)
    last_write: float = field(default_factory=time.monotonic)
    _fd: int | None = None
    _dirty: bool = False
    _changed: trio.Event = field(default_factory=trio.Event)
    _read_fds: dict[int, int] = field(default_factory=dict)

    # ----------------------------------------------------------------- writing
    @property
    def active(self) -> Segment:
        return self.segments[-1]

    @property
    def disk_bytes(self) -> int:
        return sum(s.size for s in self.segments)

    def _open_new_segment(self) -> None:
        seq = self.segments[-1].seq + 1 if self.segments else 1
        path = self.directory / segment_name(seq)
        created = time.time_ns()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        os.write(fd, encode_header(created))
        self._fd = fd
        self.segments.append(Segment(seq, path, HEADER_SIZE, created))
        self._dirty = True
        _fsync_dir(self.directory)
        self._update_gauges()

    def _open_existing_active(self) -> None:
        self._fd = os.open(self.active.path, os.O_WRONLY | os.O_APPEND)

    def append(self, records: Iterable[Record]) -> Position:
        """Frame and write ``records`` (not yet durable: call ``sync``). Returns the end."""
        buffer = bytearray()
        for record in records:
            encode_frame(record, buffer)
        return self.append_bytes(buffer)

    def append_bytes(self, framed: bytes | bytearray) -> Position:
        if self._fd is None:
            self._open_new_segment()
        elif (
            self.active.size + len(framed) > self.segment_max_bytes
            and self.active.size > HEADER_SIZE
        ):
            self.rotate("size")
        assert self._fd is not None
        try:
            written = os.write(self._fd, framed)
        except OSError as exc:
            raise WalError(f"cannot write WAL segment of {self.name}: {exc.strerror}") from exc
        if written != len(framed):
            raise WalError(f"short write to WAL segment of {self.name}")
        self.active.size += written
        self._dirty = True
        self.last_write = time.monotonic()
        return (self.active.seq, self.active.size)

    async def sync(self) -> None:
        """Make every append so far durable (``fdatasync`` off the trio thread)."""
        if not self._dirty or self._fd is None:
            return
        fd, end = self._fd, (self.active.seq, self.active.size)
        self._dirty = False
        try:
            await trio.to_thread.run_sync(os.fdatasync, fd)
        except OSError as exc:
            self._dirty = True
            raise WalError(f"fsync of WAL segment of {self.name} failed: {exc.strerror}") from exc
        if end > self.synced_end:
            self.synced_end = end
            self._notify()
        self._update_gauges()

    def sync_blocking(self) -> None:
        if self._dirty and self._fd is not None:
            os.fdatasync(self._fd)
            self._dirty = False
            self.synced_end = (self.active.seq, self.active.size)

    def rotate(self, reason: str) -> None:
        """Seal the active segment and start a new one carrying the current checkpoint."""
        if self._fd is not None:
            os.fdatasync(self._fd)
            os.close(self._fd)
            self._fd = None
            self.active.sealed = True
            # Everything in the sealed segment is durable now.
            self.synced_end = max(self.synced_end, (self.active.seq, self.active.size))
        self._open_new_segment()
        self.append_bytes(frame_bytes(Checkpoint(*self.delivered, time.time_ns())))
        self.metrics.segment_rotations.labels(token=self.name, reason=reason).inc()
        self._notify()

    # ---------------------------------------------------------------- delivery
    async def commit_delivered(self, position: Position) -> None:
        """Record that everything before ``position`` reached Loki (or the DLQ), durably,
        then delete sealed segments that are fully delivered."""
        if position <= self.delivered:
            return
        self.delivered = position
        self.append([Checkpoint(position[0], position[1], time.time_ns())])
        await self.sync()
        while (
            len(self.segments) > 1
            and self.segments[0].sealed
            and self.segments[0].seq < position[0]
        ):
            done = self.segments.pop(0)
            fd = self._read_fds.pop(done.seq, None)
            if fd is not None:
                os.close(fd)
            done.path.unlink(missing_ok=True)
            log.debug("deleted delivered segment", extra={"token": self.name, "segment": done.seq})
        self._update_gauges()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        await self._changed.wait()

    def has_unread(self, position: Position) -> bool:
        return position < self.synced_end and self._normalise(position) < self.synced_end

    def _normalise(self, position: Position) -> Position:
        """Move a position sitting at the end of a sealed segment to the next segment."""
        seq, offset = position
        for index, segment in enumerate(self.segments):
            if segment.seq < seq:
                continue
            if segment.seq > seq:
                return (segment.seq, HEADER_SIZE)
            if offset >= segment.size and segment.sealed and index + 1 < len(self.segments):
                seq, offset = self.segments[index + 1].seq, HEADER_SIZE
                continue
            return (seq, offset)
        return position

    def _read_fd(self, segment: Segment) -> int:
        fd = self._read_fds.get(segment.seq)
        if fd is None:
            fd = os.open(segment.path, os.O_RDONLY)
            self._read_fds[segment.seq] = fd
        return fd

    def read(
        self, position: Position, max_entries: int, max_bytes: int, *, at_least_one: bool = True
    ) -> ReadResult:
        """Entry batches from ``position`` up to the durable end, within the limits.

        With ``at_least_one`` the first available batch is returned even if it alone exceeds
        the limits, so one oversized record cannot stall delivery. Checkpoints and
        idempotency records are skipped over.
        """
        batches: list[EntryBatch] = []
        entries = used = 0
        position = self._normalise(position)
        while position < self.synced_end and entries < max_entries and used < max_bytes:
            segment = next((s for s in self.segments if s.seq == position[0]), None)
            if segment is None:
                break
            limit = self.synced_end[1] if segment.seq == self.synced_end[0] else segment.size
            if position[1] >= limit:
                if segment.seq == self.synced_end[0]:
                    break
                position = self._normalise((segment.seq, segment.size))
                continue
            fd = self._read_fd(segment)
            want = min(limit - position[1], max_bytes - used + FRAME_OVERHEAD)
            first = os.pread(fd, FRAME_OVERHEAD, position[1])
            if len(first) == FRAME_OVERHEAD:
                want = max(want, FRAME_OVERHEAD + int.from_bytes(first[:4], "little"))
            data = os.pread(fd, min(want, limit - position[1]), position[1])
            scan = FrameScan(data, position[1])
            progressed = full = False
            for frame in scan:
                record = decode_record(frame.payload)
                if isinstance(record, EntryBatch):
                    n = len(record.entries)
                    over = entries + n > max_entries or used + len(frame.payload) > max_bytes
                    if over and (batches or not at_least_one):
                        full = True
                        break
                    batches.append(record)
                    entries += n
                    used += len(frame.payload)
                position = (segment.seq, frame.end)
                progressed = True
            if full:
                break
            if not progressed and (scan.corrupt or scan.torn):
                # Durable bytes that do not frame: count, log, skip to the end of them.
                self.metrics.wal_corrupt_records.labels(token=self.name, kind="unreadable").inc()
                log.error(
                    "skipping unreadable WAL bytes",
                    extra={"token": self.name, "segment": segment.seq, "offset": position[1]},
                )
                position = (segment.seq, limit)
        return ReadResult(batches, position, used)

    # ---------------------------------------------------------------- lifecycle
    def _update_gauges(self) -> None:
        self.metrics.wal_segments_active.labels(token=self.name).set(len(self.segments))
        self.metrics.wal_disk_usage.labels(token=self.name).set(self.disk_bytes)

    def oldest_undelivered_ns(self) -> int | None:
        for segment in self.segments:
            if (segment.seq, segment.size) > self.delivered and segment.size > HEADER_SIZE:
                return segment.created_ns
        return None

    def close(self) -> None:
        if self._fd is not None:
            try:
                os.fdatasync(self._fd)
            finally:
                os.close(self._fd)
                self._fd = None
        for fd in self._read_fds.values():
            os.close(fd)
        self._read_fds.clear()

    def __repr__(self) -> str:
        return (
            f"<KeyLog {self.name} segments={len(self.segments)} bytes={self.disk_bytes} "
            f"delivered={self.delivered} synced_end={self.synced_end}>"
        )


def recover_key_log(name: str, directory: Path, segment_max_bytes: int, metrics: Metrics) -> KeyLog:
    """Open the log of one key from disk: torn tails are truncated, progress replayed."""
    keylog = KeyLog(name, directory, segment_max_bytes, metrics)
    paths = sorted(
        p for p in directory.iterdir() if p.suffix == SEGMENT_SUFFIX and p.stem.isdigit()
    )
    checkpoint: Checkpoint | None = None
    quarantine = directory / "quarantine"
    for path in paths:
        seq = int(path.stem)
        data = path.read_bytes()
        try:
            created = decode_header(data)
        except Exception as exc:
            quarantine.mkdir(exist_ok=True)
            shutil.move(str(path), quarantine / path.name)
            metrics.wal_corrupt_records.labels(token=name, kind="bad_header").inc()
            log.error(
                "quarantined WAL segment with a bad header",
                extra={"token": name, "segment": seq, "error": str(exc)},
            )
            continue
        scan = FrameScan(memoryview(data)[HEADER_SIZE:], HEADER_SIZE)
        for frame in scan:
            try:
                record = decode_record(frame.payload)
            except Exception:
                metrics.wal_corrupt_records.labels(token=name, kind="undecodable").inc()
                continue
            if isinstance(record, Checkpoint):
                checkpoint = record
            elif isinstance(record, IdempotencyRecord):
                keylog.idempotency[record.key_hash] = (
                    record.request_id,
                    record.entries_accepted,
                    record.accepted_ns,
                )
        size = len(data)
        if scan.stop < size:
            # Torn or corrupt tail: keep the bad bytes aside, truncate, never crash-loop.
            quarantine.mkdir(exist_ok=True)
            (quarantine / f"{path.stem}-{scan.stop}.bin").write_bytes(data[scan.stop :])
            kind = "torn_tail" if scan.torn else "corrupt_tail"
            metrics.wal_corrupt_records.labels(token=name, kind=kind).inc()
            log.warning(
                "truncated damaged WAL tail",
                extra={
                    "token": name,
                    "segment": seq,
                    "offset": scan.stop,
                    "bytes": size - scan.stop,
                    "kind": kind,
                },
            )
            with open(path, "r+b") as handle:
                handle.truncate(scan.stop)
                handle.flush()
                os.fsync(handle.fileno())
            size = scan.stop
        keylog.segments.append(Segment(seq, path, size, created, sealed=True))
    if keylog.segments:
        first = keylog.segments[0]
        start: Position = (first.seq, HEADER_SIZE)
        if checkpoint is not None and (checkpoint.segment, checkpoint.offset) > start:
            start = (checkpoint.segment, checkpoint.offset)
        keylog.delivered = start
        last = keylog.segments[-1]
        keylog.synced_end = (last.seq, last.size)
        # Keep appending to the last segment: it was not rotated, just closed by the crash.
        last.sealed = False
        keylog._open_existing_active()
    keylog._update_gauges()
    return keylog


class WalStore:
    """All key logs under one root directory, opened lazily per key name."""

    def __init__(self, root: Path, segment_max_bytes: int, metrics: Metrics) -> None:
        self.root = root
        self.segment_max_bytes = segment_max_bytes
        self.metrics = metrics
        self.logs: dict[str, KeyLog] = {}
        self._opened = trio.Event()
        self.new_log = trio.Event()

    def open(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for directory in sorted(p for p in self.root.iterdir() if p.is_dir()):
            self.logs[directory.name] = recover_key_log(
                directory.name, directory, self.segment_max_bytes, self.metrics
            )

    def log_for(self, name: str) -> KeyLog:
        keylog = self.logs.get(name)
        if keylog is None:
            directory = self.root / name
            directory.mkdir(parents=True, exist_ok=True)
            _fsync_dir(self.root)
            keylog = KeyLog(name, directory, self.segment_max_bytes, self.metrics)
            keylog._update_gauges()
            self.logs[name] = keylog
            self.new_log.set()
            self.new_log = trio.Event()
        return keylog

    def close(self) -> None:
        for keylog in self.logs.values():
            keylog.close()

    def __repr__(self) -> str:
        return f"<WalStore {self.root} keys={len(self.logs)}>"
