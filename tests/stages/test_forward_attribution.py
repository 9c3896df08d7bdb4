"""What a push turns into, and what Loki's 400 answers mean: pure functions, no I/O.

The 400 texts are produced by ``logstack.testing``'s receiver (which writes them as Loki's
distributor and ingester do), so parser and receiver are checked against each other.
"""

from __future__ import annotations

import json

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logstack._config import LokiSettings
from logstack._delivery import (
    Item,
    PushBatch,
    WireItems,
    attribute_rejections,
    encode_push,
    group_streams,
    loki_size,
    split_by_size,
    stream_labels,
)
from logstack._entry import LogEntry
from logstack._loki_proto import (
    PushEntry,
    PushStream,
    decode_push_request,
    decompress_snappy,
    format_labels,
    go_time_string,
    parse_go_time,
    parse_push_error,
    rfc3339_seconds,
    sanitize_label_name,
)
from logstack._wal_format import EntryBatch
from logstack.testing import LokiReceiver

NOW = 1_758_715_200_123_456_789
HOUR = 3600 * 10**9


def item(labels: dict[str, str], ts: int, line: str, **sm: str) -> Item:
    return tuple(sorted(labels.items())), PushEntry(ts, line, dict(sm))


def receiver_answer(rx: LokiReceiver, items: list[Item]) -> tuple[int, str]:
    """Push ``items`` through the receiver's push path (as JSON) and return its answer."""
    streams: dict[str, dict[str, object]] = {}
    for labels, entry in items:
        s = streams.setdefault(format_labels(dict(labels)), {"stream": dict(labels), "values": []})
        value: list[object] = [str(entry.timestamp_ns), entry.line]
        if entry.structured_metadata:
            value.append(entry.structured_metadata)
        s["values"].append(value)  # type: ignore[attr-defined]
    body = json.dumps({"streams": list(streams.values())}).encode()
    status, text, _, _ = rx._process({"content-type": "application/json"}, body)
    return status, text


# ----------------------------------------------------------------------------- lines, labels


def test_the_line_and_structured_metadata() -> None:
    entry = LogEntry(
        NOW, "ERROR", "boom", "api", "prod", {}, "t-1", "s-1", {"order": "O-1"}, "2025-09-24T12Z"
    )
    batch = PushBatch.from_wal("k", None, (1, 24), (1, 99), [EntryBatch("r", NOW, [entry])])
    [(_, pushed)] = batch.items
    assert json.loads(pushed.line) == {
        "message": "boom",
        "metadata": {"order": "O-1"},
        "trace_id": "t-1",
        "span_id": "s-1",
    }
    assert pushed.structured_metadata == {}
    assert batch.oldest_received_ns == NOW
    batch = PushBatch.from_wal(
        "k", None, (1, 24), (1, 99), [EntryBatch("r", NOW, [entry])], structured_metadata=True
    )
    [(_, pushed)] = batch.items
    assert json.loads(pushed.line) == {"message": "boom", "metadata": {"order": "O-1"}}
    assert pushed.structured_metadata == {"trace_id": "t-1", "span_id": "s-1"}
    # Compact: no whitespace between tokens, the fields in their order.
    assert pushed.line == '{"message":"boom","metadata":{"order":"O-1"}}'


def test_stream_labels_reserved_win_and_invalid_names_are_sanitised() -> None:
    entry = LogEntry(
        NOW,
        "INFO",
        "m",
        "api",
        "prod",
        {"region": "eu", "k8s.pod": "p-1", "2fa": "x", "k8s_pod": "kept", "level": "DEBUG"},
    )
    assert dict(stream_labels(entry)) == {
        "service": "api",
        "env": "prod",
        "level": "INFO",  # the entry's own level, never the client's label
        "region": "eu",
        "k8s_pod": "kept",  # a name valid as written beats a sanitised one
        "_2fa": "x",
    }
    assert sanitize_label_name("a.b-c") == "a_b_c"
    assert sanitize_label_name("9lives") == "_9lives"
    assert sanitize_label_name("ok_name") == "ok_name"


def test_loki_size_counts_line_and_metadata_bytes_like_loki() -> None:
    assert loki_size(PushEntry(1, "abc")) == 3
    assert loki_size(PushEntry(1, "é", {"k": "vv"})) == 2 + 3


def test_split_by_size_never_exceeds_the_limit_and_keeps_order() -> None:
    items = [item({"a": "b"}, NOW + i, "x" * 300) for i in range(10)]
    items.insert(4, item({"a": "b"}, NOW + 99, "y" * 1001))
    chunks, oversized = split_by_size(items, 1000)
    assert [len(c) for c in chunks] == [3, 3, 3, 1]
    assert all(sum(loki_size(e) for _, e in c) <= 1000 for c in chunks)
    assert [e.timestamp_ns for c in chunks for _, e in c] == [NOW + i for i in range(10)]
    assert [e.line[0] for _, e in oversized] == ["y"]


