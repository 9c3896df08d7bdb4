"""Loki's push wire formats, hand-written: protobuf (``logproto.PushRequest``) and JSON.

No protobuf dependency: the push message is four small messages, and a hand-rolled encoder
on the forwarder hot path beats a generic runtime. The schema, as in Loki's
``pkg/push/push.proto``::

    message PushRequest      { repeated StreamAdapter streams = 1; }
    message StreamAdapter    { string labels = 1; repeated EntryAdapter entries = 2;
                               uint64 hash = 3; }
    message EntryAdapter     { google.protobuf.Timestamp timestamp = 1; string line = 2;
                               repeated LabelPairAdapter structuredMetadata = 3; }
    message LabelPairAdapter { string name = 1; string value = 2; }
    message Timestamp        { int64 seconds = 1; int32 nanos = 2; }

On the HTTP wire the protobuf body is a *raw* snappy block (not the framed format);
``Content-Type: application/json`` selects the JSON format instead, which may be gzipped.

The encoder writes what Go's gogoproto writes (zero scalars and empty strings omitted, the
non-nullable timestamp always present), so golden bytes match Loki's own client. The decoder
is strict where Go is (truncation, wrong wire types, nanos out of range) and skips unknown
fields (``PushRequest.format``, ``EntryAdapter.parsed``, future additions) as protobuf must.
"""

from __future__ import annotations

import re
from collections.abc import Generator, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

import cramjam
import msgspec

T = TypeVar("T")

__all__ = [
    "PushEntry",
    "PushErrorReport",
    "PushRejection",
    "PushStream",
    "compress_snappy",
    "decode_json_push",
    "decode_push_request",
    "decompress_snappy",
    "encode_json_push",
    "encode_push_request",
    "format_labels",
    "go_time_string",
    "is_valid_label_name",
    "parse_go_time",
    "parse_labels",
    "parse_push_error",
    "rfc3339_seconds",
    "sanitize_label_name",
]


class PushEntry(msgspec.Struct, gc=False):
    """One log line of a Loki stream."""

    timestamp_ns: int
    """Nanoseconds since the Unix epoch; must fit a signed 64-bit integer (as in Loki)."""
    line: str
    structured_metadata: dict[str, str] = {}
    """Loki structured metadata (per-entry key/value pairs that are not stream labels)."""


class PushStream(msgspec.Struct, gc=False):
    """A Loki stream: its label set and entries, in push order."""

    labels: dict[str, str]
    entries: list[PushEntry]


# --------------------------------------------------------------------------- varints

_NS = 1_000_000_000
_MASK64 = (1 << 64) - 1

# Varints below 2**14 are one or two bytes: precomputed, as are the same prefixed with the
# one-byte tags the encoder writes before a length (field 1 and field 2, wire type LEN).
_VARINT: list[bytes] = [bytes((i,)) for i in range(0x80)] + [
    bytes(((i & 0x7F) | 0x80, i >> 7)) for i in range(0x80, 1 << 14)
]
# A 14-bit group that is *not* the last one of a varint (continuation bit on both bytes).
_GROUP14: list[bytes] = [bytes(((i & 0x7F) | 0x80, (i >> 7) | 0x80)) for i in range(1 << 14)]
_TAG1_LEN: list[bytes] = [b"\x0a" + v for v in _VARINT]
_TAG2_LEN: list[bytes] = [b"\x12" + v for v in _VARINT]


def _uvarint(value: int) -> bytes:
    """Unsigned LEB128; negative int64/int32 values must be masked to 64 bits first."""
    if value < 0x4000:
        return _VARINT[value]
    out = bytearray()
    while value >= 0x4000:
        out += _GROUP14[value & 0x3FFF]
        value >>= 14
    out += _VARINT[value]
    return bytes(out)


# --------------------------------------------------------------------------- labels

_LABEL_NAME_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
_GO_ESCAPES = {
    "\a": "\\a",
    "\b": "\\b",
    "\f": "\\f",
    "\n": "\\n",
    "\r": "\\r",
    "\t": "\\t",
    "\v": "\\v",
    "\\": "\\\\",
    '"': '\\"',
}


def is_valid_label_name(name: str) -> bool:
    """Whether Loki accepts ``name`` as a stream label name (``[a-zA-Z_][a-zA-Z0-9_]*``)."""
    return _LABEL_NAME_RE.match(name) is not None


_INVALID_LABEL_CHARS = re.compile(r"[^a-zA-Z0-9_]")


