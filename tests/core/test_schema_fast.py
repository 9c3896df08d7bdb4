"""The validation fast path (``logstack._schema_fast.validate_body``).

Its agreement with the full validator on generated bodies (whenever it answers, the same
entries) is checked with the other schema checkers in ``test_openapi_conformance.py``. Here:
that it does answer for the usual bodies (or it would be no fast path), and the edges where
it must decline.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from logstack._config import SchemaSettings
from logstack._envelope import Envelope
from logstack._schema import parse_timestamp, validate_entries
from logstack._schema_fast import _NULL_FIELDS_SLACK, validate_body
from logstack.bench._cli import body_factory
from logstack.testing import make_entry

DEFAULT = SchemaSettings()


def entry(**changes: Any) -> dict[str, Any]:
    """The test kit's entry with every optional field the fast path types."""
    base = make_entry(
        timestamp="2025-09-24T12:00:00.123456789Z",
        level="ERROR",
        message="Payment failed",
        labels={"region": "eu-west-1", "service": "dropped"},
        trace_id="abc",
        metadata={"order": {"id": 7, "items": [1, 2.5, None, True]}},
    )
    base.update(changes)
    return base


def full(body: bytes, schema: SchemaSettings = DEFAULT) -> Any:
    return validate_entries(Envelope("t", None, body).document(), schema)


@pytest.mark.parametrize(
    "body",
    [
        body_factory(100)(7),  # what the benchmark sends
        msgspec.json.encode({"entries": [entry(), entry(level="warning", labels=None)]}),
        msgspec.json.encode({"entries": [entry(metadata={}, labels={}, span_id=None)]}),
        msgspec.json.encode({"entries": [entry(), entry()]}).replace(b"{", b"{ \n", 3),
        # Labels repeated from entry to entry are checked once; a reserved key is still
        # dropped from each, and a change of labels is checked again.
        msgspec.json.encode(
            {
                "entries": [
                    entry(labels={"region": "eu"}),
                    entry(labels={"region": "eu"}),
                    entry(labels={"region": "eu", "env": "x"}),
                    entry(labels={"region": "eu", "env": "x"}),
                    entry(labels={"region": "us"}),
                ]
            }
        ),
    ],
)
def test_usual_bodies_take_the_fast_path_with_the_same_entries(body: bytes) -> None:
    fast = validate_body(body, DEFAULT)
    assert fast is not None
    assert fast == full(body)
    labels = [e.labels for e in fast if e.labels]
    assert len({id(x) for x in labels}) == len(labels)  # each entry keeps its own dict


@pytest.mark.parametrize(
    ("why", "doc"),
    [
        ("rare level spelling", {"entries": [entry(level="wArN")]}),
        ("labels as []", {"entries": [entry(labels=[])]}),
        ("metadata as []", {"entries": [entry(metadata=[])]}),
        ("unknown field", {"entries": [entry(colour="red")]}),
        ("extra top-level field", {"entries": [entry()], "x": 1}),
        ("bad timestamp", {"entries": [entry(timestamp="yesterday")]}),
        ("bad service", {"entries": [entry(service="Payments")]}),
        ("label not allowed", {"entries": [entry(labels={"pod": "x"})]}),
        (
            "label not allowed after labels that passed",
            {
                "entries": [
                    entry(labels={"region": "eu"}),
                    entry(labels={"region": "eu", "pod": "x"}),
                ]
            },
        ),
        (
            "label value too long after the same name passed",
            {"entries": [entry(labels={"region": "eu"}), entry(labels={"region": "e" * 65})]},
        ),
        ("metadata too deep", {"entries": [entry(metadata={"a": {"b": {"c": {"d": {"e": {}}}}}})]}),
        ("metadata int too big", {"entries": [entry(metadata={"n": 2**64})]}),
        ("no entries", {"entries": []}),
        ("too many entries", {"entries": [entry()] * 501}),
    ],
)
def test_declines_what_it_cannot_prove(why: str, doc: Any) -> None:
    assert validate_body(msgspec.json.encode(doc), DEFAULT) is None, why


