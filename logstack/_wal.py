"""Per-key write-ahead logs: segment files, group-commit fsync, delivery checkpoints.

Layout: ``<root>/<key name>/<seq:016d>.seg``. Writers append framed records with
``os.write`` on the trio thread (page cache, cheap) and ``fdatasync`` in a worker thread;
callers await ``sync`` once for many appends (group commit). Readers (the batcher) follow
the log by position ``(segment seq, offset)`` up to what is already durable, so delivery
reads from the page cache while it keeps up and from disk when it falls behind; memory
never grows with the backlog.

Delivery progress is itself a record (``Checkpoint``) in the same log: state after a
restart is whatever replaying the log gives. Every rotation starts the new segment with
the live idempotency records and the current checkpoint, so recovery only has to scan the
newest segment(s), not the whole backlog: start-up takes seconds with gigabytes queued.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import trio

from ._errors import WalCorruptionError, WalError
from ._metrics import Metrics
from ._wal_format import (
    ENTRY_RECORDS,
    FRAME_OVERHEAD,
    HEADER_SIZE,
    MAGIC,
    MAX_RECORD_BYTES,
    Checkpoint,
    EntryRecord,
    FrameScan,
    IdempotencyRecord,
    Record,
    decode_header,
    decode_record,
    encode_frame,
    encode_header,
    find_next_frame,
    header_torn_at_creation,
)

log = logging.getLogger("logstack.wal")

PRIVATE_DIR_MODE: Final = 0o700
"""Directories the WAL creates (its root, key directories, ``quarantine/``): they hold the
masked log lines, in files created 0600; other local users could list keys and sizes."""

SEGMENT_SUFFIX = ".seg"
IDEMPOTENCY_WINDOW_NS = 15 * 60 * 10**9
RESYNC_CHUNK = 4 * 1024 * 1024
READ_CHUNK = 128 * 1024
"""Bytes ``read`` copies from a segment at a time (more if one record is larger). Delivery
reads a few records per step; reading up to its byte limit (1 MiB by default) each time
copied some twenty times what the step used."""
Position = tuple[int, int]
IdempotencySeen = tuple[str, int, int, str]
"""A request accepted under an idempotency key: its request id, entries accepted, when
(``time.time_ns``), and the digest of its masked entries (``""`` if not known)."""
"""(segment sequence number, byte offset within that segment)."""
Clock = Callable[[], float]


def segment_name(seq: int) -> str:
    return f"{seq:016d}{SEGMENT_SUFFIX}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fdatasync_all(fds: list[int]) -> None:
    for fd in fds:
        os.fdatasync(fd)


def _monotonic() -> float:
    return time.monotonic()


async def fsync_in_thread(fds: list[int]) -> None:
    """How key logs fsync by default: in a worker thread, so the trio loop keeps serving."""
    await trio.to_thread.run_sync(_fdatasync_all, fds)


FsyncRunner = Callable[[list[int]], Awaitable[None]]


@dataclass(eq=False)
class Segment:
    seq: int
    path: Path
    size: int
    created_ns: int
    sealed: bool = False
    opened_at: float = 0.0
    """When the segment was started, in the log's clock (for age rotation)."""
    content_start: int = HEADER_SIZE
    """Offset after the records carried over at rotation: below it there is no new data."""
    last_entry_end: int | None = None
    """End of the last entry batch in this segment (None: unknown, assume the whole file)."""

    @property
    def has_new_data(self) -> bool:
        return self.size > self.content_start

    def __repr__(self) -> str:
        state = "sealed" if self.sealed else "active"
        return f"<Segment {self.seq} {state} {self.size}B>"