def sanitize_label_name(name: str) -> str:
    """A name Loki accepts for ``name``: every other character becomes ``_``, and a leading
    digit (or an empty name) gets a ``_`` prefix, as Prometheus' ``model.LabelName`` rules
    demand. Valid names are returned unchanged."""
    if is_valid_label_name(name):
        return name
    out = _INVALID_LABEL_CHARS.sub("_", name)
    return out if out and not out[0].isdigit() else "_" + out


def _go_quote(value: str) -> str:
    """``strconv.Quote`` as Go (and so Prometheus' ``Labels.String``) writes it."""
    if value.isprintable() and '"' not in value and "\\" not in value:
        return f'"{value}"'
    out = ['"']
    for ch in value:
        esc = _GO_ESCAPES.get(ch)
        if esc is not None:
            out.append(esc)
        elif ch.isprintable():
            out.append(ch)
        else:
            cp = ord(ch)
            if cp < 0x20 or cp == 0x7F:
                out.append(f"\\x{cp:02x}")
            elif 0xD800 <= cp <= 0xDFFF:  # not a valid rune: Go writes U+FFFD
                out.append("\\ufffd")
            elif cp < 0x10000:
                out.append(f"\\u{cp:04x}")
            else:
                out.append(f"\\U{cp:08x}")
    out.append('"')
    return "".join(out)


def format_labels(labels: Mapping[str, str]) -> str:
    """Loki's canonical label string, ``{a="b", c="d"}``: keys sorted, values Go-quoted.

    Names are not checked here (the forwarder's are validated once, at config time); Loki
    answers 400 to a stream whose names are invalid, see :func:`is_valid_label_name`.
    """
    return "{" + ", ".join(f"{name}={_go_quote(labels[name])}" for name in sorted(labels)) + "}"


_LABEL_PAIR_RE = re.compile(
    r"""\s*([^\s=,{}"`]+)\s*=\s*(?:"((?:[^"\\\n]|\\.)*)"|`([^`]*)`)\s*(,|\})""", re.DOTALL
)
_UNESCAPE_RE = re.compile(
    rb"\\(?:x([0-9a-fA-F]{2})|([0-7]{3})|u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8})|(.))", re.DOTALL
)
_SIMPLE_UNESCAPES = {
    b"a": b"\a",
    b"b": b"\b",
    b"f": b"\f",
    b"n": b"\n",
    b"r": b"\r",
    b"t": b"\t",
    b"v": b"\v",
    b"\\": b"\\",
    b'"': b'"',
}


def _unescape_match(m: re.Match[bytes]) -> bytes:
    hex2, octal, hex4, hex8, simple = m.groups()
    if hex2 is not None:
        return bytes((int(hex2, 16),))
    if octal is not None:
        code = int(octal, 8)
        if code > 0xFF:
            raise ValueError(f"octal escape out of range: \\{octal.decode()}")
        return bytes((code,))
    wide = hex4 if hex4 is not None else hex8
    if wide is not None:
        cp = int(wide, 16)
        if cp > 0x10FFFF or 0xD800 <= cp <= 0xDFFF:
            raise ValueError(f"invalid unicode escape: {m.group(0).decode()}")
        return chr(cp).encode()
    out = _SIMPLE_UNESCAPES.get(simple)
    if out is None:
        raise ValueError(f"invalid escape sequence: \\{simple.decode(errors='replace')}")
    return out


def _go_unquote(body: str) -> str:
    if "\\" not in body:
        return body
    raw = _UNESCAPE_RE.sub(_unescape_match, body.encode("utf-8", "surrogatepass"))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"label value is not valid UTF-8: {exc}") from None


def parse_labels(text: str) -> dict[str, str]:
    """Parse a Loki label string (``{a="b", c="d"}``) as Loki's push path does.

    Raises ``ValueError`` on syntax errors, invalid label names and duplicate names.
    """
    s = text.strip()
    if not s.startswith("{"):
        raise ValueError(f"labels must start with '{{': {text!r}")
    if s[1:].strip() == "}":
        return {}
    labels: dict[str, str] = {}
    pos = 1
    end = len(s)
    while True:
        m = _LABEL_PAIR_RE.match(s, pos)
        if m is None:
            raise ValueError(f"malformed label string at offset {pos}: {text!r}")
        name, quoted, raw, sep = m.groups()
        if not is_valid_label_name(name):
            raise ValueError(f"invalid label name {name!r}")
        if name in labels:
            raise ValueError(f"duplicate label name {name!r}")
        labels[name] = _go_unquote(quoted) if quoted is not None else raw
        pos = m.end()
        if sep == "}":
            break
    if pos != end:
        raise ValueError(f"unexpected text after labels: {s[pos:]!r}")
    return labels


# --------------------------------------------------------------------------- protobuf encode


_name_fields: dict[str, bytes] = {}


