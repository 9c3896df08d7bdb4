"""The WAL's on-disk format: segment header, length+CRC frames, msgspec record kinds.

Segment file = 24-byte header (magic, format version, flags, creation time) followed by frames::

    frame = u32 little-endian payload length | u32 CRC-32 of payload | payload

Each payload is one MessagePack record, a tagged ``array_like`` msgspec struct. The field
order of every record kind is an on-disk contract: append new fields with defaults, never
reorder (``tests/core/test_wal_format.py`` holds golden bytes for each kind).
"""

from __future__ import annotations

import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

import msgspec

from ._entry import LogEntry
from ._errors import WalCorruptionError

MAGIC = b"LOGSTWAL"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sHHxxxxq")  # magic, version, flags, pad, created_ns  (24 bytes)
HEADER_SIZE = _HEADER.size
_FRAME = struct.Struct("<II")
FRAME_OVERHEAD = _FRAME.size
MAX_RECORD_BYTES = 64 * 1024 * 1024
"""Sanity bound: a length field above this is corruption, not a record."""


class EntryBatch(msgspec.Struct, tag=1, array_like=True, gc=False):
    """Entries of one accepted request, masked and validated, as written before
    ``LineBatch`` (still read and delivered: a WAL written by an earlier version)."""

    request_id: str
    received_ns: int
    entries: list[LogEntry]


class LineEntry(msgspec.Struct, array_like=True, gc=False):
    """An entry as delivery uses it: the fields of its Loki stream and its Loki line."""

    timestamp_ns: int
    level: str
    service: str
    env: str
    labels: dict[str, str]
    line: bytes
    """Compact JSON of the masked ``message`` and ``metadata`` (``logstack._loki_line``);
    delivery adds ``trace_id``/``span_id`` to it or sends them as structured metadata."""
    trace_id: str | None = None
    span_id: str | None = None


class LineBatch(msgspec.Struct, tag=4, array_like=True, gc=False):
    """Entries of one accepted request, masked and validated, each with its Loki line
    rendered when written. A LogStack from before this record kind reads it as undecodable
    and quarantines it: drain the WAL before downgrading (``docs/wal.md``)."""

    request_id: str
    received_ns: int
    entries: list[LineEntry]


class Checkpoint(msgspec.Struct, tag=2, array_like=True, gc=False):
    """Delivery progress: every record before (segment, offset) reached Loki or the DLQ."""

    segment: int
    offset: int
    delivered_ns: int


class IdempotencyRecord(msgspec.Struct, tag=3, array_like=True, gc=False):
    """A request accepted under ``X-Idempotency-Key`` (the key is stored hashed)."""

    key_hash: str
    request_id: str
    entries_accepted: int
    accepted_ns: int
    entries_digest: str = ""
    """A digest of the request's masked entries: a retry must carry the same ones (empty in
    records written before it was kept: such a retry is taken as the same request)."""


Record = EntryBatch | LineBatch | Checkpoint | IdempotencyRecord
EntryRecord = EntryBatch | LineBatch
"""The record kinds that hold entries."""
ENTRY_RECORDS = (EntryBatch, LineBatch)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Record)


def encode_header(created_ns: int) -> bytes:
    return _HEADER.pack(MAGIC, FORMAT_VERSION, 0, created_ns)


HEADER_PREFIX: Final = _HEADER.pack(MAGIC, FORMAT_VERSION, 0, 0)[: _HEADER.size - 8]
"""What every header of this format begins with (all but the creation time)."""


def header_torn_at_creation(data: bytes) -> bool:
    """Whether a segment's bytes (``data``, at least its first ``HEADER_SIZE + 1``) are
    those of one the process stopped creating, rather than a damaged one.

    A segment's header is written, not synced, when the file is created (the directory
    entry is); the first group commit syncs it with the first records. A crash in between
    leaves the file empty, its header cut short, or (on a filesystem that extends files
    before their data lands) zeros: no records, so nothing acknowledged; a crash's tear
    (``torn_tail``) rather than damage (``bad_header``). Only the newest segment can be so.
    """
    if len(data) > HEADER_SIZE:
        return False
    cut_short = len(data) < HEADER_SIZE and HEADER_PREFIX.startswith(data[: len(HEADER_PREFIX)])
    return cut_short or not any(data)