@dataclass(frozen=True, slots=True)
class ReadResult:
    batches: list[EntryRecord]
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
    clock: Clock = _monotonic
    fsync_runner: FsyncRunner = fsync_in_thread
    """Replaced only by timer tests on trio's autojump clock, where a thread would let the
    clock jump while the fsync runs."""
    segments: list[Segment] = field(default_factory=list)
    delivered: Position = (0, HEADER_SIZE)
    """Everything before this position reached Loki (or the DLQ); the checkpoint is durable."""
    synced_end: Position = (0, HEADER_SIZE)
    """Everything before this position is fsynced (readers never look past it)."""
    last_entry_end: Position = (0, HEADER_SIZE)
    """End of the newest entry batch appended: beyond it there are only bookkeeping records."""
    idempotency: dict[str, IdempotencySeen] = field(default_factory=dict)
    """Requests accepted under an idempotency key, by the key's hash."""
    last_write: float = 0.0
    flush_requested: bool = False
    """Set by ``request_flush`` (admin flush): the batcher cuts what it holds at once."""
    _fd: int | None = None
    _retired: list[int] = field(default_factory=list)
    """File descriptors of segments sealed since the last fsync: synced, then closed."""
    _changed: trio.Event = field(default_factory=trio.Event)
    _syncing: trio.Event | None = None
    """Set while an fsync runs in a worker thread; fires when it ends."""
    _read_fds: dict[int, int] = field(default_factory=dict)
    _damage_seen: set[Position] = field(default_factory=set)
    next_seq_floor: int = 1
    """The lowest number a new segment may take: past a segment file recovery had to
    leave in place (one it could neither read nor move aside), which would otherwise
    make every new segment of that number fail to be created."""

    # ----------------------------------------------------------------- writing
    @property
    def active(self) -> Segment:
        return self.segments[-1]

    @property
    def end(self) -> Position:
        return (self.active.seq, self.active.size) if self.segments else (0, HEADER_SIZE)

    @property
    def disk_bytes(self) -> int:
        return sum(s.size for s in self.segments)

    def undelivered_bytes(self) -> int:
        """WAL bytes after the delivery checkpoint (framing and bookkeeping records
        included); 0 when no entry waits for delivery."""
        if not self.has_unread_entries(self.delivered):
            return 0
        seq, offset = self.delivered
        total = 0
        for segment in self.segments:
            if segment.seq > seq:
                total += segment.size - HEADER_SIZE
            elif segment.seq == seq:
                total += max(0, segment.size - offset)
        return total

    def _open_new_segment(self) -> None:
        seq = max(self.segments[-1].seq + 1 if self.segments else 1, self.next_seq_floor)
        path = self.directory / segment_name(seq)
        created = time.time_ns()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            if os.write(fd, encode_header(created)) != HEADER_SIZE:  # the disk is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            _fsync_dir(self.directory)
        except OSError:
            os.close(fd)
            # Left behind, the file would make every later attempt fail (O_EXCL), even
            # once there is room again.
            path.unlink(missing_ok=True)
            raise
        self._fd = fd
        self.segments.append(Segment(seq, path, HEADER_SIZE, created, opened_at=self.clock()))
        self._update_gauges()

    def _start_segment(self) -> None:
        """Open the next segment; after the first, begin it with the live idempotency
        records and the current checkpoint, so recovery (which reads back only to the
        newest checkpoint) finds both in the newest segment. Also when the segment is
        started by an append because a rotation could not start it (a full disk)."""
        carried = bool(self.segments)
        self._open_new_segment()
        if not carried:
            return
        assert self._fd is not None
        records: list[Record] = []
        horizon = time.time_ns() - IDEMPOTENCY_WINDOW_NS
        for digest, seen in list(self.idempotency.items()):
            if seen[2] < horizon:
                del self.idempotency[digest]
            else:
                records.append(IdempotencyRecord(digest, *seen))
        records.append(Checkpoint(*self.delivered, time.time_ns()))
        buffer = bytearray()
        for record in records:
            encode_frame(record, buffer)
        written = os.write(self._fd, buffer)
        if written != len(buffer):
            # Without its first records, the segment must not take appends: remove it
            # (it holds only its header), and the next append starts it again.
            segment = self.segments.pop()
            os.close(self._fd)
            self._fd = None
            segment.path.unlink(missing_ok=True)
            self._update_gauges()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.active.size += written
        self.active.content_start = self.active.size

    def append(self, records: Iterable[Record]) -> Position:
        """Frame and write ``records`` (not yet durable: call ``sync``). Returns the end."""
        buffer = bytearray()
        has_entries = False
        for record in records:
            encode_frame(record, buffer)
            has_entries = has_entries or isinstance(record, ENTRY_RECORDS)
        end = self.append_bytes(buffer)
        if has_entries:
            self.last_entry_end = end
            self.active.last_entry_end = end[1]
        return end

    def append_bytes(self, framed: bytes | bytearray) -> Position:
        try:
            if self._fd is None:
                self._start_segment()
            elif (
                self.active.size + len(framed) > self.segment_max_bytes and self.active.has_new_data
            ):
                self.rotate("size")
            assert self._fd is not None
            written = os.write(self._fd, framed)
        except OSError as exc:
            raise WalError(f"cannot write WAL segment of {self.name}: {exc.strerror}") from exc
        if written != len(framed):
            self._cut_short_write()
            raise WalError(f"short write to WAL segment of {self.name} (is the disk full?)")
        self.active.size += written
        self.last_write = self.clock()
        return self.end

    def _cut_short_write(self) -> None:
        """Remove the part of a frame a short write (the disk filled up mid-write) left at
        the end of the active segment. Left there, later appends would follow it at
        offsets the log does not know, and delivery would stop inside acknowledged
        records. If the file cannot be cut, it is sealed at the size the log knows (readers
        stop there) and the next append starts a new segment."""
        assert self._fd is not None
        try:
            os.ftruncate(self._fd, self.active.size)
        except OSError:
            self._retired.append(self._fd)
            self._fd = None
            self.active.sealed = True

    async def sync(self) -> None:
        """Make every append so far durable (``fdatasync`` off the trio thread).

        Group commit: a caller that finds an fsync in flight waits for it and runs its own
        only if that one did not cover its appends; it never returns before they are
        durable. Segments sealed since the last fsync are synced (then closed) first.
        """
        target = self.end
        while self.synced_end < target:
            if self._syncing is not None:
                await self._syncing.wait()
                continue
            retired, self._retired = self._retired, []
            fds = [*retired, *([self._fd] if self._fd is not None else [])]
            end = self.end
            self._syncing = done = trio.Event()
            try:
                await self.fsync_runner(fds)
            except OSError as exc:
                self._retired = retired + self._retired
                raise WalError(
                    f"fsync of WAL segment of {self.name} failed: {exc.strerror}"
                ) from exc
            finally:
                self._syncing = None
                done.set()
            for fd in retired:
                os.close(fd)
            if end > self.synced_end:
                self.synced_end = end
                self._notify()
            self._update_gauges()

    def sync_blocking(self) -> None:
        """``sync`` without trio, for tools and shutdown (blocks the calling thread)."""
        fds = [*self._retired, *([self._fd] if self._fd is not None else [])]
        _fdatasync_all(fds)
        for fd in self._retired:
            os.close(fd)
        self._retired = []
        self.synced_end = max(self.synced_end, self.end)

    def rotate(self, reason: str) -> bool:
        """Seal the active segment and start a new one; returns whether it rotated.

        Does not block: the sealed segment's fsync happens in the next ``sync`` (which the
        caller awaits before relying on it). The new segment starts with the live
        idempotency records and then the current checkpoint, so recovery finds both in
        the newest segment.
        """
        if self._fd is None or not self.segments or not self.active.has_new_data:
            return False
        self._retired.append(self._fd)
        self._fd = None
        self.active.sealed = True
        try:
            self._start_segment()
        except OSError as exc:  # the next append tries again
            raise WalError(f"cannot start a WAL segment of {self.name}: {exc.strerror}") from exc
        self.metrics.segment_rotations.labels(token=self.name, reason=reason).inc()
        log.info(
            "segment rotated",
            extra={"token": self.name, "reason": reason, "segment": self.active.seq - 1},
        )
        self._notify()
        return True

    def rotation_due(
        self,
        *,
        max_age_s: float,
        min_rotate_bytes: int,
        idle_s: float,
        force_s: float,
    ) -> str | None:
        """The ADR-002 reason to rotate the active segment now, if any (size is checked on
        append, manual by the admin endpoint)."""
        if self._fd is None or not self.segments or not self.active.has_new_data:
            return None
        now = self.clock()
        age = now - self.active.opened_at
        if age >= force_s:
            return "forced"
        if age >= max_age_s and self.active.size >= min_rotate_bytes:
            return "age"
        if now - self.last_write >= idle_s:
            return "idle"
        return None

    # ---------------------------------------------------------------- delivery
    async def commit_delivered(self, position: Position) -> None:
        """Record that everything before ``position`` reached Loki (or the DLQ), durably,
        then delete sealed segments that are fully delivered."""
        if position <= self.delivered:
            return
        self.append([Checkpoint(position[0], position[1], time.time_ns())])
        await self.sync()
        if position > self.delivered:
            self.delivered = position
        self.delete_delivered()

    def _wholly_delivered(self, segment: Segment) -> bool:
        """Whether every entry batch of a sealed segment lies before the checkpoint (the
        bookkeeping records after it — such as that checkpoint itself — do not count)."""
        if not segment.sealed or segment.seq >= self.synced_end[0]:
            return False
        delivered = self._normalise(self.delivered)
        if delivered[0] > segment.seq:
            return True
        entries_end = segment.size if segment.last_entry_end is None else segment.last_entry_end
        return delivered[0] == segment.seq and delivered[1] >= entries_end

    def delete_delivered(self) -> int:
        """Delete sealed segments that lie wholly before the durable checkpoint."""
        deleted = 0
        while len(self.segments) > 1 and self._wholly_delivered(self.segments[0]):
            done = self.segments.pop(0)
            fd = self._read_fds.pop(done.seq, None)
            if fd is not None:
                os.close(fd)
            done.path.unlink(missing_ok=True)
            deleted += 1
            log.debug("deleted delivered segment", extra={"token": self.name, "segment": done.seq})
        if deleted:
            self._update_gauges()
        return deleted

    def request_flush(self) -> None:
        self.flush_requested = True
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_changed(self) -> None:
        await self._changed.wait()

    def has_unread(self, position: Position) -> bool:
        return position < self.synced_end and self._normalise(position) < self.synced_end

    def has_unread_entries(self, position: Position) -> bool:
        """Whether entry batches (not just bookkeeping records) lie at or after ``position``."""
        return self.has_unread(position) and position < self.last_entry_end

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
        self,
        position: Position,
        max_entries: int,
        max_bytes: int,
        *,
        at_least_one: bool = True,
        stop_after: int | None = None,
    ) -> ReadResult:
        """Entry batches from ``position`` up to the durable end, within the limits.

        With ``at_least_one`` the first available batch is returned even if it alone exceeds
        the limits, so one oversized record cannot stall delivery. ``stop_after`` ends the
        read early, within the limits, once that many entries are gathered (callers read in
        steps and let other tasks run in between). Checkpoints and
        idempotency records are skipped over; damaged frames are stepped over (counted,
        copied to ``quarantine/``), never a reason to stop delivering.
        """
        batches: list[EntryRecord] = []
        entries = used = 0
        position = self._normalise(position)
        enough = max_entries if stop_after is None else min(stop_after, max_entries)
        while position < self.synced_end and entries < enough and used < max_bytes:
            segment = next((s for s in self.segments if s.seq == position[0]), None)
            if segment is None:
                break
            limit = self.synced_end[1] if segment.seq == self.synced_end[0] else segment.size
            if position[1] >= limit:
                if segment.seq == self.synced_end[0]:
                    break
                position = self._normalise((segment.seq, segment.size))
                continue
            try:
                fd = self._read_fd(segment)
            except FileNotFoundError:  # deleted under the service: nothing to read there
                self._report_damage(segment, position[1], limit, "missing")
                position = self._past(segment, limit)
                continue
            want = min(limit - position[1], max_bytes - used + FRAME_OVERHEAD, READ_CHUNK)
            first = os.pread(fd, FRAME_OVERHEAD, position[1])
            if len(first) == FRAME_OVERHEAD:
                want = max(want, FRAME_OVERHEAD + int.from_bytes(first[:4], "little"))
            data = os.pread(fd, min(want, limit - position[1]), position[1])
            scan = FrameScan(data, position[1])
            progressed = full = False
            for frame in scan:
                try:
                    record: Record | None = decode_record(frame.payload)
                except WalCorruptionError:
                    # CRC intact but no known record (e.g. written by a newer version):
                    # skip it rather than raise, or delivery of this key stops for good.
                    self._report_damage(segment, frame.offset, frame.end, "undecodable")
                    record = None
                if isinstance(record, ENTRY_RECORDS):
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
                if entries >= enough:
                    full = True  # asked to stop here (``stop_after``) or at the limit
                    break
            if full:
                break
            if progressed:
                continue
            if scan.corrupt or scan.torn:
                position = (segment.seq, self._step_over_damage(segment, position[1], limit))
            else:
                # Fewer bytes than were written (the file was cut under the service): they
                # cannot be read; step to where the log knows it ends instead of reading the
                # same nothing again forever.
                self._report_damage(segment, position[1] + len(data), limit, "missing")
                position = self._past(segment, limit)
        return ReadResult(batches, position, used)

    def _past(self, segment: Segment, limit: int) -> Position:
        """The position after ``limit`` of ``segment`` (the next segment's start if sealed)."""
        return self._normalise((segment.seq, limit))

    def _step_over_damage(self, segment: Segment, start: int, limit: int) -> int:
        """Find the next intact frame after damaged bytes at ``start``; quarantine the gap."""
        fd = self._read_fd(segment)
        offset = start
        resume = limit
        while offset < limit:
            chunk = os.pread(fd, min(RESYNC_CHUNK, limit - offset), offset)
            found = find_next_frame(chunk, 1 if offset == start else 0)
            if found is not None:
                resume = offset + found
                break
            if offset + len(chunk) >= limit:
                break
            # Overlap chunks by one frame header so a frame straddling them is not missed.
            offset += max(1, len(chunk) - 64)
        self._report_damage(segment, start, resume, "corrupt_record")
        return resume

    def _report_damage(self, segment: Segment, start: int, end: int, kind: str) -> None:
        if (segment.seq, start) in self._damage_seen:
            return
        self._damage_seen.add((segment.seq, start))
        try:
            data = os.pread(self._read_fd(segment), max(0, end - start), start)
        except OSError:
            data = b""  # nothing left to keep aside
        if data and not _quarantine_bytes(self.directory, segment.seq, start, data):
            return  # found and counted at an earlier start
        self.metrics.wal_corrupt_records.labels(token=self.name, kind=kind).inc()
        log.error(
            "skipped damaged WAL bytes",
            extra={
                "token": self.name,
                "segment": segment.seq,
                "offset": start,
                "bytes": end - start,
                "kind": kind,
            },
        )

    # ---------------------------------------------------------------- lifecycle
    def _update_gauges(self) -> None:
        self.metrics.wal_segments_active.labels(token=self.name).set(len(self.segments))
        self.metrics.wal_disk_usage.labels(token=self.name).set(self.disk_bytes)

    def oldest_undelivered_ns(self) -> int | None:
        """Creation time of the oldest segment holding undelivered entries (approximate age
        of the oldest undelivered entry), or None when everything is delivered."""
        if not self.has_unread_entries(self.delivered):
            return None
        delivered = self._normalise(self.delivered)
        for segment in self.segments:
            if segment.seq >= delivered[0] and segment.has_new_data:
                return segment.created_ns
        return None

    def oldest_undelivered_received_ns(self) -> int | None:
        """When the oldest undelivered entry was received, or None if all are delivered.

        Reads one record at the checkpoint (page cache); falls back to the creation time of
        its segment (an upper bound on the age) if that record cannot be read."""
        if not self.has_unread_entries(self.delivered):
            return None
        try:
            first = self.read(self.delivered, 1, 1, at_least_one=True)
        except (OSError, WalError):
            return self.oldest_undelivered_ns()
        return first.batches[0].received_ns if first.batches else self.oldest_undelivered_ns()

    def lag_seconds(self) -> float:
        """``forwarder_lag_seconds``: the age of the oldest undelivered entry (0 if none)."""
        oldest = self.oldest_undelivered_received_ns()
        return 0.0 if oldest is None else max(0.0, (time.time_ns() - oldest) / 1e9)

    def close(self) -> None:
        """Fsync and close everything (the blocking variant, for shutdown)."""
        fds = [*self._retired, *([self._fd] if self._fd is not None else [])]
        self._retired = []
        self._fd = None
        try:
            _fdatasync_all(fds)
        finally:
            for fd in fds:
                os.close(fd)
            for fd in self._read_fds.values():
                os.close(fd)
            self._read_fds.clear()

    def __repr__(self) -> str:
        return (
            f"<KeyLog {self.name} segments={len(self.segments)} bytes={self.disk_bytes} "
            f"delivered={self.delivered} synced_end={self.synced_end}>"
        )