def _encode_pairs(pairs: Mapping[str, str]) -> bytes:
    """``repeated LabelPairAdapter structuredMetadata = 3`` of one entry."""
    out: list[bytes] = []
    for name, value in pairs.items():
        name_field = _name_fields.get(name)  # names repeat from entry to entry: cached
        if name_field is None:
            nb = name.encode()
            name_field = b"\x0a" + _uvarint(len(nb)) + nb if nb else b""
            if len(_name_fields) >= 1024:
                _name_fields.clear()
            _name_fields[name] = name_field
        vb = value.encode()
        n = len(vb)
        value_head = b"" if not n else _TAG2_LEN[n] if n < 0x4000 else b"\x12" + _uvarint(n)
        size = len(name_field) + len(value_head) + n
        out.append(b"".join((b"\x1a", _uvarint(size), name_field, value_head, vb)))
    return out[0] if len(out) == 1 else b"".join(out)


EncodedEntry = tuple[Any, int, bytes, Mapping[str, str] | None]
"""An entry as :func:`encode_entry_fields` takes it: its stream (any hashable key), timestamp
(ns), line (UTF-8) and structured metadata (``None`` or empty for none)."""


def encode_entry_fields(entries: Iterable[EncodedEntry], streams: dict[Any, list[bytes]]) -> None:
    """Append each entry's ``EntryAdapter`` field (tag, length, body) to the list of its stream
    in ``streams`` (a new list for a stream seen first), keeping the entries' order.

    Entries mostly come in runs of one stream under one key object: an identity test finds
    the run's list without hashing the key again."""
    varint = _VARINT
    group = _GROUP14
    tag1 = _TAG1_LEN
    tag2 = _TAG2_LEN
    last_sec: int | None = None
    sec_field = b""
    last_stream: Any = streams  # no entry's stream key is this dict
    parts: list[bytes] = []
    for stream, timestamp_ns, line, metadata in entries:
        if stream is not last_stream:
            last_stream = stream
            found = streams.get(stream)
            if found is None:
                found = streams[stream] = []
            parts = found
        sec, nanos = divmod(timestamp_ns, _NS)
        if sec != last_sec:  # consecutive entries mostly share their second
            last_sec = sec
            sec_field = b"\x08" + _uvarint(sec & _MASK64) if sec else b""
        # Timestamp body: seconds (field 1) then nanos (field 2, < 2**30); zeros omitted.
        if nanos < 0x4000:
            ts = sec_field + b"\x10" + varint[nanos] if nanos else sec_field
        elif nanos < 0x10000000:
            ts = sec_field + b"\x10" + group[nanos & 0x3FFF] + varint[nanos >> 14]
        else:
            ts = b"%b\x10%b%b%b" % (
                sec_field,
                group[nanos & 0x3FFF],
                group[(nanos >> 14) & 0x3FFF],
                varint[nanos >> 28],
            )
        n = len(line)
        line_head = b"" if not n else tag2[n] if n < 0x4000 else b"\x12" + _uvarint(n)
        head = tag1[len(ts)] + ts + line_head
        if metadata:
            sm_bytes = _encode_pairs(metadata)
            size = len(head) + n + len(sm_bytes)
            parts.append(tag2[size] if size < 0x4000 else b"\x12" + _uvarint(size))
            parts.append(head)
            parts.append(line)
            parts.append(sm_bytes)
        else:
            size = len(head) + n
            parts.append(tag2[size] if size < 0x4000 else b"\x12" + _uvarint(size))
            parts.append(head)
            parts.append(line)


def append_stream_field(labels: Mapping[str, str], fields: list[bytes], out: list[bytes]) -> None:
    """Append one ``StreamAdapter`` field of ``PushRequest`` to ``out``: its tag and length,
    the stream's labels, then its ``fields`` (from :func:`encode_entry_fields`), uncopied."""
    label_bytes = format_labels(labels).encode()
    label_head = b"\x0a" + _uvarint(len(label_bytes))
    size = len(label_head) + len(label_bytes) + sum(map(len, fields))
    out.append(b"\x0a" + _uvarint(size))
    out.append(label_head)
    out.append(label_bytes)
    out.extend(fields)


def encode_push_request(streams: Iterable[PushStream]) -> bytes:
    """Serialise a ``logproto.PushRequest`` (uncompressed; see :func:`compress_snappy`)."""
    return run_steps(encode_push_request_steps(streams))


