"""The WAL's on-disk format (SPEC §6, STYLE "The WAL record format").

Golden bytes pin the field order, tags and framing of every record kind and of the segment
header: if one of these tests fails, an on-disk contract changed. Append new fields with
defaults instead, and add a new golden test for the new shape.
"""

from __future__ import annotations

import itertools
import struct
import zlib
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from logstack._entry import LogEntry
from logstack._errors import WalCorruptionError
from logstack._loki_line import line_batch
from logstack._wal_format import (
    FORMAT_VERSION,
    FRAME_OVERHEAD,
    HEADER_SIZE,
    MAGIC,
    MAX_RECORD_BYTES,
    Checkpoint,
    EntryBatch,
    FrameScan,
    IdempotencyRecord,
    LineBatch,
    LineEntry,
    Record,
    decode_header,
    decode_record,
    encode_frame,
    encode_header,
    frame_bytes,
)

# --------------------------------------------------------------------------- golden bytes

FULL_ENTRY = LogEntry(
    timestamp_ns=1_700_000_000_123_456_789,
    level="ERROR",
    message="disk full",
    service="billing",
    env="prod",
    labels={"region": "eu-west-1"},
    trace_id="4bf92f3577b34da6a3ce929d0e0e4736",
    span_id="00f067aa0ba902b7",
    metadata={
        "user": "[MASKED]",
        "attempt": 3,
        "ok": False,
        "ratio": 0.5,
        "tags": ["a", "b"],
        "none": None,
    },
    timestamp="2023-11-14T22:13:20.123456789Z",
)

ENTRY_BATCH = EntryBatch("req-1", 1_700_000_000_999_999_999, [FULL_ENTRY])
ENTRY_BATCH_FRAME = bytes.fromhex(
    # frame: u32 LE length (0xd8 = 216) | u32 LE CRC-32 | payload
    "d8000000 8c9b8fd3"
    # [tag 1, request_id, received_ns, [entry]]
    "94 01 a5 7265712d31 cf 17979cfe71c4c9ff 91"
    # entry: [timestamp_ns, level, message, service, env, labels, trace_id, span_id,
    #         metadata, timestamp]
    "9a"
    "cf17979cfe3d85cd15"
    "a54552524f52"
    "a96469736b2066756c6c"
    "a762696c6c696e67"
    "a470726f64"
    "81a6726567696f6ea965752d776573742d31"
    "d9203462663932663335373762333464613661336365393239643065306534373336"
    "b030306630363761613062613930326237"
    "86"
    "a475736572a85b4d41534b45445d"
    "a7617474656d707403"
    "a26f6bc2"
    "a5726174696fcb3fe0000000000000"
    "a47461677392a161a162"
    "a46e6f6e65c0"
    "be323032332d31312d31345432323a31333a32302e3132333435363738395a"
)

LINE_BATCH = line_batch("req-1", 1_700_000_000_999_999_999, [FULL_ENTRY])
LINE_BATCH_FRAME = bytes.fromhex(
    # frame: u32 LE length (0xec = 236) | u32 LE CRC-32 | payload
    "ec000000 09666fd0"
    # [tag 4, request_id, received_ns, [entry]]
    "94 04 a5 7265712d31 cf 17979cfe71c4c9ff 91"
    # entry: [timestamp_ns, level, service, env, labels, line, trace_id, span_id]
    "98"
    "cf17979cfe3d85cd15"
    "a54552524f52"
    "a762696c6c696e67"
    "a470726f64"
    "81a6726567696f6ea965752d776573742d31"
    # line: bin 8, 118 bytes of compact JSON (message, metadata; no ids)
    "c476"
    + b'{"message":"disk full","metadata":{"user":"[MASKED]","attempt":3,"ok":false,'
    b'"ratio":0.5,"tags":["a","b"],"none":null}}'.hex()
    + "d9203462663932663335373762333464613661336365393239643065306534373336"
    "b030306630363761613062613930326237"
)

CHECKPOINT = Checkpoint(3, 4096, 1_700_000_001_000_000_000)
CHECKPOINT_FRAME = bytes.fromhex(
    "0f000000 9afeecb9"
    # [tag 2, segment, offset, delivered_ns]
    "94 02 03 cd1000 cf17979cfe71c4ca00"
)