def test_declines_malformed_json() -> None:
    assert validate_body(b'{"entries": [', DEFAULT) is None
    assert validate_body(b"[]", DEFAULT) is None


def test_size_rule_allows_for_null_fields_left_out_of_the_struct() -> None:
    """An entry sent with explicit nulls encodes longer as received than as a struct: the
    fast path must decline where only the received form breaks ``max_entry_bytes``."""
    schema = SchemaSettings(max_entry_bytes=400)
    nulls = {"labels": None, "trace_id": None, "span_id": None, "metadata": None}
    base = entry(labels=None, trace_id=None, metadata=None)
    for size in range(150, 400):
        doc = {**base, "message": "m" * (size - 150 + 1), **nulls}
        body = msgspec.json.encode({"entries": [doc]})
        received = len(msgspec.json.encode(doc))
        fast = validate_body(body, schema)
        if received > schema.max_entry_bytes:
            assert fast is None
        elif received + _NULL_FIELDS_SLACK <= schema.max_entry_bytes:
            assert fast == full(body, schema)


def test_large_bodies_check_each_entry() -> None:
    """Past the limit as a whole array, entries are measured one by one."""
    schema = SchemaSettings(max_entry_bytes=2048)
    body = msgspec.json.encode({"entries": [entry(message="m" * 1000)] * 5})
    assert validate_body(body, schema) == full(body, schema)
    big = msgspec.json.encode({"entries": [entry()] * 4 + [entry(message="m" * 3000)]})
    assert validate_body(big, schema) is None


def test_uint64_metadata_integers_take_the_full_path_and_are_accepted() -> None:
    """msgspec bounds stop at int64: the fast path declines 2**63 .. 2**64-1, which the
    full validator accepts (and the WAL's MessagePack can hold)."""
    body = msgspec.json.encode({"entries": [entry(metadata={"n": 2**64 - 1})]})
    assert validate_body(body, DEFAULT) is None
    assert full(body)[0].metadata == {"n": 2**64 - 1}


SECONDS = st.sampled_from(
    ["2025-09-24T12:00:00", "1969-12-31T23:59:59", "2262-04-11T23:47:16", "2026-02-29T00:00:00"]
)
TAILS = st.one_of(
    st.sampled_from(["Z", "z", ".5Z", ".123456789Z", ".854775807Z", ".854775808Z", "+02:00"]),
    st.builds(
        lambda digits, end: "." + digits + end,
        st.text(alphabet="0123456789_+-٣ ", min_size=0, max_size=11),
        st.sampled_from(["Z", "z", "", "Zz", "+00:00"]),
    ),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(SECONDS, TAILS), min_size=1, max_size=4))
@example([("2025-09-24T12:00:00", ".\u0663Z")])  # a digit, but not an ASCII one
@example([("2025-09-24T12:00:00", ".1_2Z"), ("2025-09-24T12:00:00", ".+5Z")])
@example([("1969-12-31T23:59:59", ".5Z")])  # before the epoch
def test_timestamps_parse_as_parse_timestamp_does(stamps: list[tuple[str, str]]) -> None:
    """The loop's inlined fast path for ``.<fraction>Z`` gives what ``parse_timestamp``
    gives, and declines what it refuses (a body with any such entry takes the full path)."""
    texts = [seconds + tail for seconds, tail in stamps]
    for text in texts:  # the first sight of a second fills the cache the fast path reads
        parse_timestamp(text)
    body = msgspec.json.encode({"entries": [entry(timestamp=t) for t in texts]})
    parsed = [parse_timestamp(t) for t in texts]
    entries = validate_body(body, DEFAULT)
    if all(type(ns) is int for ns in parsed):
        assert entries is not None
        assert [e.timestamp_ns for e in entries] == parsed
        assert [e.timestamp for e in entries] == texts
    else:
        assert entries is None