def _quarantine_bytes(directory: Path, seq: int, offset: int, data: bytes) -> bool:
    """Keep damaged bytes aside, best effort: a full disk or a ``quarantine`` that is not a
    directory is logged, never a reason to refuse to start or to stop delivering.

    ``False`` if the same bytes from the same place are there already: damage in the
    middle of a segment stays there until the segment is delivered and deleted, and every
    start steps over it again; it was counted and logged as an error when first found.
    """
    target = directory / "quarantine" / f"{seq:016d}-{offset}.bin"
    try:
        if target.read_bytes() == data:
            return False
    except OSError:
        pass  # not there (or unreadable): keep it
    try:
        target.parent.mkdir(mode=PRIVATE_DIR_MODE, exist_ok=True)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
    except OSError as exc:
        log.error(
            "cannot quarantine damaged WAL bytes",
            extra={"directory": str(directory), "segment": seq, "error": str(exc)},
        )
    return True


def _quarantine_segment(directory: Path, path: Path) -> None:
    """Move a segment that cannot be read aside, best effort (left in place, it is
    skipped again at the next start)."""
    try:
        quarantine = directory / "quarantine"
        quarantine.mkdir(mode=PRIVATE_DIR_MODE, exist_ok=True)
        target = quarantine / path.name
        if target.exists():
            target = quarantine / f"{path.name}.{time.time_ns()}"
        shutil.move(str(path), target)
    except OSError as exc:
        log.error(
            "cannot quarantine a WAL segment; skipping it",
            extra={"path": str(path), "error": str(exc)},
        )