IDEMPOTENCY = IdempotencyRecord("ab" * 32, "req-2", 7, 1_700_000_002_000_000_000)
IDEMPOTENCY_FIELDS = (
    # tag 3, key_hash, request_id, entries_accepted, accepted_ns
    "03"
    "d940"
    "6162616261626162616261626162616261626162616261626162616261626162"
    "6162616261626162616261626162616261626162616261626162616261626162"
    "a57265712d32"
    "07"
    "cf17979cfead5f9400"
)
IDEMPOTENCY_FRAME = bytes.fromhex("54000000 8538af9995" + IDEMPOTENCY_FIELDS)
"""The shape written before ``entries_digest`` (2026-11-28): still read, as a record with
an empty digest."""

IDEMPOTENCY_WITH_DIGEST = IdempotencyRecord(
    "ab" * 32, "req-2", 7, 1_700_000_002_000_000_000, "cd" * 16
)
IDEMPOTENCY_WITH_DIGEST_FRAME = bytes.fromhex(
    "76000000 184640af"
    "96" + IDEMPOTENCY_FIELDS + "d920"  # one more field: the same five, then entries_digest
    "6364636463646364636463646364636463646364636463646364636463646364"
)

HEADER_CREATED_NS = 1_700_000_000_000_000_000
HEADER_BYTES = bytes.fromhex(
    # magic "LOGSTWAL" | u16 version 1 | u16 flags 0 | 4 pad | i64 LE created_ns
    "4c4f47535457414c 0100 0000 00000000 00002a36fe9c9717"
)

GOLDEN = [
    pytest.param(ENTRY_BATCH, ENTRY_BATCH_FRAME, id="entry_batch"),
    pytest.param(LINE_BATCH, LINE_BATCH_FRAME, id="line_batch"),
    pytest.param(CHECKPOINT, CHECKPOINT_FRAME, id="checkpoint"),
    pytest.param(IDEMPOTENCY_WITH_DIGEST, IDEMPOTENCY_WITH_DIGEST_FRAME, id="idempotency"),
]


def test_an_idempotency_record_of_the_earlier_shape_is_read_with_an_empty_digest() -> None:
    scan = FrameScan(IDEMPOTENCY_FRAME, 100)
    [frame] = list(scan)
    assert decode_record(frame.payload) == IDEMPOTENCY
    assert IDEMPOTENCY.entries_digest == ""


@pytest.mark.parametrize(("record", "golden"), GOLDEN)
def test_record_encodes_to_golden_bytes(record: Record, golden: bytes) -> None:
    assert frame_bytes(record) == golden


@pytest.mark.parametrize(("record", "golden"), GOLDEN)
def test_golden_bytes_decode_to_record(record: Record, golden: bytes) -> None:
    scan = FrameScan(golden, 100)
    frames = list(scan)
    assert len(frames) == 1
    assert (frames[0].offset, frames[0].end) == (100, 100 + len(golden))
    assert not scan.torn and not scan.corrupt and scan.stop == 100 + len(golden)
    decoded = decode_record(frames[0].payload)
    assert type(decoded) is type(record)
    assert decoded == record


def test_golden_frames_are_length_and_crc_of_payload() -> None:
    for golden in (
        ENTRY_BATCH_FRAME,
        LINE_BATCH_FRAME,
        CHECKPOINT_FRAME,
        IDEMPOTENCY_FRAME,
        IDEMPOTENCY_WITH_DIGEST_FRAME,
    ):
        length, crc = struct.unpack_from("<II", golden)
        payload = golden[FRAME_OVERHEAD:]
        assert length == len(payload)
        assert crc == zlib.crc32(payload)


def test_record_kind_tags_are_pinned() -> None:
    # The first element of every array-like record is its kind tag.
    assert ENTRY_BATCH_FRAME[FRAME_OVERHEAD + 1] == 1
    assert CHECKPOINT_FRAME[FRAME_OVERHEAD + 1] == 2
    assert IDEMPOTENCY_FRAME[FRAME_OVERHEAD + 1] == 3
    assert LINE_BATCH_FRAME[FRAME_OVERHEAD + 1] == 4


def test_entry_field_order_is_pinned() -> None:
    """The on-disk order of LogEntry fields, independently of the golden bytes."""
    assert LogEntry.__struct_fields__ == (
        "timestamp_ns",
        "level",
        "message",
        "service",
        "env",
        "labels",
        "trace_id",
        "span_id",
        "metadata",
        "timestamp",
    )
    assert EntryBatch.__struct_fields__ == ("request_id", "received_ns", "entries")
    assert LineEntry.__struct_fields__ == (
        "timestamp_ns",
        "level",
        "service",
        "env",
        "labels",
        "line",
        "trace_id",
        "span_id",
    )
    assert LineBatch.__struct_fields__ == ("request_id", "received_ns", "entries")
    assert Checkpoint.__struct_fields__ == ("segment", "offset", "delivered_ns")
    assert IdempotencyRecord.__struct_fields__ == (
        "key_hash",
        "request_id",
        "entries_accepted",
        "accepted_ns",
        "entries_digest",
    )


