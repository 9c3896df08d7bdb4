"""The hand-written Loki push codec: golden bytes, label quoting, malformed input, round trips."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logstack import _loki_proto
from logstack._loki_proto import (
    PushEntry,
    PushStream,
    compress_snappy,
    decode_json_push,
    decode_push_request,
    decode_push_request_raw,
    decompress_snappy,
    encode_json_push,
    encode_push_request,
    format_labels,
    is_valid_label_name,
    parse_labels,
)

# ----------------------------------------------------------------------------- golden bytes
# Each expected message is written out field by field from the protobuf wire rules:
# tag = (field_number << 3) | wire_type, LEN = 2, VARINT = 0; lengths and ints are base-128
# varints, least significant group first, high bit set on every byte but the last.


def test_golden_minimal_push() -> None:
    streams = [PushStream({"app": "x"}, [PushEntry(1_000_000_001, "hi")])]
    expected = bytes.fromhex(
        "0a 17"  # PushRequest.streams (1, LEN), 23 bytes
        "0a 09"
        + b'{app="x"}'.hex()  # StreamAdapter.labels (1, LEN), 9 bytes
        + "12 0a"  # StreamAdapter.entries (2, LEN), 10 bytes
        "0a 04"  # EntryAdapter.timestamp (1, LEN), 4 bytes
        "08 01"  # Timestamp.seconds (1, VARINT) = 1
        "10 01"  # Timestamp.nanos (2, VARINT) = 1
        "12 02" + b"hi".hex()  # EntryAdapter.line (2, LEN)
    )
    assert encode_push_request(streams) == expected
    assert decode_push_request(expected) == streams


def test_golden_multibyte_varints_metadata_and_zero_values() -> None:
    streams = [
        PushStream(
            {"b": "x y", "a": "1"},  # written sorted: {a="1", b="x y"}, 16 bytes
            [
                # epoch 0 and an empty line: the (non-nullable) timestamp is an empty
                # message, the empty line is omitted, as gogoproto does
                PushEntry(0, "", {"k": "v"}),
                # 300 s = 0b10_0101100 -> ac 02; a 200-byte line: 200 -> c8 01
                PushEntry(300 * 10**9 + 1, "x" * 200),
            ],
        )
    ]
    expected = bytes.fromhex(
        "0a f3 01"  # stream, 243 = 0x73 | 0x80, 1
        "0a 10"
        + b'{a="1", b="x y"}'.hex()  # labels, 16 bytes
        + "12 0a"  # entry 1, 10 bytes
        "0a 00"  # timestamp: empty message
        "1a 06"  # structuredMetadata (3, LEN), 6 bytes
        "0a 01 6b"  # LabelPairAdapter.name = "k"
        "12 01 76"  # LabelPairAdapter.value = "v"
        "12 d2 01"  # entry 2, 210 = 0x52 | 0x80, 1
        "0a 05 08 ac 02 10 01"  # timestamp: seconds 300, nanos 1
        "12 c8 01" + "78" * 200  # line, 200 bytes
    )
    assert encode_push_request(streams) == expected
    decoded = decode_push_request(expected)
    assert decoded == [PushStream({"a": "1", "b": "x y"}, streams[0].entries)]


def test_golden_negative_timestamp() -> None:
    # -1 ns is seconds=-1 (int64 as a 10-byte two's-complement varint), nanos=999999999
    # (999999999 = 0x7f + 0x13<<7 + 0x6b<<14 + 0x5c<<21 + 3<<28 -> ff 93 eb dc 03).
    streams = [PushStream({"a": "b"}, [PushEntry(-1, "z")])]
    expected = bytes.fromhex(
        "0a 21"
        "0a 07" + b'{a="b"}'.hex() + "12 16"
        "0a 11"
        "08 ff ff ff ff ff ff ff ff ff 01"
        "10 ff 93 eb dc 03"
        "12 01 7a"
    )
    assert encode_push_request(streams) == expected
    assert decode_push_request(expected) == streams


def test_golden_json() -> None:
    streams = [
        PushStream(
            {"service": "api"},
            [
                PushEntry(1_700_000_000_000_000_001, 'a "quoted" line'),
                PushEntry(5, "b", {"t": "1"}),
            ],
        )
    ]
    assert encode_json_push(streams) == (
        b'{"streams":[{"stream":{"service":"api"},"values":['
        b'["1700000000000000001","a \\"quoted\\" line"],["5","b",{"t":"1"}]]}]}'
    )
    assert decode_json_push(encode_json_push(streams)) == streams


def test_encode_accepts_any_iterable_and_empty_request() -> None:
    assert encode_push_request([]) == b""
    assert decode_push_request(b"") == []
    gen = (PushStream({"a": "b"}, []) for _ in range(2))
    assert decode_push_request(encode_push_request(gen)) == [PushStream({"a": "b"}, [])] * 2


# ----------------------------------------------------------------------------- labels


@pytest.mark.parametrize(
    ("labels", "text"),
    [
        ({}, "{}"),
        ({"b": "2", "a": "1"}, '{a="1", b="2"}'),
        ({"a": 'say "hi"'}, '{a="say \\"hi\\""}'),
        ({"a": "back\\slash"}, '{a="back\\\\slash"}'),
        ({"a": "tab\tnl\ncr\r"}, '{a="tab\\tnl\\ncr\\r"}'),
        ({"a": "\a\b\f\v"}, '{a="\\a\\b\\f\\v"}'),
        ({"a": "\x01\x7f"}, '{a="\\x01\\x7f"}'),
        ({"a": "\u0085\u00a0\u2028"}, '{a="\\u0085\\u00a0\\u2028"}'),  # not printable in Go
        ({"a": "\U000e0001"}, '{a="\\U000e0001"}'),
        ({"a": "é ü 日本 😀"}, '{a="é ü 日本 😀"}'),  # printable: kept as UTF-8
    ],
)
def test_format_labels_quotes_like_go(labels: dict[str, str], text: str) -> None:
    assert format_labels(labels) == text
    assert parse_labels(text) == labels


def test_parse_labels_accepts_loki_spellings() -> None:
    assert parse_labels(' { a = "1" ,b="2"} ') == {"a": "1", "b": "2"}
    assert parse_labels("{a=`raw \\n`}") == {"a": "raw \\n"}
    assert parse_labels('{a="\\u00e9\\x41\\101"}') == {"a": "éAA"}
    assert parse_labels('{a="\\xc3\\xa9"}') == {"a": "é"}  # Go strings are bytes


@pytest.mark.parametrize(
    "text",
    [
        "",
        "a",
        '{a="1"',
        'a="1"}',
        "{a=1}",
        '{1a="x"}',
        '{foo-bar="x"}',
        '{a="1",}',
        '{a="1" b="2"}',
        '{a="1", a="2"}',
        '{a="\\q"}',
        '{a="\\ud800"}',
        '{a="\\xff"}',
        '{a="1"} trailing',
        '{a="unterminated}',
    ],
)
def test_parse_labels_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_labels(text)


def test_label_name_rule() -> None:
    for good in ("a", "_", "A_b9", "__name__", "service"):
        assert is_valid_label_name(good)
    for bad in ("", "9a", "a-b", "a.b", "é", "a b", "a\n"):
        assert not is_valid_label_name(bad)


# ----------------------------------------------------------------------------- malformed input

VALID = encode_push_request([PushStream({"a": "b"}, [PushEntry(1, "x", {"k": "v"})])])


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\x0a", "truncated length"),
        (b"\x0a\x05\x0a\x01", "length past the end"),
        (VALID[:-1], "truncated inside a string"),
        (b"\x0a\x02\x08\x01", "StreamAdapter.labels sent as a varint"),
        (b"\x0a\x04\x12\x02\x0a\x05", "timestamp length past the entry"),
        (b"\x0a\x05\x12\x03\x12\x01\xff", "line is not UTF-8"),
        (b"\x0b", "group wire type"),
        (b"\x00", "field number 0"),
        (b"\x08" + b"\xff" * 11, "varint longer than 10 bytes"),
        # nanos = 10**9 (80 94 eb dc 03), without and with seconds (the decoder's fast path)
        (b"\x0a\x0a\x12\x08\x0a\x06\x10\x80\x94\xeb\xdc\x03", "nanos = 1e9"),
        (b"\x0a\x0c\x12\x0a\x0a\x08\x08\x01\x10\x80\x94\xeb\xdc\x03", "nanos = 1e9"),
        (b"\x0a\x06\x12\x04\x0a\x02\x10\x7f\x00", "trailing byte in the stream: tag 0"),
        (b"\x0d\x00\x00", "truncated fixed32"),
    ],
)
def test_malformed_protobuf_raises_value_error(data: bytes, why: str) -> None:
    with pytest.raises(ValueError):
        decode_push_request_raw(data)


def test_a_line_that_is_not_utf8_is_refused_on_the_fast_path_too() -> None:
    """The second entry of a second is decoded from the entry-head match alone (the fast
    path); a line there that is not UTF-8 gets the same ValueError as anywhere else."""
    body = encode_push_request(
        [PushStream({"a": "b"}, [PushEntry(10**9 + 5, "ab", {}), PushEntry(10**9 + 6, "cd", {})])]
    )
    assert decode_push_request_raw(body)[0][1][1].line == "cd"
    damaged = body.replace(b"cd", b"c\xff")
    with pytest.raises(ValueError, match="string field is not valid UTF-8"):
        decode_push_request_raw(damaged)


@pytest.mark.parametrize(
    ("ts_body", "expected"),
    [
        (b"", 0),
        (b"\x08\x01", 10**9),  # nanos omitted
        (b"\x10\x7f", 127),  # seconds omitted
        (b"\x10\x05\x08\x01", 10**9 + 5),  # reordered
        (b"\x08\x01\x08\x02\x10\x01", 2 * 10**9 + 1),  # repeated: the last one wins
        (b"\x08\x01\x10\x01\x18\x07", 10**9 + 1),  # an unknown field
        (b"\x08\x01\x10\xff\x93\xeb\xdc\x03", 10**9 + 999_999_999),  # 5-byte nanos
    ],
)
def test_every_valid_timestamp_encoding_decodes(ts_body: bytes, expected: int) -> None:
    entry = b"\x0a" + bytes([len(ts_body)]) + ts_body
    stream_bytes = b"\x12" + bytes([len(entry)]) + entry
    data = b"\x0a" + bytes([len(stream_bytes)]) + stream_bytes
    assert decode_push_request_raw(data) == [("", [PushEntry(expected, "")])]


def test_decoder_skips_unknown_fields() -> None:
    # PushRequest.format (2, string), StreamAdapter.hash (3), EntryAdapter.parsed (4),
    # plus unknown fixed64 / fixed32 / varint fields in between.
    entry = b"\x0a\x02\x08\x07" + b"\x12\x01x" + b"\x22\x06\x0a\x01p\x12\x01q" + b"\x29" + b"\0" * 8
    stream = (
        b"\x0a\x07" + b'{a="b"}' + b"\x18\x96\x01" + b"\x12" + bytes([len(entry)]) + entry
    ) + b"\x7d\x01\x02\x03\x04"
    data = b"\x12\x04loki" + b"\x0a" + bytes([len(stream)]) + stream + b"\x78\x05"
    assert decode_push_request(data) == [PushStream({"a": "b"}, [PushEntry(7 * 10**9, "x")])]


def test_decode_push_request_rejects_bad_labels_but_raw_keeps_them() -> None:
    data = encode_push_request([PushStream({"foo-bar": "x"}, [PushEntry(1, "l")])])
    assert decode_push_request_raw(data) == [('{foo-bar="x"}', [PushEntry(1, "l")])]
    with pytest.raises(ValueError, match="foo-bar"):
        decode_push_request(data)


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'{"streams": {}}',
        b'{"streams": [{"stream": {"a": 1}, "values": []}]}',
        b'{"streams": [{"stream": {"a": "b"}, "values": [["1"]]}]}',
        b'{"streams": [{"stream": {"a": "b"}, "values": [["1", "x", {}, "extra"]]}]}',
        b'{"streams": [{"stream": {"a": "b"}, "values": [[1, "x"]]}]}',
        b'{"streams": [{"stream": {"a": "b"}, "values": [["1.5", "x"]]}]}',
        b'{"streams": [{"stream": {"a": "b"}, "values": [["99999999999999999999", "x"]]}]}',
        b'{"streams": [{"stream": {"a": "b"}, "values": [["1", {"a": "b"}]]}]}',
        b'{"streams": [{"stream": {"a": "b"}, "values": [["1", "x", "meta"]]}]}',
        b'{"streams": [{"stream": {"a": "b"}, "values": [["1", "x", {"k": 1}]]}]}',
    ],
)
def test_malformed_json_raises_value_error(body: bytes) -> None:
    with pytest.raises(ValueError):
        decode_json_push(body)


def test_json_decoding_is_lenient_where_loki_is() -> None:
    assert decode_json_push(b"{}") == []
    body = b'{"streams": [{"stream": {"a": "b"}, "values": [["-5", "x"]], "extra": 1}]}'
    assert decode_json_push(body) == [PushStream({"a": "b"}, [PushEntry(-5, "x")])]


def test_snappy_is_a_raw_block() -> None:
    data = b"abc" * 1000
    block = compress_snappy(data)
    # A raw block starts with the uncompressed length as a varint (3000 -> b8 17);
    # the framed format would start with the stream identifier chunk ff 06 00 00 sNaPpY.
    assert block[:2] == b"\xb8\x17"
    assert decompress_snappy(block) == data
    with pytest.raises(ValueError):
        decompress_snappy(b"\xff\xff\xff\xff\x0f garbage")


# ----------------------------------------------------------------------------- properties

_names = st.from_regex(r"[a-zA-Z_][a-zA-Z0-9_]{0,12}", fullmatch=True)
_text = st.text(st.characters(codec="utf-8"), max_size=40)  # no lone surrogates
_entries = st.builds(
    PushEntry,
    timestamp_ns=st.integers(-(2**63), 2**63 - 1),
    line=_text,
    structured_metadata=st.dictionaries(_text, _text, max_size=3),
)
_streams = st.lists(
    st.builds(
        PushStream,
        labels=st.dictionaries(_names, _text, max_size=4),
        entries=st.lists(_entries, max_size=5),
    ),
    max_size=4,
)


@given(_streams)
@settings(max_examples=300)
def test_protobuf_round_trip(streams: list[PushStream]) -> None:
    data = encode_push_request(streams)
    assert decode_push_request(data) == streams
    assert decode_push_request(decompress_snappy(compress_snappy(data))) == streams


@given(_streams)
@settings(max_examples=200)
def test_json_round_trip(streams: list[PushStream]) -> None:
    assert decode_json_push(encode_json_push(streams)) == streams


@given(st.dictionaries(_names, _text, max_size=6))
def test_label_string_round_trip(labels: dict[str, str]) -> None:
    text = format_labels(labels)
    assert parse_labels(text) == labels
    assert list(parse_labels(text)) == sorted(labels)


@given(st.binary(max_size=64))
@settings(max_examples=500)
def test_arbitrary_bytes_decode_or_raise_value_error(data: bytes) -> None:
    try:
        decode_push_request(data)
    except ValueError:
        pass


@given(_streams, st.data())
@settings(max_examples=200)
def test_truncated_messages_never_crash(streams: list[PushStream], data: st.DataObject) -> None:
    encoded = encode_push_request(streams)
    cut = data.draw(st.integers(0, max(0, len(encoded) - 1)))
    try:
        decode_push_request(encoded[:cut])
    except ValueError:
        pass


def test_step_wise_encoding_gives_the_same_bytes_and_pauses_per_step() -> None:
    from logstack._loki_proto import (
        PushEntry,
        PushStream,
        encode_push_request,
        encode_push_request_steps,
        run_steps,
    )

    streams = [
        PushStream(
            {"service": "a"}, [PushEntry(1_700_000_000_000_000_000 + i, f"l{i}") for i in range(7)]
        ),
        PushStream({"service": "b"}, [PushEntry(5, "x", {"trace_id": "t"})]),
    ]
    steps = encode_push_request_steps(streams, step=2)
    encoded: list[int] = []  # what each pause says it encoded
    while True:
        try:
            encoded.append(next(steps))
        except StopIteration as done:
            body = done.value
            break
    assert encoded == [2, 2, 2, 1, 1]  # the first stream's 7 in steps of 2, the second's 1
    assert body == encode_push_request(streams) == run_steps(encode_push_request_steps(streams, 3))


# ----------------------------------------------------------------------------- the fast path

_NS = 1_000_000_000
_common_entries = st.builds(
    PushEntry,
    # Mostly a few seconds apart (the cached seconds), sometimes anywhere, sometimes 0 ns.
    timestamp_ns=st.one_of(
        st.integers(1_700_000_000 * _NS, 1_700_000_003 * _NS),
        st.integers(-(2**63), 2**63 - 1),
        st.just(0),
    ),
    line=st.one_of(_text, st.text(st.characters(codec="utf-8"), min_size=100, max_size=300)),
    structured_metadata=st.one_of(st.just({}), st.dictionaries(_text, _text, max_size=2)),
)


def _decode_generally(data: bytes) -> list[tuple[str, list[PushEntry]]] | str:
    """What the decoder gives without its fast path: the result, or the error's text."""
    original = _loki_proto._ENTRY_HEAD
    _loki_proto._ENTRY_HEAD = re.compile(rb"(?!)")  # matches nothing
    try:
        return _decode_or_error(data)
    finally:
        _loki_proto._ENTRY_HEAD = original


