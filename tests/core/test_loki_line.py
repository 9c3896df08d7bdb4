"""The Loki line rendered when a request is written (``logstack._loki_line``).

Delivery must push the same bytes whichever record kind holds an entry: ``LineBatch`` (the
line rendered at the write, the ids added at delivery) or ``EntryBatch`` (written by an
earlier version, the line rendered at delivery).
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from logstack._config import LokiSettings
from logstack._delivery import PushBatch
from logstack._entry import LogEntry
from logstack._loki_line import line_batch, line_with_ids, render_line
from logstack._wal_format import EntryBatch, EntryRecord

NOW = 1_758_000_000_000_000_000

_json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
_ids = st.none() | st.text(max_size=40) | st.just("4bf92f3577b34da6a3ce929d0e0e4736")

_entries = st.builds(
    LogEntry,
    timestamp_ns=st.integers(NOW, NOW + 5),
    level=st.sampled_from(["INFO", "ERROR"]),
    message=st.text(max_size=60),
    service=st.sampled_from(["api", "db"]),
    env=st.sampled_from(["prod", "dev"]),
    labels=st.sampled_from([{}, {"region": "eu"}, {"k8s.pod": "p"}]),
    trace_id=_ids,
    span_id=_ids,
    metadata=st.none() | st.dictionaries(st.text(max_size=8), _json_values, max_size=4),
    timestamp=st.just("2025-09-16T05:20:00Z"),
)


@given(_entries)
@settings(max_examples=400)
def test_ids_added_to_a_rendered_line_give_the_line_rendered_with_them(entry: LogEntry) -> None:
    without = render_line(entry, with_ids=False)
    assert line_with_ids(without, entry.trace_id, entry.span_id) == render_line(
        entry, with_ids=True
    )
    expected: dict[str, Any] = {"message": entry.message}
    if entry.metadata:
        expected["metadata"] = entry.metadata
    assert json.loads(without) == expected
    for name in ("trace_id", "span_id"):
        if getattr(entry, name) is not None:
            expected[name] = getattr(entry, name)
    assert json.loads(line_with_ids(without, entry.trace_id, entry.span_id)) == expected


def test_the_line_is_compact_json_in_field_order() -> None:
    entry = LogEntry(NOW, "INFO", 'say "hi"', "api", "prod", {}, "t-1", "s-1", {"n": 1})
    line = line_with_ids(render_line(entry, with_ids=False), entry.trace_id, entry.span_id)
    assert line == b'{"message":"say \\"hi\\"","metadata":{"n":1},"trace_id":"t-1","span_id":"s-1"}'
    assert render_line(LogEntry(NOW, "INFO", "m", "api", "prod", metadata={}), with_ids=True) == (
        b'{"message":"m"}'
    )


def test_a_line_batch_keeps_what_delivery_needs_and_not_the_clients_timestamp_text() -> None:
    entry = LogEntry(NOW, "WARN", "m", "api", "prod", {"region": "eu"}, None, "s-1", {"a": 1})
    record = line_batch("req-1", NOW + 1, [entry])
    assert (record.request_id, record.received_ns) == ("req-1", NOW + 1)
    [kept] = record.entries
    assert "timestamp" not in type(kept).__struct_fields__
    assert (kept.timestamp_ns, kept.level, kept.service, kept.env, kept.labels) == (
        NOW,
        "WARN",
        "api",
        "prod",
        {"region": "eu"},
    )
    assert (kept.line, kept.trace_id, kept.span_id) == (
        b'{"message":"m","metadata":{"a":1}}',
        None,
        "s-1",
    )


def _push(
    records: list[EntryRecord], *, structured_metadata: bool, protobuf: list[bool]
) -> PushBatch:
    batch = PushBatch("k", "tenant-a", (1, 0), (1, 9), NOW)
    for record, fields in zip(records, protobuf, strict=True):
        batch.add(record, structured_metadata=structured_metadata, protobuf=fields)
    return batch


@given(
    st.lists(st.tuples(st.lists(_entries, max_size=6), st.booleans(), st.booleans()), max_size=4),
    st.booleans(),
    st.sampled_from(["protobuf", "json"]),
    st.sampled_from([10**6, 120]),
)
@settings(max_examples=300)
@example(  # always run: both kinds in one batch, ids and metadata on, the line carrying ids
    [
        ([LogEntry(NOW, "INFO", "a", "api", "prod", {}, "t-1", "s-1", {"k": [1]})], True, True),
        ([LogEntry(NOW + 1, "INFO", "b", "api", "prod", {}, None, "s-2")], False, True),
    ],
    False,
    "protobuf",
    10**6,
)
def test_a_push_is_the_same_whichever_record_kind_holds_its_entries(
    records: list[tuple[list[LogEntry], bool, bool]],
    structured_metadata: bool,
    push_format: str,
    burst: int,
) -> None:
    """Each record written as ``EntryBatch`` (before) or as ``LineBatch`` (now), in any mix
    (a WAL written across an upgrade): the entries, sizes, protobuf fields and push bodies
    are those of the all-``EntryBatch`` batch."""
    old = [EntryBatch("r", NOW, entries) for entries, _, _ in records]
    mixed: list[EntryRecord] = [
        line_batch("r", NOW, entries) if as_lines else EntryBatch("r", NOW, entries)
        for entries, as_lines, _ in records
    ]
    fields = [f for _, _, f in records]
    expected = _push(old, structured_metadata=structured_metadata, protobuf=fields)
    got = _push(mixed, structured_metadata=structured_metadata, protobuf=fields)
    assert got.entries == expected.entries
    assert got.loki_bytes == expected.loki_bytes
    assert got.fields == expected.fields
    loki = LokiSettings(push_format=push_format, burst_limit_bytes=burst)  # type: ignore[arg-type]
    expected.prepare(loki)
    got.prepare(loki)
    assert expected.prepared is not None and got.prepared is not None
    assert [(list(c), b, h) for c, b, h in got.prepared[0]] == [
        (list(c), b, h) for c, b, h in expected.prepared[0]
    ]
    assert got.prepared[1] == expected.prepared[1]