def decode_header(data: bytes) -> int:
    """Check the header and return the segment's creation time (ns)."""
    if len(data) < HEADER_SIZE:
        raise WalCorruptionError("segment header is truncated")
    magic, version, _flags, created_ns = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise WalCorruptionError("not a LogStack WAL segment (bad magic)")
    if version != FORMAT_VERSION:
        raise WalCorruptionError(f"unsupported WAL format version {version}")
    return int(created_ns)


def encode_frame(record: Record, buffer: bytearray) -> None:
    """Append one framed record to ``buffer`` (``encode_into`` avoids an extra copy)."""
    start = len(buffer)
    buffer.extend(b"\0" * FRAME_OVERHEAD)
    _encoder.encode_into(record, buffer, start + FRAME_OVERHEAD)
    payload = memoryview(buffer)[start + FRAME_OVERHEAD :]
    _FRAME.pack_into(buffer, start, len(payload), zlib.crc32(payload))
    payload.release()


def frame_bytes(record: Record) -> bytes:
    buffer = bytearray()
    encode_frame(record, buffer)
    return bytes(buffer)


def decode_record(payload: bytes | memoryview) -> Record:
    try:
        record: Record = _decoder.decode(payload)
    except msgspec.DecodeError as exc:
        raise WalCorruptionError(f"undecodable record: {exc}") from None
    return record


@dataclass(frozen=True, slots=True)
class Frame:
    offset: int
    """Offset of the frame start within the segment file."""
    end: int
    """Offset just past the frame."""
    payload: memoryview


class FrameScan:
    """Iterate the frames in ``data`` (which starts at file offset ``base``).

    Iteration stops at the first frame that is incomplete (``torn``) or fails its CRC
    (``corrupt``); ``stop`` is the offset where valid frames ended.
    """

    def __init__(self, data: bytes | memoryview, base: int) -> None:
        self._data = memoryview(data)
        self._base = base
        self.stop = base
        self.torn = False
        self.corrupt = False

    def __iter__(self) -> Iterator[Frame]:
        data, pos, size = self._data, 0, len(self._data)
        while pos < size:
            if size - pos < FRAME_OVERHEAD:
                self.torn = True
                break
            length, crc = _FRAME.unpack_from(data, pos)
            if length == 0 or length > MAX_RECORD_BYTES:
                # No record encodes to nothing, and crc32(b"") == 0: without this check a
                # zero-filled tail (size extended, data lost in a crash) reads as empty frames.
                self.corrupt = True
                break
            end = pos + FRAME_OVERHEAD + length
            if end > size:
                self.torn = True
                break
            payload = data[pos + FRAME_OVERHEAD : end]
            if zlib.crc32(payload) != crc:
                self.corrupt = True
                break
            yield Frame(self._base + pos, self._base + end, payload)
            pos = end
            self.stop = self._base + pos


# A record payload starts with a MessagePack fixarray header followed by the kind's tag
# (a positive fixint): EntryBatch/LineBatch/Checkpoint are 4-element arrays,
# IdempotencyRecord 5.
_RECORD_START = re.compile(rb"[\x91-\x9f][\x01-\x7f]")


def find_next_frame(data: bytes | memoryview, start: int) -> int | None:
    """Offset (within ``data``) of the first intact frame at or after ``start``, or None.

    Used to step over a damaged frame in the middle of a segment: candidates are found by
    a C-speed regex scan for a record header, then confirmed by length, CRC and decoding,
    so garbage costs one pass, not one CRC per byte.
    """
    view = memoryview(data)
    raw = view.tobytes() if not isinstance(data, bytes) else data
    size = len(raw)
    for match in _RECORD_START.finditer(raw, max(start + FRAME_OVERHEAD, FRAME_OVERHEAD)):
        frame_start = match.start() - FRAME_OVERHEAD
        if frame_start < start:
            continue
        length, crc = _FRAME.unpack_from(raw, frame_start)
        end = frame_start + FRAME_OVERHEAD + length
        if length == 0 or length > MAX_RECORD_BYTES or end > size:
            continue
        payload = view[frame_start + FRAME_OVERHEAD : end]
        if zlib.crc32(payload) != crc:
            continue
        try:
            decode_record(payload)
        except WalCorruptionError:
            continue
        return frame_start
    return None
