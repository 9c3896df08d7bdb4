"""Per-key dead-letter queue: entries Loki refused for good, kept with the reason.

One JSON-lines file per key, ``<wal root>/<key name>/dead-letters.jsonl``; one record per
refused push (:class:`DeadLetter`): when, Loki's status and answer, the key's tenant, the WAL
range it came from, and the entries grouped by stream, each with the message that refused it.
Entries Loki's answer did not account for (it may have stored them) are kept too, marked
``unconfirmed``: replaying them is safe, Loki drops exact duplicates it still holds.

Appends are written and fsynced before the forwarder checkpoints past the range, so a crash
in between re-delivers the range, and the same refusal is not recorded twice: records carry
their WAL range, and a record whose range overlaps recorded ones (after a restart, delivery
may cut its batches elsewhere) leaves out the entries they hold. Replay removes records by
rewriting the file (temp file, fsync, rename, fsync of the directory). All file work runs
in worker threads, serialised per key.
"""

from __future__ import annotations

import errno
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path

import msgspec
import trio

from ._delivery import Item, Labels
from ._errors import LogstackError
from ._logging import redact
from ._loki_proto import PushEntry, PushStream
from ._wal import PRIVATE_DIR_MODE, Position

DLQ_FILE = "dead-letters.jsonl"
MAX_REASON_CHARS = 16 * 1024
"""Loki's answer is kept up to this many characters per record."""


class ReplayBusyError(LogstackError):
    """A replay of the same key's dead letters is already running."""


class DeadEntry(msgspec.Struct, omit_defaults=True):
    ts: str
    """Nanoseconds since the epoch, as Loki's JSON push writes them."""
    line: str
    metadata: dict[str, str] = {}
    """Structured metadata, if it was sent as such."""
    reason: str = ""
    """The message of Loki's answer that refused this entry (empty: see the record)."""
    unconfirmed: bool = False
    """Loki's answer did not say whether it stored this entry."""


class DeadStream(msgspec.Struct, omit_defaults=True):
    stream: dict[str, str]
    entries: list[DeadEntry] = []
    values: list[list[str]] = []
    """Older records' ``[ts, line]`` pairs; read into ``entries``."""


class DeadLetter(msgspec.Struct, omit_defaults=True):
    """One refused push (or the refused part of one)."""

    id: str = ""
    key: str = ""
    dead_lettered_at: str = ""
    status: int | None = None
    reason: str = ""
    entries: int = 0
    unconfirmed: int = 0
    tenant: str | None = None
    wal_start: list[int] | None = None
    wal_end: list[int] | None = None
    replay_attempts: int = 0
    last_replay_error: str | None = None
    streams: list[DeadStream] = []

    def items(self) -> list[Item]:
        """The entries as push items, in record order."""
        out: list[Item] = []
        for stream in self.streams:
            labels: Labels = tuple(sorted(stream.stream.items()))
            for e in stream.entries:
                out.append((labels, PushEntry(int(e.ts), e.line, dict(e.metadata))))
        return out

    def push_streams(self) -> list[PushStream]:
        streams: dict[Labels, list[PushEntry]] = {}
        for labels, entry in self.items():
            streams.setdefault(labels, []).append(entry)
        return [PushStream(dict(k), v) for k, v in streams.items()]


class DeadLetterHeader(msgspec.Struct):
    """The fields of a record needed to list it (the entries are skipped while decoding)."""

    id: str = ""
    key: str = ""
    dead_lettered_at: str = ""
    status: int | None = None
    reason: str = ""
    entries: int = 0
    unconfirmed: int = 0
    tenant: str | None = None
    replay_attempts: int = 0
    last_replay_error: str | None = None
    wal_start: list[int] | None = None
    wal_end: list[int] | None = None


_encoder = msgspec.json.Encoder()
_record_decoder = msgspec.json.Decoder(DeadLetter)
_header_decoder = msgspec.json.Decoder(DeadLetterHeader)


def now_rfc3339() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e3):03d}Z"


def make_dead_letter(
    key: str,
    tenant: str | None,
    status: int | None,
    reason: str,
    dead: Sequence[tuple[Item, str, bool]],
    *,
    wal_range: tuple[Position, Position] | None = None,
) -> DeadLetter:
    """A record for ``dead``: (item, the message that refused it, unconfirmed?) triples.

    Loki's messages go through the logs' redaction (``redact``): a Loki, or a proxy before
    it, that echoed the request's ``Authorization`` put the Loki credentials into the file
    and the admin listing, where the log line had them redacted (a secrets audit)."""
    streams: dict[Labels, list[DeadEntry]] = {}
    unconfirmed = 0
    reason = redact(reason)
    for (labels, entry), why, unsure in dead:
        why = redact(why) if why else why
        unconfirmed += unsure
        streams.setdefault(labels, []).append(
            DeadEntry(
                str(entry.timestamp_ns),
                entry.line,
                dict(entry.structured_metadata),
                why if why != reason else "",
                unsure,
            )
        )
    return DeadLetter(
        id=uuid.uuid4().hex,
        key=key,
        dead_lettered_at=now_rfc3339(),
        status=status,
        reason=reason[:MAX_REASON_CHARS],
        entries=len(dead),
        unconfirmed=unconfirmed,
        tenant=tenant,
        wal_start=list(wal_range[0]) if wal_range else None,
        wal_end=list(wal_range[1]) if wal_range else None,
        streams=[DeadStream(dict(labels), entries) for labels, entries in streams.items()],
    )