def _torn_at_creation(path: Path) -> bool:
    """Whether a segment is one the process stopped creating (``header_torn_at_creation``)."""
    try:
        with open(path, "rb") as handle:
            return header_torn_at_creation(handle.read(HEADER_SIZE + 1))
    except OSError:
        return False


def _repair_header(directory: Path, path: Path, seq: int) -> tuple[int, int] | None:
    """Rewrite a damaged segment header, if intact records follow it: each
    record carries its own length and CRC, so they do not need the header to be read, and
    quarantining the file would lose them. The damaged header goes to ``quarantine/``; the
    file's modification time stands in for its creation time (an age, used for rotation
    and the age quota, that errs on the young side).

    A header with the right magic naming another format version is repaired only if the
    frame right after it is one of ours (intact, and decoding as a record of this
    format): one flipped byte in the version field made the whole segment, every record
    intact, quarantined (an audit: 50 acknowledged entries never delivered). A WAL
    written by a release with another format is not read as ours.

    Returns the creation time and size, or ``None`` when there is nothing to keep: a file
    too short for a record, or none intact in it, or another format's segment.
    """
    try:
        if not path.is_file():
            return None
        with open(path, "r+b") as handle:
            size = os.fstat(handle.fileno()).st_size
            header = handle.read(HEADER_SIZE)
            if size <= HEADER_SIZE + FRAME_OVERHEAD:
                return None
            first = find_next_frame(handle.read(), 0)  # one pass; rare, so a copy
            if first is None or (header.startswith(MAGIC) and first != 0):
                return None
            created_ns = os.fstat(handle.fileno()).st_mtime_ns
            _quarantine_bytes(directory, seq, 0, header)
            handle.seek(0)
            handle.write(encode_header(created_ns))
            handle.flush()
            os.fsync(handle.fileno())
    except OSError:
        return None
    return created_ns, size