def encode_push_request_steps(
    streams: Iterable[PushStream], step: int = 100
) -> Generator[int, None, bytes]:
    """``encode_push_request`` that pauses after every ``step`` entries, yielding how many it
    encoded, so a caller on an event loop can let other tasks run while a large push is
    encoded (and decide how often)."""
    out: list[bytes] = []
    for stream in streams:
        fields: dict[Any, list[bytes]] = {None: []}
        entries = stream.entries
        for start in range(0, len(entries), step):
            chunk = entries[start : start + step]
            encode_entry_fields(
                ((None, e.timestamp_ns, e.line.encode(), e.structured_metadata) for e in chunk),
                fields,
            )
            yield len(chunk)
        append_stream_field(stream.labels, fields[None], out)
    return b"".join(out)


def run_steps(steps: Generator[Any, None, T]) -> T:
    """Run a step-wise computation to its end at once and return its result."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            result: T = done.value
            return result


# --------------------------------------------------------------------------- protobuf decode


def _read_varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while pos < end:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            if shift == 63 and byte > 1:
                raise ValueError("varint overflows 64 bits")
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint longer than 10 bytes")
    raise ValueError("truncated varint")


def _read_len(data: bytes, pos: int, end: int) -> tuple[int, int]:
    """A length prefix: returns (start, stop) of the delimited bytes."""
    if pos < end and data[pos] < 0x80:
        size = data[pos]
        pos += 1
    else:
        size, pos = _read_varint(data, pos, end)
    stop = pos + size
    if stop > end:
        raise ValueError(f"length {size} at offset {pos} runs past the end of its message")
    return pos, stop


def _skip_field(data: bytes, pos: int, end: int, tag: int, known: dict[int, int]) -> int:
    """Skip a field not read; ``known`` maps schema fields to their wire type (a mismatch
    is an error, as in Go)."""
    field, wire_type = tag >> 3, tag & 7
    if field == 0:
        raise ValueError("invalid field number 0")
    if known.get(field, wire_type) != wire_type:
        raise ValueError(f"field {field} has wrong wire type {wire_type}")
    if wire_type == 0:
        _, pos = _read_varint(data, pos, end)
        return pos
    if wire_type == 2:
        _, pos = _read_len(data, pos, end)
        return pos
    if wire_type == 1:
        pos += 8
    elif wire_type == 5:
        pos += 4
    else:
        raise ValueError(f"unsupported wire type {wire_type}")
    if pos > end:
        raise ValueError("truncated fixed-width field")
    return pos


def _read_tag(data: bytes, pos: int, end: int) -> tuple[int, int]:
    tag = data[pos]
    if tag < 0x80:
        return tag, pos + 1
    return _read_varint(data, pos, end)


def _decode_str(data: bytes, start: int, stop: int) -> str:
    try:
        return data[start:stop].decode()
    except UnicodeDecodeError as exc:
        raise ValueError(f"string field is not valid UTF-8: {exc}") from None


# field number -> wire type (0 varint, 2 length-delimited), per message
_KNOWN_REQUEST = {1: 2, 2: 2}
_KNOWN_STREAM = {1: 2, 2: 2, 3: 0}
_KNOWN_ENTRY = {1: 2, 2: 2, 3: 2, 4: 2}
_KNOWN_PAIR = {1: 2, 2: 2}
_KNOWN_TS = {1: 0, 2: 0}


def _int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


# The layout every client writes: seconds then nanos, both present, nanos at most 5 bytes.
# Matching it with a regex and joining the 7-bit groups arithmetically is ~2x faster than a
# byte loop; the seconds of consecutive entries repeat, so they come from a small cache.
_TS_LAYOUT = re.compile(rb"\x08([\x80-\xff]{0,9}[\x00-\x7f])\x10([\x80-\xff]{0,4}[\x00-\x7f])\Z")
_seconds_cache: dict[bytes, int] = {}


def _decode_timestamp(data: bytes, pos: int, end: int) -> int:
    m = _TS_LAYOUT.match(data, pos, end)
    if m is None:
        return _decode_timestamp_fields(data, pos, end)
    sec_bytes, nano_bytes = m.groups()
    seconds_ns = _seconds_cache.get(sec_bytes)
    if seconds_ns is None:
        seconds_ns = _int64(_read_varint(sec_bytes, 0, len(sec_bytes))[0]) * _NS
        if len(_seconds_cache) >= 4096:
            _seconds_cache.clear()
        _seconds_cache[sec_bytes] = seconds_ns
    nanos = _small_varint(nano_bytes)
    if nanos >= _NS:
        raise ValueError(f"timestamp nanos out of range: {nanos}")
    return seconds_ns + nanos


_SHORT_VARINTS: dict[bytes, int] = {v: i for i, v in enumerate(_VARINT)}
"""Every varint of one or two bytes, by its bytes: lengths of lines and entries."""


def _small_varint(varint: bytes) -> int:
    """The value of a well-formed varint of 1 to 5 bytes (at most 35 bits): its 7-bit
    groups joined arithmetically, which is much faster than a byte loop."""
    if len(varint) == 1:
        return varint[0]
    v = int.from_bytes(varint, "little")
    return (
        (v & 0x7F)
        | (v >> 1 & 0x3F80)
        | (v >> 2 & 0x1FC000)
        | (v >> 3 & 0xFE00000)
        | (v >> 4 & 0x7F0000000)
    )


def _decode_timestamp_fields(data: bytes, pos: int, end: int) -> int:
    """Any valid ``Timestamp`` encoding: fields omitted, repeated, reordered or unknown."""
    seconds = 0
    nanos = 0
    while pos < end:
        tag, pos = _read_tag(data, pos, end)
        if tag == 0x08:
            seconds, pos = _read_varint(data, pos, end)
        elif tag == 0x10:
            nanos, pos = _read_varint(data, pos, end)
        else:
            pos = _skip_field(data, pos, end, tag, _KNOWN_TS)
    nanos = _int64(nanos)
    if not 0 <= nanos < _NS:
        raise ValueError(f"timestamp nanos out of range: {nanos}")
    return _int64(seconds) * _NS + nanos


def _decode_pair(data: bytes, pos: int, end: int) -> tuple[str, str]:
    name = value = ""
    while pos < end:
        tag, pos = _read_tag(data, pos, end)
        if tag == 0x0A:
            start, pos = _read_len(data, pos, end)
            name = _decode_str(data, start, pos)
        elif tag == 0x12:
            start, pos = _read_len(data, pos, end)
            value = _decode_str(data, start, pos)
        else:
            pos = _skip_field(data, pos, end, tag, _KNOWN_PAIR)
    return name, value


def _decode_entry(data: bytes, pos: int, end: int) -> PushEntry:
    ts = 0
    line = ""
    metadata: dict[str, str] = {}
    while pos < end:
        tag = data[pos]
        if tag < 0x80:
            pos += 1
        else:
            tag, pos = _read_varint(data, pos, end)
        # Every EntryAdapter field is length-delimited; lengths read inline (hot path).
        if tag == 0x0A or tag == 0x12 or tag == 0x1A or tag == 0x22:
            if pos < end and data[pos] < 0x80:
                stop = pos + 1 + data[pos]
                pos += 1
            else:
                size, pos = _read_varint(data, pos, end)
                stop = pos + size
            if stop > end:
                raise ValueError(f"length at offset {pos} runs past the end of its entry")
            if tag == 0x12:
                line = _decode_str(data, pos, stop)
            elif tag == 0x0A:
                ts = _decode_timestamp(data, pos, stop)
            elif tag == 0x1A:
                name, value = _decode_pair(data, pos, stop)
                metadata[name] = value
            # 0x22, ``parsed``: query-path only, ignored on push
            pos = stop
        else:
            pos = _skip_field(data, pos, end, tag, _KNOWN_ENTRY)
    return PushEntry(ts, line, metadata)


# An entry as every client writes it, up to its line: the StreamAdapter's entry tag and
# length, the timestamp (seconds and nanos, both present), the line's tag and length. An
# entry that is exactly this plus its line is decoded from the match alone; any other
# layout (metadata, zero seconds or nanos, empty line, unknown fields) takes the general path.
_ENTRY_HEAD = re.compile(
    rb"\x12([\x80-\xff]{0,4}[\x00-\x7f])\x0a([\x00-\x7f])"
    rb"\x08([\x80-\xff]{0,9}[\x00-\x7f])\x10([\x80-\xff]{0,4}[\x00-\x7f])"
    rb"\x12([\x80-\xff]{0,4}[\x00-\x7f])"
)


def _decode_stream(data: bytes, pos: int, end: int) -> tuple[str, list[PushEntry]]:
    try:
        return _decode_entries(data, pos, end)
    except UnicodeDecodeError as exc:  # a line decoded on the fast path
        raise ValueError(f"string field is not valid UTF-8: {exc}") from None


def _decode_entries(data: bytes, pos: int, end: int) -> tuple[str, list[PushEntry]]:
    labels = ""
    entries: list[PushEntry] = []
    append = entries.append
    head = _ENTRY_HEAD.match
    short = _SHORT_VARINTS
    seconds_cache = _seconds_cache
    from_bytes = int.from_bytes
    while pos < end:
        m = head(data, pos, end)
        if m is not None:  # the fast path: see _ENTRY_HEAD
            size, ts_size, sec, nano_bytes, line_size = m.groups()
            line_start = m.end()
            n = short.get(line_size)
            stop = line_start + (n if n is not None else _small_varint(line_size))
            n = short.get(size)
            # The first entry of each second goes the general way, which caches the second.
            seconds_ns = seconds_cache.get(sec)
            if (
                seconds_ns is not None
                and stop == m.end(1) + (n if n is not None else _small_varint(size))
                and stop <= end
                and ts_size[0] == len(sec) + len(nano_bytes) + 2
            ):
                # _small_varint, inlined: this loop runs once per entry of every push.
                v = from_bytes(nano_bytes, "little")
                nanos = (
                    (v & 0x7F)
                    | (v >> 1 & 0x3F80)
                    | (v >> 2 & 0x1FC000)
                    | (v >> 3 & 0xFE00000)
                    | (v >> 4 & 0x7F0000000)
                )
                if nanos >= _NS:
                    raise ValueError(f"timestamp nanos out of range: {nanos}")
                append(PushEntry(seconds_ns + nanos, data[line_start:stop].decode(), {}))
                pos = stop
                continue
        tag, pos = _read_tag(data, pos, end)
        if tag == 0x12:
            start, pos = _read_len(data, pos, end)
            append(_decode_entry(data, start, pos))
        elif tag == 0x0A:
            start, pos = _read_len(data, pos, end)
            labels = _decode_str(data, start, pos)
        elif tag == 0x18:  # hash: ignored, Loki recomputes it
            _, pos = _read_varint(data, pos, end)
        else:
            pos = _skip_field(data, pos, end, tag, _KNOWN_STREAM)
    return labels, entries


def decode_push_request_raw(data: bytes) -> list[tuple[str, list[PushEntry]]]:
    """Decode a ``PushRequest`` keeping each stream's label string unparsed.

    This is what Loki's distributor sees: a push is decoded as a whole (malformed bytes
    fail the request), then each stream's labels are parsed and validated on their own.
    """
    data = bytes(data)
    streams: list[tuple[str, list[PushEntry]]] = []
    pos = 0
    end = len(data)
    try:
        while pos < end:
            tag, pos = _read_tag(data, pos, end)
            if tag == 0x0A:
                start, pos = _read_len(data, pos, end)
                streams.append(_decode_stream(data, start, pos))
            else:
                pos = _skip_field(data, pos, end, tag, _KNOWN_REQUEST)
    except IndexError:  # pragma: no cover - every read is bounds-checked; belt and braces
        raise ValueError("truncated protobuf message") from None
    return streams


def decode_push_request(data: bytes) -> list[PushStream]:
    """Decode an uncompressed ``PushRequest``; ``ValueError`` on malformed input or labels."""
    return [
        PushStream(parse_labels(labels), entries)
        for labels, entries in decode_push_request_raw(data)
    ]


# --------------------------------------------------------------------------- snappy


def compress_snappy(data: bytes) -> bytes:
    """A raw snappy block (not the framed format), as Loki expects a protobuf push."""
    return bytes(cramjam.snappy.compress_raw(data))


def decompress_snappy(data: bytes) -> bytes:
    """Inverse of :func:`compress_snappy`; ``ValueError`` if ``data`` is not a snappy block."""
    try:
        return bytes(cramjam.snappy.decompress_raw(data))
    except Exception as exc:  # cramjam.DecompressionError is not a ValueError
        raise ValueError(f"invalid snappy block: {exc}") from None


# --------------------------------------------------------------------------- JSON

_json_encoder = msgspec.json.Encoder()


class _JsonStream(msgspec.Struct):
    stream: dict[str, str] = {}
    values: list[list[str | dict[str, str]]] = []


class _JsonPush(msgspec.Struct):
    streams: list[_JsonStream] = []


_json_decoder = msgspec.json.Decoder(_JsonPush)
_TS_RE = re.compile(r"[+-]?[0-9]+\Z")


def encode_json_push(streams: Iterable[PushStream]) -> bytes:
    """Loki's JSON push body: ``{"streams":[{"stream":{..},"values":[["<ns>","line"],..]}]}``.

    An entry with structured metadata gets it as a third element, a string→string object.
    """
    out: list[dict[str, Any]] = []
    for stream in streams:
        values: list[list[Any]] = [
            [str(e.timestamp_ns), e.line, e.structured_metadata]
            if e.structured_metadata
            else [str(e.timestamp_ns), e.line]
            for e in stream.entries
        ]
        out.append({"stream": stream.labels, "values": values})
    return _json_encoder.encode({"streams": out})


def decode_json_push(data: bytes) -> list[PushStream]:
    """Decode a JSON push body; ``ValueError`` on malformed JSON or shape.

    Label names are not validated here (Loki validates them per stream, after decoding).
    """
    try:
        push = _json_decoder.decode(data)
    except msgspec.MsgspecError as exc:
        raise ValueError(f"malformed JSON push body: {exc}") from None
    streams: list[PushStream] = []
    for i, stream in enumerate(push.streams):
        entries: list[PushEntry] = []
        for j, value in enumerate(stream.values):
            where = f"streams[{i}].values[{j}]"
            if not 2 <= len(value) <= 3:
                raise ValueError(f"{where}: expected [timestamp, line(, metadata)]")
            ts, line = value[0], value[1]
            if not isinstance(ts, str) or _TS_RE.match(ts) is None:
                raise ValueError(f"{where}: timestamp must be a string of integer nanoseconds")
            if not isinstance(line, str):
                raise ValueError(f"{where}: line must be a string")
            ts_ns = int(ts)
            if not -(1 << 63) <= ts_ns < 1 << 63:
                raise ValueError(f"{where}: timestamp out of the int64 range")
            metadata: dict[str, str] = {}
            if len(value) == 3:
                third = value[2]
                if not isinstance(third, dict):
                    raise ValueError(f"{where}: structured metadata must be an object")
                metadata = third
            entries.append(PushEntry(ts_ns, line, metadata))
        streams.append(PushStream(dict(stream.stream), entries))
    return streams


# --------------------------------------------------------------------------- Loki's answers
#
# A push answered 400 names what Loki refused in free text. Two producers write it:
#
# * the distributor validates every stream and entry and answers with all problems as Go's
#   ``util.GroupedErrors``: one message, or several joined by ``"; "``, each then prefixed
#   ``"<n> errors like: "`` (identical messages are grouped and counted);
# * an ingester refuses entries of one stream (out of order, too far behind) and lists at
#   most ``max_returned_errors`` (10) of them, one line each, then a trailer
#   ``user '<tenant>', total ignored: <n> out of <m> for stream: <labels>``. When an ingester
#   answers like this, the distributor's own validation messages are *not* returned, and
#   only the last failing stream of the push is reported.
#
# Timestamps: the distributor formats them with ``time.RFC3339`` (whole seconds), the
# ingester's line prefix with Go's ``Time.String()`` (nanoseconds, trailing zeros dropped).

_NS_PER_S = 1_000_000_000


def go_time_string(ns: int) -> str:
    """Go's ``time.Time.String()`` of ``ns`` in UTC: ``2006-01-02 15:04:05.999999999 +0000 UTC``."""
    seconds, nanos = divmod(ns, _NS_PER_S)
    try:
        base = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S")
    except (OverflowError, OSError, ValueError):
        return f"{ns}ns"
    frac = f".{nanos:09d}".rstrip("0") if nanos else ""
    return f"{base}{frac} +0000 UTC"