def _split_reference(items: list[Item], limit: int) -> tuple[list[list[Item]], list[Item]]:
    """``split_by_size`` as its contract states it, one entry at a time."""
    chunks: list[list[Item]] = []
    oversized: list[Item] = []
    current: list[Item] = []
    used = 0
    for labels_entry in items:
        size = loki_size(labels_entry[1])
        if size > limit:
            oversized.append(labels_entry)
        else:
            if current and used + size > limit:
                chunks.append(current)
                current, used = [], 0
            current.append(labels_entry)
            used += size
    return ([*chunks, current] if current else chunks), oversized


_lines = st.text(st.characters(codec="utf-8"), max_size=30)
_items = st.lists(
    st.builds(
        item,
        st.sampled_from([{"a": "1"}, {"a": "2"}, {"b": "1"}]),
        st.integers(NOW, NOW + 5),
        _lines,
    ),
    max_size=20,
)


@given(_items, st.integers(0, 120))
def test_split_by_size_is_its_contract(items: list[Item], limit: int) -> None:
    assert split_by_size(items, limit) == _split_reference(items, limit)


@given(_items)
def test_group_streams_keeps_each_streams_order_however_runs_interleave(
    items: list[Item],
) -> None:
    # Labels equal but not identical, as well as identical (as the stream cache gives them).
    copies = [(tuple(list(labels)), entry) for labels, entry in items[::2]]
    mixed = [copies[i // 2] if i % 2 == 0 else it for i, it in enumerate(items)]
    expected: dict[tuple[tuple[str, str], ...], list[PushEntry]] = {}
    for labels, entry in mixed:
        expected.setdefault(labels, []).append(entry)
    assert group_streams(mixed) == [
        PushStream(dict(labels), entries) for labels, entries in expected.items()
    ]


_log_entries = st.builds(
    LogEntry,
    timestamp_ns=st.integers(NOW, NOW + 5),
    level=st.sampled_from(["INFO", "ERROR"]),
    message=_lines,
    service=st.sampled_from(["api", "db"]),
    env=st.sampled_from(["prod", "dev"]),
    labels=st.sampled_from([{}, {"region": "eu"}, {"region": "us"}, {"k8s.pod": "p"}]),
    trace_id=st.sampled_from([None, "4bf92f3577b34da6a3ce929d0e0e4736"]),
)


@given(st.lists(_log_entries, max_size=12), st.booleans())
@settings(max_examples=200)
def test_push_batch_streams_and_sizes_are_each_entrys_own(
    entries: list[LogEntry], structured_metadata: bool
) -> None:
    """``add`` reuses the previous entry's stream while service, env, level and labels stay
    the same, and sizes each entry as it converts it: neither may differ from computing
    them entry by entry."""
    batch = PushBatch.from_wal(
        "k",
        None,
        (1, 0),
        (1, 9),
        [EntryBatch("r", NOW, entries)],
        structured_metadata=structured_metadata,
    )
    assert [labels for labels, _ in batch.items] == [stream_labels(e) for e in entries]
    assert batch.loki_bytes == sum(loki_size(e) for _, e in batch.items)


_timestamps = st.one_of(st.integers(NOW, NOW + 5), st.integers(0, 2**63 - 1))


@given(
    st.lists(st.lists(_log_entries, max_size=8), max_size=4),
    _timestamps,
    st.booleans(),
    st.sampled_from([None, "tenant-a"]),
    st.sampled_from([10**6, 80]),
)
@settings(max_examples=300)
def test_a_batch_encoded_as_added_pushes_the_bytes_of_its_items(
    records: list[list[LogEntry]],
    base: int,
    structured_metadata: bool,
    tenant: str | None,
    burst: int,
) -> None:
    """``add`` encodes each entry's protobuf field as it converts it; the push ``prepare``
    builds from those must be, byte for byte, the one encoding the batch's items gives, and a
    batch over the burst is cut as ``split_by_size`` cuts its items."""
    batches = [
        EntryBatch(
            "r", NOW, [msgspec.structs.replace(e, timestamp_ns=(base + i) % 2**63) for e in r]
        )
        for i, r in enumerate(records)
    ]
    batch = PushBatch.from_wal(
        "k", tenant, (1, 0), (1, 9), batches, structured_metadata=structured_metadata
    )
    loki = LokiSettings(burst_limit_bytes=burst)
    batch.prepare(loki)
    assert batch.prepared is not None
    chunks, oversized = batch.prepared
    if batch.entries and batch.loki_bytes <= burst:  # the fields add encoded are used
        assert isinstance(chunks[0][0], WireItems)
    expected_chunks, expected_oversized = split_by_size(batch.items, burst)
    assert [list(chunk) for chunk, _, _ in chunks] == expected_chunks
    assert oversized == expected_oversized
    for chunk, body, headers in chunks:
        assert (body, headers) == encode_push(list(chunk), tenant, loki)


def test_entries_become_push_entries_only_when_a_refused_push_needs_them() -> None:
    entry = LogEntry(NOW, "INFO", "hello", "api", "prod", {"region": "eu"})
    batch = PushBatch.from_wal("k", None, (1, 0), (1, 9), [EntryBatch("r", NOW, [entry] * 3)])
    batch.prepare(LokiSettings())
    assert batch.prepared is not None
    [(chunk, body, _)], oversized = batch.prepared
    assert isinstance(chunk, WireItems) and oversized == []
    assert len(chunk) == 3 and chunk._items is None  # counted without being made
    assert chunk[1] == batch.items[1] and list(chunk[1:]) == batch.items[1:]
    assert decode_push_request(decompress_snappy(body)) == batch.streams


def test_records_added_without_protobuf_fields_are_encoded_by_prepare() -> None:
    """A batch partly converted under the JSON push format (the setting was reloaded midway)
    keeps no fields: ``prepare`` encodes all of its items, in whatever format is set now."""
    records = [
        EntryBatch("r", NOW, [LogEntry(NOW + i, "INFO", f"m{i}", "api", "prod")]) for i in range(3)
    ]
    batch = PushBatch("k", None, (1, 0), (1, 9), NOW)
    batch.add(records[0])
    batch.add(records[1], protobuf=False)
    batch.add(records[2])
    assert batch.fields is None
    loki = LokiSettings()
    batch.prepare(loki)
    assert batch.prepared is not None
    [(chunk, body, headers)], _ = batch.prepared
    assert chunk == batch.items
    assert (body, headers) == encode_push(batch.items, None, loki)


# ----------------------------------------------------------------------------- Go formats


def test_go_time_formats_round_trip() -> None:
    assert go_time_string(NOW) == "2025-09-24 12:00:00.123456789 +0000 UTC"
    assert go_time_string(NOW - 123_456_789) == "2025-09-24 12:00:00 +0000 UTC"
    assert go_time_string(NOW - 56_789) == "2025-09-24 12:00:00.1234 +0000 UTC"
    assert rfc3339_seconds(NOW) == "2025-09-24T12:00:00Z"
    for ns in (NOW, NOW - 123_456_789, NOW - 56_789, 1):
        assert parse_go_time(go_time_string(ns)) == ns
    assert parse_go_time("2025-09-24T14:00:00+02:00") == NOW - 123_456_789
    assert parse_go_time("not a time") is None


# ----------------------------------------------------------------------------- 400 answers


def test_distributor_errors_are_grouped_and_fully_attributed() -> None:
    rx = LokiReceiver(max_line_size_bytes=100)
    items = [
        item({"app": "a"}, NOW, "ok 1"),
        item({"app": "a"}, NOW + 1, "x" * 150),
        item({"app": "a"}, NOW + 2, "ok 2"),
        item({"app": "a"}, NOW + 3, "y" * 150),  # same message as the other: grouped
        item({"app": "b", "bad-name": "v"}, NOW, "whole stream refused"),
        item({"app": "c"}, NOW, "ok 3"),
    ]
    status, text = receiver_answer(rx, items)
    assert status == 400
    assert "2 errors like: Max entry size '100' bytes exceeded" in text
    assert "1 errors like: Error parsing labels" in text
    assert sorted(rx.lines()) == ["ok 1", "ok 2", "ok 3"]

    result = attribute_rejections(items, text)
    assert sorted(result.rejected) == [1, 3, 4]
    assert "Max entry size" in result.rejected[1]
    assert "Error parsing labels" in result.rejected[4]
    assert result.stored == [0, 2, 5]
    assert result.unconfirmed == []


def test_single_error_is_not_prefixed() -> None:
    rx = LokiReceiver(max_line_size_bytes=10)
    items = [item({"app": "a"}, NOW, "x" * 11), item({"app": "a"}, NOW + 1, "fine")]
    status, text = receiver_answer(rx, items)
    assert status == 400 and not text.startswith("1 errors like")
    result = attribute_rejections(items, text)
    assert list(result.rejected) == [0] and result.stored == [1]


def test_too_old_and_too_new_are_attributed_by_second() -> None:
    import time

    now = time.time_ns()
    rx = LokiReceiver(reject_old_samples_max_age_s=3600, creation_grace_period_s=60)
    items = [
        item({"app": "a"}, now - 2 * HOUR, "old"),
        item({"app": "a"}, now, "fine"),
        item({"app": "a"}, now + HOUR, "future"),
    ]
    status, text = receiver_answer(rx, items)
    assert status == 400
    result = attribute_rejections(items, text)
    assert sorted(result.rejected) == [0, 2]
    assert result.stored == [1]


def test_disallowed_structured_metadata_is_attributed_to_entries_carrying_it() -> None:
    rx = LokiReceiver(allow_structured_metadata=False)
    items = [
        item({"app": "a"}, NOW, "with", trace_id="t"),
        item({"app": "a"}, NOW + 1, "without"),
    ]
    status, text = receiver_answer(rx, items)
    assert status == 400 and "structured metadata, but this feature is disallowed" in text
    result = attribute_rejections(items, text)
    assert list(result.rejected) == [0] and result.stored == [1]


def test_ingester_refusal_of_a_single_stream_push_is_exact() -> None:
    rx = LokiReceiver()
    assert receiver_answer(rx, [item({"app": "a"}, NOW, "newest")])[0] == 204
    items = [
        item({"app": "a"}, NOW - 2 * HOUR, "too far behind"),
        item({"app": "a"}, NOW + 1, "in order"),
        item({"app": "a"}, NOW - 3 * HOUR, "also too far behind"),
    ]
    status, text = receiver_answer(rx, items)
    assert status == 400
    assert 'total ignored: 2 out of 3 for stream: {app="a"}' in text
    assert go_time_string(NOW - 2 * HOUR) in text
    result = attribute_rejections(items, text)
    assert sorted(result.rejected) == [0, 2]
    assert "entry too far behind" in result.rejected[0]
    assert result.stored == [1] and result.unconfirmed == []


def test_ingester_refusal_hides_other_streams_so_they_are_unconfirmed() -> None:
    rx = LokiReceiver(max_line_size_bytes=50)
    receiver_answer(rx, [item({"app": "a"}, NOW, "newest a")])
    items = [
        item({"app": "b"}, NOW, "b fine"),
        item({"app": "b"}, NOW + 1, "z" * 60),  # distributor: line too long (not reported!)
        item({"app": "a"}, NOW - 2 * HOUR, "a too far behind"),
        item({"app": "a"}, NOW + 1, "a fine"),
    ]
    status, text = receiver_answer(rx, items)
    assert status == 400
    assert "Max entry size" not in text  # Loki drops the validation errors here
    result = attribute_rejections(items, text)
    assert list(result.rejected) == [2]
    assert result.unconfirmed == [0, 1, 3]  # Loki's answer does not say
    assert result.stored == []
    assert result.unexplained


def test_more_than_ten_ingester_refusals_leave_the_rest_unconfirmed() -> None:
    rx = LokiReceiver()
    receiver_answer(rx, [item({"app": "a"}, NOW, "newest")])
    items = [item({"app": "a"}, NOW - 2 * HOUR - i, f"old {i}") for i in range(12)]
    items.append(item({"app": "a"}, NOW + 5, "fine"))
    status, text = receiver_answer(rx, items)
    assert status == 400 and "total ignored: 12 out of 13" in text
    assert text.count("ignored, reason") == 10
    result = attribute_rejections(items, text)
    assert sorted(result.rejected) == list(range(10))
    assert result.unconfirmed == [10, 11, 12]


def test_unknown_text_makes_everything_unconfirmed() -> None:
    items = [item({"app": "a"}, NOW, "x"), item({"app": "a"}, NOW + 1, "y")]
    result = attribute_rejections(items, "snappy: corrupt input\n")
    assert result.rejected == {} and result.unconfirmed == [0, 1]
    result = attribute_rejections(items, "")
    assert result.unconfirmed == [0, 1]


@pytest.mark.parametrize(
    "text",
    [
        "entry for stream '{app=\"a\"}' has 16 label names; limit 15",
        "stream '{app=\"a\"}' has label value too long: 'vvv'",
        'missing required labels team for user fake for stream {app="a"}',
    ],
)
def test_whole_stream_refusals(text: str) -> None:
    items = [item({"app": "a"}, NOW, "x"), item({"app": "b"}, NOW, "y")]
    result = attribute_rejections(items, text)
    assert list(result.rejected) == [0] and result.stored == [1]
    assert parse_push_error(text).rejections[0].scope == "stream"