@dataclass
class _ScanResult:
    checkpoint: Checkpoint | None = None
    last_entry_end: int | None = None
    good_end: int = HEADER_SIZE
    size: int = HEADER_SIZE


def _scan_frames(
    name: str,
    directory: Path,
    seq: int,
    view: memoryview,
    metrics: Metrics,
    idempotency: dict[str, IdempotencySeen],
    damage: set[Position],
) -> _ScanResult:
    """Walk every frame of a mapped segment, stepping over damaged ones in the middle.

    Every slice of ``view`` made here dies with this call, so the caller can close the map.
    """
    result = _ScanResult(size=len(view))
    size = len(view)
    offset = HEADER_SIZE
    while offset < size:
        scan = FrameScan(view[offset:], offset)
        for frame in scan:
            try:
                record = decode_record(frame.payload)
            except WalCorruptionError:
                metrics.wal_corrupt_records.labels(token=name, kind="undecodable").inc()
                continue
            if isinstance(record, Checkpoint):
                result.checkpoint = record
            elif isinstance(record, IdempotencyRecord):
                idempotency[record.key_hash] = (
                    record.request_id,
                    record.entries_accepted,
                    record.accepted_ns,
                    record.entries_digest,
                )
            elif isinstance(record, ENTRY_RECORDS):
                result.last_entry_end = frame.end
        result.good_end = scan.stop
        if scan.stop >= size:
            break
        found = find_next_frame(view[scan.stop : size], 1)
        if found is None:
            break  # damage runs to the end: a torn or corrupt tail
        resume = scan.stop + found
        damage.add((seq, scan.stop))  # so delivery steps over it without counting it again
        where = {"token": name, "segment": seq, "offset": scan.stop, "bytes": resume - scan.stop}
        if _quarantine_bytes(directory, seq, scan.stop, bytes(view[scan.stop : resume])):
            metrics.wal_corrupt_records.labels(token=name, kind="corrupt_record").inc()
            log.error("skipped a damaged WAL record; later records are intact", extra=where)
        else:
            log.info("stepped over a damaged WAL record already in quarantine", extra=where)
        offset = resume
    return result