def _decode_or_error(data: bytes) -> list[tuple[str, list[PushEntry]]] | str:
    try:
        return decode_push_request_raw(data)
    except ValueError as exc:
        return f"ValueError: {exc}"


@given(
    st.lists(
        st.builds(
            PushStream,
            labels=st.dictionaries(_names, _text, max_size=2),
            entries=st.lists(_common_entries, max_size=8),
        ),
        max_size=3,
    ),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=3),
)
@settings(max_examples=500)
def test_fast_entry_path_decodes_exactly_as_the_general_path(
    streams: list[PushStream], changes: list[tuple[int, int]]
) -> None:
    """Clients' usual entry layout is decoded from one regex match (``_ENTRY_HEAD``); any
    push, valid or damaged (bytes replaced), must decode to the same entries or fail with the
    same error as field by field."""
    data = bytearray(encode_push_request(streams))
    for where, value in changes:
        if data:
            data[where % len(data)] = value
    assert _decode_or_error(bytes(data)) == _decode_generally(bytes(data))


def test_fast_entry_path_is_taken_for_the_usual_layout() -> None:
    entries = [PushEntry(1_700_000_000 * _NS + i, f"line {i}") for i in range(1, 4)]
    data = encode_push_request([PushStream({"a": "b"}, entries)])
    assert _loki_proto._ENTRY_HEAD.search(data) is not None
    assert decode_push_request_raw(data) == [('{a="b"}', entries)]


def test_fast_entry_path_agrees_on_every_damaged_header_byte() -> None:
    """Each byte up to the end of the first entry's head (the stream's length, its labels,
    the entry's tag, lengths and timestamp), replaced by values near it and at the varint
    boundaries: the fast path must agree with the general one every time."""
    entries = [PushEntry(1_700_000_000 * _NS + 123_456_789, "a line of text")] * 2
    data = encode_push_request([PushStream({"a": "b"}, entries)])
    head = _loki_proto._ENTRY_HEAD.search(data)
    assert head is not None
    checked = 0
    for where in range(head.end()):
        for value in {data[where] - 1, data[where] + 1, 0x00, 0x01, 0x7F, 0x80, 0xFF} - {-1, 256}:
            damaged = bytearray(data)
            damaged[where] = value
            assert _decode_or_error(bytes(damaged)) == _decode_generally(bytes(damaged))
            checked += 1
    assert checked > 80