def rfc3339_seconds(ns: int) -> str:
    """Go's ``Format(time.RFC3339)`` of ``ns`` in UTC: whole seconds, ``Z``."""
    try:
        return datetime.fromtimestamp(ns // _NS_PER_S, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return f"{ns}ns"


_GO_TIME_RE = re.compile(
    r"(\d{4}-\d{2}-\d{2}) (\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))? ([+-])(\d{2})(\d{2})(?: \S+)?\Z"
)
_RFC3339_RE = re.compile(
    r"(\d{4}-\d{2}-\d{2})T(\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?(?:Z|([+-])(\d{2}):(\d{2}))\Z"
)


def _to_ns(day: str, clock: str, frac: str | None, sign: str | None, hh: str, mm: str) -> int:
    base = datetime.strptime(f"{day} {clock}", "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    seconds = int(base.timestamp())
    if sign:
        offset = int(hh) * 3600 + int(mm) * 60
        seconds -= offset if sign == "+" else -offset
    return seconds * _NS_PER_S + (int(frac.ljust(9, "0")) if frac else 0)


def parse_go_time(text: str) -> int | None:
    """Nanoseconds of a Go ``Time.String()`` or RFC 3339 text; ``None`` if it is neither."""
    text = text.strip()
    m = _GO_TIME_RE.match(text)
    try:
        if m is not None:
            return _to_ns(*m.groups())
        m = _RFC3339_RE.match(text)
        if m is not None:
            day, clock, frac, sign, hh, mm = m.groups()
            return _to_ns(day, clock, frac, sign, hh or "0", mm or "0")
    except ValueError:
        return None
    return None


RejectionScope = Literal["entry", "second", "line_length", "stream", "structured_metadata"]


@dataclass(frozen=True, slots=True)
class PushRejection:
    """One refusal Loki named: which entries of which stream, and why.

    ``scope`` says how the entries are identified within ``stream``: ``entry`` by exact
    timestamp (``value`` in ns), ``second`` by timestamp truncated to seconds (``value`` in s),
    ``line_length`` by the line's byte length, ``structured_metadata`` every entry carrying
    structured metadata, ``stream`` every entry.
    """

    stream: str
    """The stream's label string as Loki printed it (``{a="b", c="d"}``)."""
    scope: RejectionScope
    value: int | None
    message: str
    count: int = 1
    """How many refusals this message stands for (Go's ``"<n> errors like: "``)."""


@dataclass(slots=True)
class PushErrorReport:
    """What a 400 body says was refused (see :func:`parse_push_error`)."""

    rejections: list[PushRejection] = field(default_factory=list)
    unrecognized: list[str] = field(default_factory=list)
    """Messages that name no stream this parser understands."""
    ingester_stream: str | None = None
    """Set when the answer is an ingester's: the one stream it reports on."""
    ingester_ignored: int | None = None
    ingester_total: int | None = None


_STREAM = r"(\{(?:[^\"{}]|\"(?:[^\"\\]|\\.)*\")*\})"
_GROUP_SPLIT = re.compile(r"; (?=\d+ errors like: )")
_GROUP_PREFIX = re.compile(r"(\d+) errors like: ")
_DISTRIBUTOR_MESSAGES: list[tuple[re.Pattern[str], RejectionScope, str | None]] = [
    (
        re.compile(
            rf"Max entry size '\d+' bytes exceeded for stream '{_STREAM}' while adding an entry "
            r"with length '(\d+)' bytes"
        ),
        "line_length",
        "int",
    ),
    (
        re.compile(rf"entry for stream '{_STREAM}' has timestamp too old: (\S+), oldest"),
        "second",
        "time",
    ),
    (re.compile(rf"entry for stream '{_STREAM}' has timestamp too new: (\S+)"), "second", "time"),
    (
        re.compile(rf"stream '{_STREAM}' includes structured metadata, but"),
        "structured_metadata",
        None,
    ),
    (
        re.compile(rf"stream '{_STREAM}' has structured metadata too large"),
        "structured_metadata",
        None,
    ),
    (
        re.compile(rf"stream '{_STREAM}' has too many structured metadata"),
        "structured_metadata",
        None,
    ),
    (re.compile(rf"Error parsing labels '{_STREAM}' with error"), "stream", None),
    (re.compile(rf"entry for stream '{_STREAM}' has \d+ label names; limit"), "stream", None),
    (re.compile(rf"stream '{_STREAM}' has label (?:name|value) too long"), "stream", None),
    (re.compile(rf"stream '{_STREAM}' has duplicate label name"), "stream", None),
    (re.compile(rf"missing required labels .* for stream {_STREAM}"), "stream", None),
]
_INGESTER_TRAILER = re.compile(
    rf"user '[^']*', total ignored: (\d+) out of (\d+) for stream: {_STREAM}\s*\Z"
)
_INGESTER_LINE = re.compile(r"entry with timestamp (.+?) ignored, reason: '(.*)',\Z")


def parse_push_error(text: str) -> PushErrorReport:
    """Read a Loki 400 body into the refusals it names.

    Whatever this cannot attribute to a stream lands in ``unrecognized``; callers must then
    assume that any entry of the push may have been refused.
    """
    report = PushErrorReport()
    body = text.strip()
    if not body:
        return report
    lines = body.split("\n")
    trailer = _INGESTER_TRAILER.match(lines[-1].strip())
    if trailer is not None:
        ignored, total, stream = trailer.groups()
        report.ingester_stream = stream
        report.ingester_ignored = int(ignored)
        report.ingester_total = int(total)
        for line in lines[:-1]:
            m = _INGESTER_LINE.match(line.strip())
            ts = parse_go_time(m.group(1)) if m else None
            if m is None or ts is None:
                if line.strip():
                    report.unrecognized.append(line.strip())
                continue
            report.rejections.append(PushRejection(stream, "entry", ts, m.group(2)))
        return report
    for item in _GROUP_SPLIT.split(body):
        count = 1
        prefix = _GROUP_PREFIX.match(item)
        if prefix is not None:
            count = int(prefix.group(1))
            item = item[prefix.end() :]
        item = item.strip()
        for pattern, scope, kind in _DISTRIBUTOR_MESSAGES:
            m = pattern.search(item)
            if m is None:
                continue
            value: int | None = None
            if kind == "int":
                value = int(m.group(2))
            elif kind == "time":
                ns = parse_go_time(m.group(2))
                if ns is None:
                    continue
                value = ns // _NS_PER_S
            report.rejections.append(PushRejection(m.group(1), scope, value, item, count))
            break
        else:
            report.unrecognized.append(item)
    return report