def _scan_segment(
    name: str,
    path: Path,
    seq: int,
    metrics: Metrics,
    idempotency: dict[str, IdempotencySeen],
    damage: set[Position],
) -> _ScanResult:
    """Read one segment front to back (memory-mapped, so a large segment costs no heap):
    collect the last checkpoint and idempotency records, step over damaged frames in the
    middle (quarantined, counted), and truncate a torn or corrupt tail."""
    directory = path.parent
    with open(path, "r+b") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size <= HEADER_SIZE:
            return _ScanResult(size=size, good_end=size)
        with mmap.mmap(handle.fileno(), size, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                result = _scan_frames(name, directory, seq, view, metrics, idempotency, damage)
                tail = bytes(view[result.good_end : size])
            finally:
                view.release()
        if tail:
            # Torn or corrupt tail (a crash mid-write): keep the bytes aside, truncate,
            # never crash-loop and never need a person.
            _quarantine_bytes(directory, seq, result.good_end, tail)
            kind = "torn_tail" if _looks_torn(tail) else "corrupt_tail"
            metrics.wal_corrupt_records.labels(token=name, kind=kind).inc()
            log.warning(
                "truncated damaged WAL tail",
                extra={
                    "token": name,
                    "segment": seq,
                    "offset": result.good_end,
                    "bytes": len(tail),
                    "kind": kind,
                },
            )
            handle.truncate(result.good_end)
            handle.flush()
            os.fsync(handle.fileno())
        result.size = result.good_end
    return result


def _looks_torn(tail: bytes) -> bool:
    """A tail whose first frame header claims more bytes than are left was cut short."""
    if len(tail) < FRAME_OVERHEAD:
        return True
    length = int.from_bytes(tail[:4], "little")
    return 0 < length <= MAX_RECORD_BYTES and FRAME_OVERHEAD + length > len(tail)


def recover_key_log(
    name: str,
    directory: Path,
    segment_max_bytes: int,
    metrics: Metrics,
    clock: Clock = _monotonic,
) -> KeyLog:
    """Open the log of one key from disk.

    Only the newest segments are scanned — back to the first one holding a checkpoint,
    which rotation writes at the start of every segment — so start-up does not read the
    backlog. Damage found there is handled as ``_scan_segment`` says; damage in older
    segments is stepped over when delivery reads them.
    """
    keylog = KeyLog(name, directory, segment_max_bytes, metrics, clock=clock)
    paths = sorted(
        (p for p in directory.iterdir() if p.suffix == SEGMENT_SUFFIX and p.stem.isdigit()),
        key=lambda p: int(p.stem),
    )
    segments: list[Segment] = []
    for path in paths:
        seq = int(path.stem)
        try:
            with open(path, "rb") as handle:
                created = decode_header(handle.read(HEADER_SIZE))
            size = path.stat().st_size
        except (WalCorruptionError, OSError) as exc:
            if path is paths[-1] and _torn_at_creation(path):
                # A crash's tear, like a record cut short at the tail, not a damaged disk.
                metrics.wal_corrupt_records.labels(token=name, kind="torn_tail").inc()
                _quarantine_segment(directory, path)
                if path.exists():
                    keylog.next_seq_floor = max(keylog.next_seq_floor, seq + 1)
                log.warning(
                    "the newest WAL segment's header never reached the disk (the process"
                    " stopped as it was created); it held no records, moved to quarantine",
                    extra={"token": name, "segment": seq},
                )
                continue
            metrics.wal_corrupt_records.labels(token=name, kind="bad_header").inc()
            repaired = _repair_header(directory, path, seq)
            if repaired is None:
                _quarantine_segment(directory, path)
                if path.exists():  # it could not be moved aside: new segments go past it
                    keylog.next_seq_floor = max(keylog.next_seq_floor, seq + 1)
                log.error(
                    "quarantined WAL segment with a bad header",
                    extra={"token": name, "segment": seq, "error": str(exc)},
                )
                continue
            created, size = repaired
            log.error(
                "repaired a damaged WAL segment header; its records are kept",
                extra={"token": name, "segment": seq, "error": str(exc)},
            )
        segments.append(Segment(seq, path, size, created, sealed=True))

    checkpoint: Checkpoint | None = None
    last_entry_end: Position | None = None
    for segment in reversed(segments):
        result = _scan_segment(
            name, segment.path, segment.seq, metrics, keylog.idempotency, keylog._damage_seen
        )
        segment.size = result.size
        segment.last_entry_end = result.last_entry_end or HEADER_SIZE
        if last_entry_end is None and result.last_entry_end is not None:
            last_entry_end = (segment.seq, result.last_entry_end)
        if result.checkpoint is not None:
            checkpoint = result.checkpoint
            break
    keylog.segments = segments
    if segments:
        first = segments[0]
        start: Position = (first.seq, HEADER_SIZE)
        if checkpoint is not None and (checkpoint.segment, checkpoint.offset) > start:
            start = (checkpoint.segment, checkpoint.offset)
        keylog.delivered = start
        last = segments[-1]
        keylog.synced_end = (last.seq, last.size)
        # Entries may lie in unscanned older segments: assume so unless the newest scan
        # proved where the last entry batch ends.
        keylog.last_entry_end = last_entry_end or keylog.synced_end
        # Keep appending to the newest segment: it was not rotated, just closed by a stop.
        last.sealed = False
        now_wall = time.time_ns()
        last.opened_at = clock() - max(0.0, (now_wall - last.created_ns) / 1e9)
        last.content_start = HEADER_SIZE
        keylog.last_write = clock()
        keylog._fd = os.open(last.path, os.O_WRONLY | os.O_APPEND)
    keylog._update_gauges()
    return keylog


class WalStore:
    """All key logs under one root directory, opened lazily per key name."""

    def __init__(
        self,
        root: Path,
        segment_max_bytes: int,
        metrics: Metrics,
        clock: Clock = _monotonic,
        fsync_runner: FsyncRunner = fsync_in_thread,
    ) -> None:
        self.root = root
        self.segment_max_bytes = segment_max_bytes
        self.metrics = metrics
        self.clock = clock
        self.fsync_runner = fsync_runner
        self.logs: dict[str, KeyLog] = {}

    def open(self) -> None:
        """Recover every key directory under the root (blocking: run it in a thread)."""
        self.root.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        # ``_shard-<i>`` directories belong to other workers (never a key: see _workers).
        keys = (p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("_"))
        for directory in sorted(keys):
            keylog = recover_key_log(
                directory.name, directory, self.segment_max_bytes, self.metrics, self.clock
            )
            keylog.fsync_runner = self.fsync_runner
            self._adopt(keylog)

    def log_for(self, name: str) -> KeyLog:
        keylog = self.logs.get(name)
        if keylog is None:
            directory = self.root / name
            directory.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
            _fsync_dir(self.root)
            keylog = KeyLog(
                name,
                directory,
                self.segment_max_bytes,
                self.metrics,
                clock=self.clock,
                fsync_runner=self.fsync_runner,
            )
            keylog._update_gauges()
            self._adopt(keylog)
        return keylog

    def _adopt(self, keylog: KeyLog) -> None:
        self.logs[keylog.name] = keylog
        # Computed when scraped, from the log itself: the one writer of this gauge.
        self.metrics.forwarder_lag.labels(token=keylog.name).set_function(keylog.lag_seconds)

    def close(self) -> None:
        for keylog in self.logs.values():
            keylog.close()

    def __repr__(self) -> str:
        return f"<WalStore {self.root} keys={len(self.logs)}>"
