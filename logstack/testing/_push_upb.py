"""Loki pushes in their usual form decoded by protobuf's C runtime (upb), for the stand-in.

In a drain the stand-in's work per push is most of each push's round trip, and LogStack
waits for the answer before its next push of the key (``docs/performance.md``, "The
drain"); decoding was half of that work. The hand-written decoder
(:func:`logstack._loki_proto.decode_push_request_raw`) stays the reference: it is strict where
Go is and says what is wrong. This one only takes pushes whose result it can vouch for —
the canonical encoding every client writes, without structured metadata — and answers
``None`` for anything else, which the hand-written decoder then decides:

* the schema here has no ``structuredMetadata``, ``parsed`` or other fields, so those become
  unknown fields, which are dropped, and the push is then smaller re-encoded than received;
* so is a push with repeated or non-minimal fields (Go keeps the last timestamp of an entry,
  protobuf merges them) or explicit zeros: the size check catches them all;
* strings that are not UTF-8 fail upb's parse (proto3), and nanoseconds outside
  ``[0, 1e9)`` are checked here (read as 64 bits, as Go reads them: see the schema).

A property test holds the two decoders equal wherever this one answers
(``tests/testing/test_push_upb.py``).
"""

from __future__ import annotations

from itertools import repeat
from operator import add, attrgetter, mul
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.internal import api_implementation
from google.protobuf.message import DecodeError

from .._loki_proto import PushEntry

_NS = 1_000_000_000
_INT64, _UINT64, _STRING, _MESSAGE = 3, 4, 9, 11  # FieldDescriptorProto.Type
_OPTIONAL, _REPEATED = 1, 3  # FieldDescriptorProto.Label

_timestamp_of = attrgetter("timestamp")
_seconds_of = attrgetter("seconds")
_nanos_of = attrgetter("nanos")
_line_of = attrgetter("line")


def _push_request_class() -> Any:
    """``logproto.PushRequest`` as the stand-in reads it (Loki's ``pkg/push/push.proto``
    without the fields this decoder leaves to the hand-written one)."""
    package = "logstack.testing.push"
    schema = descriptor_pb2.FileDescriptorProto(
        name="logstack_testing_push.proto", package=package, syntax="proto3"
    )
    messages: dict[str, list[tuple[str, int, int, int, str]]] = {
        # nanos is int32 in Loki's schema; read as int64 here, as the hand-written decoder and
        # Go read the varint, so a value wider than 32 bits is refused, not cut to 32.
        "Timestamp": [("seconds", 1, _INT64, _OPTIONAL, ""), ("nanos", 2, _INT64, _OPTIONAL, "")],
        "EntryAdapter": [
            ("timestamp", 1, _MESSAGE, _OPTIONAL, "Timestamp"),
            ("line", 2, _STRING, _OPTIONAL, ""),
        ],
        "StreamAdapter": [
            ("labels", 1, _STRING, _OPTIONAL, ""),
            ("entries", 2, _MESSAGE, _REPEATED, "EntryAdapter"),
            ("hash", 3, _UINT64, _OPTIONAL, ""),
        ],
        "PushRequest": [("streams", 1, _MESSAGE, _REPEATED, "StreamAdapter")],
    }
    for name, fields in messages.items():
        message = schema.message_type.add(name=name)
        for field, number, kind, label, type_name in fields:
            message.field.add(
                name=field,
                number=number,
                type=kind,
                label=label,
                type_name=f".{package}.{type_name}" if type_name else None,
            )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(schema)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.PushRequest"))


_PushRequest = _push_request_class()
AVAILABLE = api_implementation.Type() == "upb"
"""Only protobuf's C runtime is faster than the hand-written decoder; its pure-Python
fallback (a platform without the wheel) is not used."""


def decode_usual_push(data: bytes) -> list[tuple[str, list[PushEntry]]] | None:
    """Decode an uncompressed ``PushRequest`` as ``decode_push_request_raw`` would, or
    return ``None`` if it is not in the usual form (see the module's docstring)."""
    if not AVAILABLE:
        return None
    push = _PushRequest()
    try:
        push.ParseFromString(data)
    except DecodeError:
        return None
    push.DiscardUnknownFields()
    if push.ByteSize() != len(data):
        return None
    streams: list[tuple[str, list[PushEntry]]] = []
    for stream in push.streams:
        if stream.hash >= 1 << 63:
            return None  # see below: a varint of ten bytes
        entries = stream.entries
        timestamps = list(map(_timestamp_of, entries))
        seconds = list(map(_seconds_of, timestamps))
        nanos = list(map(_nanos_of, timestamps))
        # A value that takes a varint's ten bytes may be one that overflowed 64 bits, which
        # upb cuts to 64 and the hand-written decoder refuses: before 1970 is left to it.
        if nanos and (min(nanos) < 0 or max(nanos) >= _NS or min(seconds) < 0):
            return None
        stamps = map(add, map(mul, seconds, repeat(_NS)), nanos)
        streams.append((stream.labels, list(map(PushEntry, stamps, map(_line_of, entries)))))
    return streams