def test_entry_with_defaults_keeps_every_field_on_disk() -> None:
    entry = LogEntry(1, "INFO", "m", "s", "e")
    frame = frame_bytes(EntryBatch("r", 2, [entry]))
    assert frame.hex() == "180000001c3b413f9401a17202919a01a4494e464fa16da173a16580c0c0c0a0"
    assert decode_record(frame[FRAME_OVERHEAD:]) == EntryBatch("r", 2, [entry])


def test_older_shorter_entry_decodes_with_defaults() -> None:
    """Schema evolution: a record written before trailing fields existed still decodes."""
    old = msgspec.msgpack.encode([1, "r", 2, [[1, "INFO", "m", "s", "e"]]])
    record = decode_record(old)
    assert record == EntryBatch("r", 2, [LogEntry(1, "INFO", "m", "s", "e")])


def test_header_golden_bytes() -> None:
    header = encode_header(HEADER_CREATED_NS)
    assert header == HEADER_BYTES
    assert len(header) == HEADER_SIZE == 24
    assert header.startswith(MAGIC) and FORMAT_VERSION == 1
    assert decode_header(HEADER_BYTES) == HEADER_CREATED_NS
    # Extra bytes after the header (the first frame) are ignored.
    assert decode_header(HEADER_BYTES + CHECKPOINT_FRAME) == HEADER_CREATED_NS


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "truncated"),
        (HEADER_BYTES[:-1], "truncated"),
        (b"X" + HEADER_BYTES[1:], "bad magic"),
        (HEADER_BYTES[:8] + b"\x02\x00" + HEADER_BYTES[10:], "version 2"),
    ],
)
def test_bad_header_is_corruption(data: bytes, message: str) -> None:
    with pytest.raises(WalCorruptionError, match=message):
        decode_header(data)


# --------------------------------------------------------------------------- framing


def test_encode_frame_appends_to_existing_buffer() -> None:
    buffer = bytearray(b"prefix")
    encode_frame(CHECKPOINT, buffer)
    encode_frame(IDEMPOTENCY_WITH_DIGEST, buffer)
    assert bytes(buffer) == b"prefix" + CHECKPOINT_FRAME + IDEMPOTENCY_WITH_DIGEST_FRAME
    # The buffer can still grow: no memoryview export was left behind.
    buffer.extend(b"more")


def test_scan_empty_data() -> None:
    scan = FrameScan(b"", 24)
    assert list(scan) == []
    assert (scan.stop, scan.torn, scan.corrupt) == (24, False, False)


def test_scan_stops_at_absurd_length() -> None:
    data = CHECKPOINT_FRAME + struct.pack("<II", MAX_RECORD_BYTES + 1, 0) + b"x" * 32
    scan = FrameScan(data, 0)
    assert len(list(scan)) == 1
    assert scan.corrupt and not scan.torn and scan.stop == len(CHECKPOINT_FRAME)


def test_scan_treats_zero_filled_bytes_as_damage() -> None:
    """A crash can leave a zero-filled tail (size extended, data never written). Eight zero
    bytes look like an empty frame with a matching CRC (crc32(b"") == 0); no record is
    ever empty, so they must not pass as frames."""
    data = CHECKPOINT_FRAME + b"\0" * 4096
    scan = FrameScan(data, 0)
    frames = list(scan)
    assert len(frames) == 1
    assert scan.corrupt and scan.stop == len(CHECKPOINT_FRAME)


@pytest.mark.parametrize(
    "payload",
    [b"\xc1", b"\x94\x09\x01\x02\x03", b"\x93\x02\x01\x02", b"\x92\x01", b"\xa3abc"],
    ids=["invalid-msgpack", "unknown-tag", "missing-field", "short-batch", "not-an-array"],
)
def test_undecodable_payload_is_corruption(payload: bytes) -> None:
    with pytest.raises(WalCorruptionError, match="undecodable"):
        decode_record(payload)


# --------------------------------------------------------------------------- properties