def _decode_record(line: bytes, key: str, number: int) -> DeadLetter:
    record = _record_decoder.decode(line)
    for stream in record.streams:
        if stream.values and not stream.entries:
            stream.entries = [DeadEntry(v[0], v[1]) for v in stream.values if len(v) >= 2]
            stream.values = []
    if not record.id:
        record.id = f"line-{number}"
    if not record.key:
        record.key = key
    return record


class DeadLetterQueue:
    """The dead-letter files of every key under ``root`` (the WAL root)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._locks: dict[str, trio.Lock] = {}
        self._ranges: dict[str, set[tuple[int, int, int, int]]] = {}

    def path(self, key: str) -> Path:
        return self.root / key / DLQ_FILE

    def lock(self, key: str) -> trio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = trio.Lock()
        return lock

    def keys(self) -> list[str]:
        """Names of the keys that have a dead-letter file."""
        try:
            return sorted(p.name for p in self.root.iterdir() if (p / DLQ_FILE).is_file())
        except FileNotFoundError:
            return []

    # ------------------------------------------------------------------ writing

    async def append(self, record: DeadLetter) -> bool:
        """Append ``record`` durably; ``False`` if its entries are recorded already.

        A record whose WAL range overlaps recorded ones is appended without the entries
        those hold (``record`` is changed in place): after a crash between this append and
        the forwarder's checkpoint, the range is delivered again from the last checkpoint
        and may be cut into batches elsewhere, so the same refusal comes with another range.
        Entries are matched by stream, timestamp and line, as many times as they are held
        (two requests may send the same line)."""
        async with self.lock(record.key):
            ranges = self._ranges.get(record.key)
            if ranges is None:
                ranges = self._ranges[record.key] = await trio.to_thread.run_sync(
                    self._load_ranges, record.key
                )
            span = _span(record)
            if span is not None and span in ranges:
                return False
            if span is not None and any(_overlap(span, other) for other in ranges):
                await trio.to_thread.run_sync(self._leave_out_recorded, record, span)
                if not record.entries:
                    return False
            await trio.to_thread.run_sync(self._append_sync, record)
            if span is not None:
                ranges.add(span)
            return True

    def _load_ranges(self, key: str) -> set[tuple[int, int, int, int]]:
        out: set[tuple[int, int, int, int]] = set()
        for _, line in self._lines(key):
            try:
                header = _header_decoder.decode(line)
            except msgspec.DecodeError:
                continue
            span = _span(header)
            if span is not None:
                out.add(span)
        return out

    def _leave_out_recorded(self, record: DeadLetter, span: tuple[int, int, int, int]) -> None:
        held: Counter[tuple[Labels, str, str]] = Counter()
        for other in self.read_sync(record.key):
            other_span = _span(other)
            if other_span is not None and _overlap(span, other_span):
                held.update(_identities(other))
        kept_streams: list[DeadStream] = []
        for stream in record.streams:
            labels: Labels = tuple(sorted(stream.stream.items()))
            kept: list[DeadEntry] = []
            for entry in stream.entries:
                identity = (labels, entry.ts, entry.line)
                if held[identity] > 0:
                    held[identity] -= 1
                else:
                    kept.append(entry)
            if kept:
                kept_streams.append(DeadStream(stream.stream, kept))
        record.streams = kept_streams
        record.entries = sum(len(s.entries) for s in kept_streams)
        record.unconfirmed = sum(e.unconfirmed for s in kept_streams for e in s.entries)

    def _append_sync(self, record: DeadLetter) -> None:
        path = self.path(record.key)
        path.parent.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            size = os.fstat(fd).st_size
            line = _encoder.encode(record) + b"\n"
            if size and os.pread(fd, 1, size - 1) != b"\n":
                # A line cut short earlier (a crash, a full disk): start on a line of our
                # own, or this record would be read as part of that one, and lost with it.
                line = b"\n" + line
            if os.write(fd, line) != len(line):  # the disk filled up mid-write
                os.ftruncate(fd, size)  # no partial record for the next one to join
                raise OSError(errno.ENOSPC, f"dead-letter file {path}: short write")
            os.fsync(fd)
        finally:
            os.close(fd)

    async def rewrite(self, key: str, change: Callable[[DeadLetter], DeadLetter | None]) -> None:
        """Rewrite ``key``'s file, replacing each record by ``change(record)`` (``None``
        drops it), atomically. Records appended meanwhile wait for the lock."""
        async with self.lock(key):
            await trio.to_thread.run_sync(self._rewrite_sync, key, change)
            self._ranges.pop(key, None)

    async def drop(self, key: str, ids: Collection[str]) -> list[DeadLetterHeader]:
        """Remove ``key``'s records with these ids (an operator gave up on them: Loki will
        never take them); returns what was removed, in file order."""
        wanted = set(ids)
        dropped: list[DeadLetterHeader] = []

        def change(record: DeadLetter) -> DeadLetter | None:
            if record.id not in wanted:
                return record
            dropped.append(_header_of(record))
            return None

        await self.rewrite(key, change)
        return dropped

    def _rewrite_sync(self, key: str, change: Callable[[DeadLetter], DeadLetter | None]) -> None:
        path = self.path(key)
        if not path.exists():
            return
        kept: list[bytes] = []
        for number, line in self._lines(key):
            try:
                record = _decode_record(line, key, number)
            except msgspec.DecodeError:
                kept.append(line)  # never drop what we cannot read
                continue
            new = change(record)
            if new is not None:
                kept.append(line if new is record else _encoder.encode(new))
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.unlink(missing_ok=True)  # a crash's leftover: created anew, 0600 like the file
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            for line in kept:
                handle.write(line + b"\n")
            handle.flush()
            os.fsync(handle.fileno())
        if kept:
            os.replace(tmp, path)
        else:
            os.unlink(tmp)
            path.unlink(missing_ok=True)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ reading

    def _lines(self, key: str) -> Iterator[tuple[int, bytes]]:
        path = self.path(key)
        try:
            handle = path.open("rb")
        except FileNotFoundError:
            return
        with handle:
            for number, line in enumerate(handle, 1):
                line = line.strip()
                if line:
                    yield number, line

    def read_sync(self, key: str) -> list[DeadLetter]:
        """Every readable record of ``key`` (blocking: call from a worker thread)."""
        out: list[DeadLetter] = []
        for number, line in self._lines(key):
            try:
                out.append(_decode_record(line, key, number))
            except msgspec.DecodeError:
                continue
        return out

    async def read(self, key: str) -> list[DeadLetter]:
        async with self.lock(key):
            return await trio.to_thread.run_sync(self.read_sync, key)

    def headers_sync(self, key: str) -> list[DeadLetterHeader]:
        """Every record of ``key`` without its entries (blocking)."""
        out: list[DeadLetterHeader] = []
        for number, line in self._lines(key):
            try:
                header = _header_decoder.decode(line)
            except msgspec.DecodeError:
                continue
            if not header.id:
                header.id = f"line-{number}"
            header.key = header.key or key
            out.append(header)
        return out

    def records_sync(self, key: str, ids: set[str]) -> dict[str, DeadLetter]:
        """The full records of ``key`` whose id is in ``ids`` (blocking)."""
        out: dict[str, DeadLetter] = {}
        for number, line in self._lines(key):
            try:
                header = _header_decoder.decode(line)
            except msgspec.DecodeError:
                continue
            if (header.id or f"line-{number}") in ids:
                out[header.id or f"line-{number}"] = _decode_record(line, key, number)
        return out

    def __repr__(self) -> str:
        return f"<DeadLetterQueue {self.root} keys={self.keys()}>"


def _header_of(record: DeadLetter) -> DeadLetterHeader:
    return DeadLetterHeader(
        **{name: getattr(record, name) for name in DeadLetterHeader.__struct_fields__}
    )


def _overlap(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    """Whether two WAL ranges ``(start segment, offset, end segment, offset)`` share a
    position (positions compare as (segment, offset) pairs)."""
    return a[:2] < b[2:] and b[:2] < a[2:]


def _identities(record: DeadLetter) -> Iterator[tuple[Labels, str, str]]:
    for stream in record.streams:
        labels: Labels = tuple(sorted(stream.stream.items()))
        for entry in stream.entries:
            yield labels, entry.ts, entry.line


def _span(record: DeadLetter | DeadLetterHeader) -> tuple[int, int, int, int] | None:
    start, end = record.wal_start, record.wal_end
    if start is None or end is None or len(start) < 2 or len(end) < 2:
        return None
    return (start[0], start[1], end[0], end[1])


def dead_letter_queue(services: dict[str, object], root: Path) -> DeadLetterQueue:
    """The service's one :class:`DeadLetterQueue` (created on first use, shared by the
    forwarder and the admin endpoints so that they share its per-key locks)."""
    queue = services.get("dlq")
    if not isinstance(queue, DeadLetterQueue):
        queue = DeadLetterQueue(root)
        services["dlq"] = queue
    return queue
