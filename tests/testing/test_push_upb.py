"""The stand-in's upb decoder: it answers only where the hand-written decoder agrees."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logstack._loki_proto import PushEntry, PushStream, decode_push_request_raw, encode_push_request
from logstack.testing._push_upb import AVAILABLE, decode_usual_push

_NS = 1_000_000_000
_text = st.text(st.characters(codec="utf-8"), max_size=12)
_lines = st.one_of(_text, st.text(st.characters(codec="utf-8"), min_size=100, max_size=300))
_timestamps = st.one_of(
    st.integers(1_700_000_000 * _NS, 1_700_000_003 * _NS),
    st.integers(-(2**63), 2**63 - 1),
    st.just(0),
)
_plain_entries = st.builds(  # the usual form: no metadata, a timestamp since 1970
    PushEntry,
    timestamp_ns=st.one_of(
        st.integers(1_700_000_000 * _NS, 1_700_000_003 * _NS), st.integers(0, 2**63 - 1)
    ),
    line=_lines,
)
_any_entries = st.builds(
    PushEntry,
    timestamp_ns=_timestamps,
    line=_lines,
    structured_metadata=st.one_of(st.just({}), st.dictionaries(_text, _text, max_size=2)),
)


def _streams(entries: st.SearchStrategy[PushEntry]) -> st.SearchStrategy[list[PushStream]]:
    return st.lists(
        st.builds(
            PushStream,
            labels=st.dictionaries(
                st.from_regex(r"[a-z_]{1,5}", fullmatch=True), _text, max_size=2
            ),
            entries=st.lists(entries, max_size=8),
        ),
        max_size=3,
    )


def _reference(data: bytes) -> list[tuple[str, list[PushEntry]]] | str:
    try:
        return decode_push_request_raw(data)
    except ValueError as exc:
        return f"ValueError: {exc}"


def test_protobufs_c_runtime_is_installed() -> None:
    """Without it the stand-in is correct but slower, and the bench's drain measures that."""
    assert AVAILABLE


@given(_streams(_plain_entries))
@settings(max_examples=300)
def test_every_usual_push_is_decoded_as_the_reference_does(streams: list[PushStream]) -> None:
    data = encode_push_request(streams)  # the canonical form every client writes
    assert decode_usual_push(data) == decode_push_request_raw(data)


@given(_streams(_any_entries), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255))))
@settings(max_examples=1000)
def test_any_push_valid_or_damaged_is_decoded_as_the_reference_does_or_left_to_it(
    streams: list[PushStream], changes: list[tuple[int, int]]
) -> None:
    """Bytes replaced anywhere, structured metadata, any timestamps: whatever it answers is
    what the hand-written decoder gives; where that one refuses, it answers ``None``."""
    data = bytearray(encode_push_request(streams))
    for where, value in changes:
        if data:
            data[where % len(data)] = value
    usual = decode_usual_push(bytes(data))
    if usual is not None:
        assert usual == _reference(bytes(data))


def _push(entry: bytes) -> bytes:
    """A push of one stream, labels ``{a="b"}``, holding one entry with these fields."""
    labels = b'\x0a\x07{a="b"}'
    stream = labels + b"\x12" + bytes([len(entry)]) + entry
    return b"\x0a" + bytes([len(stream)]) + stream


_S = 5 * _NS


@pytest.mark.parametrize(
    ("entry", "reference"),
    [
        # Go keeps an entry's last timestamp (nanos 7 alone); protobuf would merge the two.
        (b"\x0a\x02\x08\x05\x0a\x02\x10\x07\x12\x01a", PushEntry(7, "a")),
        # nanos 2**32 + 5: out of range as Go reads it (an int32 field would be cut to 5).
        (b"\x0a\x08\x08\x05\x10\x85\x80\x80\x80\x10\x12\x01a", "nanos out of range"),
        (b"\x0a\x04\x08\x05\x10\x00\x12\x01a", PushEntry(_S, "a")),  # zero nanos written out
        (b"\x0a\x05\x08\x05\x10\x85\x00\x12\x01a", PushEntry(_S + 5, "a")),  # varint not minimal
        (b"\x0a\x02\x08\x05\x12\x01a\x1a\x06\x0a\x01k\x12\x01v", PushEntry(_S, "a", {"k": "v"})),
        (b"\x0a\x02\x08\x05\x12\x01a\x28\x01", PushEntry(_S, "a")),  # an unknown field
        (b"\x0a\x02\x08\x05\x10\x01", "wrong wire type"),  # the line as a varint
        (b"\x0a\x02\x08\x05\x12\x02\xff\xfe", "not valid UTF-8"),
        # Ten-byte varints: 2**64 - 1 + 2**64 overflows 64 bits (upb would cut it); -1 does
        # not, but is left to the reference with every timestamp before 1970.
        (b"\x0a\x0b\x08" + b"\xff" * 9 + b"\x03\x12\x01a", "varint overflows 64 bits"),
        (b"\x0a\x0b\x08" + b"\xff" * 9 + b"\x01\x12\x01a", PushEntry(-_NS, "a")),
    ],
)
def test_pushes_not_in_the_usual_form_are_left_to_the_reference(
    entry: bytes, reference: PushEntry | str
) -> None:
    """Each is a push upb would parse differently from the reference, or that this decoder
    does not take on: the reference decides, as given here."""
    data = _push(entry)
    assert decode_usual_push(data) is None
    decided = _reference(data)
    if isinstance(reference, str):
        assert isinstance(decided, str) and reference in decided
    else:
        assert decided == [('{a="b"}', [reference])]


def test_a_stream_hash_of_ten_varint_bytes_is_left_to_the_reference() -> None:
    """Loki recomputes ``hash``, so both decoders ignore it, but an overflowing one is an
    error in the reference and cut to 64 bits by upb: any hash past 2**63 is left to it."""
    entry = b"\x0a\x04\x08\x05\x10\x07\x12\x01a"
    for hash_bytes in (b"\xff" * 9 + b"\x03", b"\xff" * 9 + b"\x01"):
        stream = b'\x0a\x07{a="b"}\x12' + bytes([len(entry)]) + entry + b"\x18" + hash_bytes
        data = b"\x0a" + bytes([len(stream)]) + stream
        assert decode_usual_push(data) is None
        _reference(data)


def test_the_usual_form_of_one_entry() -> None:
    data = _push(b"\x0a\x04\x08\x05\x10\x07\x12\x01a")
    assert decode_usual_push(data) == [('{a="b"}', [PushEntry(5 * _NS + 7, "a")])]
    assert decode_usual_push(b"") == [] == decode_push_request_raw(b"")