_int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
_uint63 = st.integers(min_value=0, max_value=2**63 - 1)
_json_scalar = st.none() | st.booleans() | _int64 | st.floats(allow_nan=False) | st.text()
_json: st.SearchStrategy[Any] = st.recursive(
    _json_scalar,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)

entries = st.builds(
    LogEntry,
    timestamp_ns=_uint63,
    level=st.sampled_from(["TRACE", "DEBUG", "INFO", "WARN", "ERROR", "FATAL"]),
    message=st.text(max_size=200),
    service=st.text(max_size=20),
    env=st.text(max_size=10),
    labels=st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3),
    trace_id=st.none() | st.text(max_size=32),
    span_id=st.none() | st.text(max_size=16),
    metadata=st.none() | st.dictionaries(st.text(max_size=10), _json, max_size=5),
    timestamp=st.text(max_size=35),
)
records: st.SearchStrategy[Record] = st.one_of(
    st.builds(EntryBatch, st.text(max_size=36), _uint63, st.lists(entries, max_size=4)),
    st.builds(Checkpoint, _uint63, _uint63, _uint63),
    st.builds(IdempotencyRecord, st.text(max_size=64), st.text(max_size=36), _uint63, _uint63),
)
record_lists = st.lists(records, max_size=8)


def _frame_all(recs: list[Record]) -> tuple[bytes, list[int]]:
    """Frame ``recs`` back to back; also return every frame boundary (0 and each end)."""
    buffer = bytearray()
    bounds = [0]
    for record in recs:
        encode_frame(record, buffer)
        bounds.append(len(buffer))
    return bytes(buffer), bounds


@given(record_lists, st.integers(min_value=0, max_value=2**40))
def test_frames_back_to_back_scan_back_identically(recs: list[Record], base: int) -> None:
    data, bounds = _frame_all(recs)
    scan = FrameScan(data, base)
    frames = list(scan)
    assert [decode_record(f.payload) for f in frames] == recs
    assert [(f.offset, f.end) for f in frames] == [
        (base + a, base + b) for a, b in itertools.pairwise(bounds)
    ]
    assert (scan.stop, scan.torn, scan.corrupt) == (base + len(data), False, False)


@given(record_lists.filter(bool), st.data())
def test_truncation_yields_exactly_the_complete_frames(recs: list[Record], data: Any) -> None:
    stream, bounds = _frame_all(recs)
    cut = data.draw(st.integers(min_value=0, max_value=len(stream)), label="cut")
    scan = FrameScan(stream[:cut], HEADER_SIZE)
    frames = list(scan)
    complete = [b for b in bounds[1:] if b <= cut]
    assert [decode_record(f.payload) for f in frames] == recs[: len(complete)]
    last_boundary = complete[-1] if complete else 0
    assert scan.stop == HEADER_SIZE + last_boundary
    assert scan.torn == (cut != last_boundary)
    assert not scan.corrupt


@given(record_lists.filter(bool), st.data())
def test_any_bit_flip_in_crc_or_payload_is_detected(recs: list[Record], data: Any) -> None:
    stream, bounds = _frame_all(recs)
    index = data.draw(st.integers(min_value=0, max_value=len(recs) - 1), label="frame")
    start, end = bounds[index], bounds[index + 1]
    # Any byte of the CRC field or of the payload (not the length field).
    byte = data.draw(st.integers(min_value=start + 4, max_value=end - 1), label="byte")
    bit = data.draw(st.integers(min_value=0, max_value=7), label="bit")
    damaged = bytearray(stream)
    damaged[byte] ^= 1 << bit
    scan = FrameScan(bytes(damaged), 0)
    frames = list(scan)
    assert [decode_record(f.payload) for f in frames] == recs[:index]
    assert scan.corrupt and not scan.torn
    assert scan.stop == start


@given(record_lists.filter(bool), st.data())
def test_any_bit_flip_never_yields_a_wrong_frame(recs: list[Record], data: Any) -> None:
    """Flips anywhere (length field included) may end the scan early, never invent data."""
    stream, _ = _frame_all(recs)
    byte = data.draw(st.integers(min_value=0, max_value=len(stream) - 1), label="byte")
    bit = data.draw(st.integers(min_value=0, max_value=7), label="bit")
    damaged = bytearray(stream)
    damaged[byte] ^= 1 << bit
    scan = FrameScan(bytes(damaged), 0)
    decoded = [decode_record(f.payload) for f in scan]
    assert decoded == recs[: len(decoded)]
    assert len(decoded) < len(recs)
    assert scan.torn or scan.corrupt
