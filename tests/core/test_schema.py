"""Schema enforcement (SPEC §3.1): every rule, valid and invalid, and "no input yields a 500"."""

from __future__ import annotations

import calendar
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from logstack._config import SchemaSettings
from logstack._entry import LogEntry
from logstack._errors import ValidationError
from logstack._schema import MAX_PROBLEMS, parse_timestamp, validate_entries

DEFAULTS = SchemaSettings()

BASE: dict[str, Any] = {
    "timestamp": "2025-09-24T12:00:00.000Z",
    "level": "ERROR",
    "message": "Payment failed",
    "service": "payments-api",
    "env": "prod",
}
BASE_NS = 1_758_715_200 * 10**9

MISSING = object()


def entry(**fields: Any) -> dict[str, Any]:
    """A valid entry with ``fields`` changed (``MISSING`` removes a field)."""
    result = dict(BASE)
    for name, value in fields.items():
        if value is MISSING:
            result.pop(name, None)
        else:
            result[name] = value
    return result


def one(raw: dict[str, Any], schema: SchemaSettings = DEFAULTS) -> LogEntry:
    [result] = validate_entries([raw], schema)
    return result


def problems(raw_entries: Any, schema: SchemaSettings = DEFAULTS) -> list[dict[str, str]]:
    with pytest.raises(ValidationError) as info:
        validate_entries(raw_entries, schema)
    assert info.value.reason == "schema"
    errors: list[dict[str, str]] = info.value.details["errors"]
    assert errors
    return errors


def nested(depth: int, leaf: Any = 1) -> dict[str, Any]:
    """An object whose nesting depth (the object itself is level 1) is ``depth``."""
    value: Any = leaf
    for _ in range(depth):
        value = {"k": value}
    return value  # type: ignore[no-any-return]


# --- valid entries ------------------------------------------------------------------------------

VALID: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("minimal", {}, {"level": "ERROR", "labels": {}, "metadata": None, "trace_id": None}),
    ("level lower", {"level": "info"}, {"level": "INFO"}),
    ("level capitalised", {"level": "Info"}, {"level": "INFO"}),
    ("level mixed case", {"level": "dEbUg"}, {"level": "DEBUG"}),
    ("level trace", {"level": "TRACE"}, {"level": "TRACE"}),
    ("level warn", {"level": "warn"}, {"level": "WARN"}),
    ("level WARNING", {"level": "WARNING"}, {"level": "WARN"}),
    ("level warning mixed", {"level": "WaRnInG"}, {"level": "WARN"}),
    ("level fatal", {"level": "Fatal"}, {"level": "FATAL"}),
    ("level CRITICAL", {"level": "CRITICAL"}, {"level": "FATAL"}),
    ("level critical", {"level": "critical"}, {"level": "FATAL"}),
    ("message 1 char", {"message": "x"}, {"message": "x"}),
    ("message at limit", {"message": "é" * 8192}, {"message": "é" * 8192}),
    ("message whitespace", {"message": " "}, {"message": " "}),
    ("service 64 chars", {"service": "a" * 64}, {"service": "a" * 64}),
    ("service digits dashes", {"service": "0-a-9-"}, {"service": "0-a-9-"}),
    ("env 32 chars", {"env": "e" * 32}, {"env": "e" * 32}),
    ("labels absent", {"labels": MISSING}, {"labels": {}}),
    ("labels null", {"labels": None}, {"labels": {}}),
    ("labels empty object", {"labels": {}}, {"labels": {}}),
    ("labels PHP empty array", {"labels": []}, {"labels": {}}),
    (
        "labels allowed",
        {"labels": {"region": "eu", "tenant": "acme", "schema_version": "2", "version": "1.2"}},
        {"labels": {"region": "eu", "tenant": "acme", "schema_version": "2", "version": "1.2"}},
    ),
    ("label value 64 chars", {"labels": {"region": "r" * 64}}, {"labels": {"region": "r" * 64}}),
    ("label value empty", {"labels": {"region": ""}}, {"labels": {"region": ""}}),
    ("trace_id 128", {"trace_id": "t" * 128}, {"trace_id": "t" * 128}),
    ("trace_id empty", {"trace_id": ""}, {"trace_id": ""}),
    ("trace_id null", {"trace_id": None}, {"trace_id": None}),
    ("span_id 64", {"span_id": "s" * 64}, {"span_id": "s" * 64}),
    ("span_id null", {"span_id": None}, {"span_id": None}),
    ("metadata null", {"metadata": None}, {"metadata": None}),
    ("metadata empty", {"metadata": {}}, {"metadata": {}}),
    ("metadata PHP empty array", {"metadata": []}, {"metadata": {}}),
    (
        "metadata scalars",
        {"metadata": {"s": "x", "i": 12000, "f": 1.5, "b": False, "n": None}},
        {"metadata": {"s": "x", "i": 12000, "f": 1.5, "b": False, "n": None}},
    ),
    ("metadata depth 5", {"metadata": nested(5)}, {"metadata": nested(5)}),
    ("metadata lists depth 5", {"metadata": {"a": [[[[1]]]]}}, {"metadata": {"a": [[[[1]]]]}}),
    (
        "metadata integer bounds",
        {"metadata": {"lo": -(2**63), "hi": 2**64 - 1}},
        {"metadata": {"lo": -(2**63), "hi": 2**64 - 1}},
    ),
]


@pytest.mark.parametrize(("fields", "expected"), [v[1:] for v in VALID], ids=[v[0] for v in VALID])
def test_valid_entry(fields: dict[str, Any], expected: dict[str, Any]) -> None:
    result = one(entry(**fields))
    for name, value in expected.items():
        assert getattr(result, name) == value, name


def test_entry_fields_are_carried_over() -> None:
    raw = entry(
        level="warning",
        labels={"region": "eu"},
        trace_id="abc",
        span_id="def",
        metadata={"order_id": "O-123", "amount": 12000},
    )
    assert one(raw) == LogEntry(
        timestamp_ns=BASE_NS,
        level="WARN",
        message="Payment failed",
        service="payments-api",
        env="prod",
        labels={"region": "eu"},
        trace_id="abc",
        span_id="def",
        metadata={"order_id": "O-123", "amount": 12000},
        timestamp="2025-09-24T12:00:00.000Z",
    )


def test_batch_keeps_order_and_count() -> None:
    raws = [entry(message=f"m{i}") for i in range(500)]
    result = validate_entries(raws, DEFAULTS)
    assert [e.message for e in result] == [f"m{i}" for i in range(500)]


# --- invalid entries ----------------------------------------------------------------------------

INVALID: list[tuple[str, dict[str, Any], str, str]] = [
    # (id, changed fields, field path, message fragment)
    ("timestamp missing", {"timestamp": MISSING}, "timestamp", "required"),
    ("timestamp null", {"timestamp": None}, "timestamp", "required"),
    ("timestamp number", {"timestamp": 1758715200}, "timestamp", "must be a string (got number)"),
    ("timestamp date only", {"timestamp": "2025-09-24"}, "timestamp", "RFC 3339"),
    ("timestamp no zone", {"timestamp": "2025-09-24T12:00:00"}, "timestamp", "RFC 3339"),
    ("timestamp offset no colon", {"timestamp": "2025-09-24T12:00:00+0200"}, "timestamp", "RFC"),
    ("timestamp empty fraction", {"timestamp": "2025-09-24T12:00:00.Z"}, "timestamp", "RFC"),
    ("timestamp 10 digits", {"timestamp": "2025-09-24T12:00:00.1234567891Z"}, "timestamp", "9"),
    ("timestamp month 13", {"timestamp": "2025-13-01T00:00:00Z"}, "timestamp", "month"),
    ("timestamp month 00", {"timestamp": "2025-00-01T00:00:00Z"}, "timestamp", "month"),
    ("timestamp day 00", {"timestamp": "2025-01-00T00:00:00Z"}, "timestamp", "day must be 01-31"),
    ("timestamp Feb 30", {"timestamp": "2024-02-30T00:00:00Z"}, "timestamp", "day must be 01-29"),
    ("timestamp Feb 29 2023", {"timestamp": "2023-02-29T00:00:00Z"}, "timestamp", "01-28"),
    ("timestamp Feb 29 1900", {"timestamp": "1900-02-29T00:00:00Z"}, "timestamp", "01-28"),
    ("timestamp Apr 31", {"timestamp": "2025-04-31T00:00:00Z"}, "timestamp", "01-30"),
    ("timestamp hour 24", {"timestamp": "2025-09-24T24:00:00Z"}, "timestamp", "hour"),
    ("timestamp minute 60", {"timestamp": "2025-09-24T12:60:00Z"}, "timestamp", "minute"),
    ("timestamp second 61", {"timestamp": "2025-09-24T12:00:61Z"}, "timestamp", "second"),
    ("timestamp offset hour 24", {"timestamp": "2025-09-24T12:00:00+24:00"}, "timestamp", "offset"),
    ("timestamp offset min 60", {"timestamp": "2025-09-24T12:00:00-01:60"}, "timestamp", "offset"),
    ("timestamp before 1970", {"timestamp": "1969-12-31T23:59:59Z"}, "timestamp", "1970"),
    (
        "timestamp 1 ns before 1970",
        {"timestamp": "1969-12-31T23:59:59.999999999Z"},
        "timestamp",
        "1970",
    ),
    (
        "timestamp offset before 1970",
        {"timestamp": "1970-01-01T00:00:00+00:01"},
        "timestamp",
        "1970",
    ),
    ("timestamp after 2262", {"timestamp": "2262-04-11T23:47:16.854775808Z"}, "timestamp", "2262"),
    ("timestamp year 9999", {"timestamp": "9999-12-31T23:59:59Z"}, "timestamp", "64 bits"),
    (
        "timestamp wide digits",
        {"timestamp": "\uff12\uff10\uff12\uff15-09-24T12:00:00Z"},
        "timestamp",
        "RFC",
    ),
    ("timestamp trailing newline", {"timestamp": "2025-09-24T12:00:00Z\n"}, "timestamp", "RFC"),
    ("timestamp leading space", {"timestamp": " 2025-09-24T12:00:00Z"}, "timestamp", "RFC"),
    ("level missing", {"level": MISSING}, "level", "required"),
    ("level unknown", {"level": "LOUD"}, "level", "must be one of TRACE"),
    ("level empty", {"level": ""}, "level", "must be one of"),
    ("level padded", {"level": " INFO"}, "level", "must be one of"),
    ("level plural", {"level": "WARNINGS"}, "level", "must be one of"),
    ("level dotless i", {"level": "\u0131nfo"}, "level", "must be one of"),
    ("level boolean", {"level": True}, "level", "must be a string (got boolean)"),
    ("level number", {"level": 3}, "level", "must be a string (got number)"),
    ("message missing", {"message": MISSING}, "message", "required"),
    ("message empty", {"message": ""}, "message", "must not be empty"),
    ("message too long", {"message": "x" * 8193}, "message", "at most 8192 characters"),
    ("message boolean", {"message": True}, "message", "must be a string (got boolean)"),
    ("message number", {"message": 1}, "message", "must be a string (got number)"),
    ("message object", {"message": {"text": "x"}}, "message", "got object"),
    ("service missing", {"service": MISSING}, "service", "required"),
    ("service upper", {"service": "Payments"}, "service", "a-z, 0-9 and '-'"),
    ("service underscore", {"service": "pay_ments"}, "service", "a-z"),
    ("service empty", {"service": ""}, "service", "1-64"),
    ("service 65 chars", {"service": "a" * 65}, "service", "1-64"),
    ("service trailing newline", {"service": "pay\n"}, "service", "a-z"),
    ("service non-ASCII", {"service": "café"}, "service", "a-z"),
    ("service number", {"service": 5}, "service", "got number"),
    ("env missing", {"env": MISSING}, "env", "required"),
    ("env 33 chars", {"env": "e" * 33}, "env", "1-32"),
    ("env upper", {"env": "PROD"}, "env", "a-z"),
    ("env array", {"env": ["prod"]}, "env", "got array"),
    ("labels non-empty array", {"labels": ["region"]}, "labels", "only an empty array"),
    ("labels string", {"labels": "region=eu"}, "labels", "got string"),
    ("labels boolean", {"labels": False}, "labels", "got boolean"),
    ("label not allowed", {"labels": {"team": "a"}}, "labels.team", "not an allowed label"),
    ("label value number", {"labels": {"region": 1}}, "labels.region", "got number"),
    ("label value null", {"labels": {"region": None}}, "labels.region", "got null"),
    ("label value 65", {"labels": {"region": "r" * 65}}, "labels.region", "at most 64"),
    ("reserved label number", {"labels": {"level": 3}}, "labels.level", "got number"),
    ("trace_id 129", {"trace_id": "t" * 129}, "trace_id", "at most 128"),
    ("trace_id number", {"trace_id": 7}, "trace_id", "must be a string (got number)"),
    ("span_id 65", {"span_id": "s" * 65}, "span_id", "at most 64"),
    ("span_id boolean", {"span_id": True}, "span_id", "got boolean"),
    ("metadata string", {"metadata": "x"}, "metadata", "must be a JSON object (got string)"),
    ("metadata non-empty array", {"metadata": [1]}, "metadata", "only an empty array"),
    ("metadata boolean", {"metadata": True}, "metadata", "got boolean"),
    ("metadata depth 6", {"metadata": nested(6)}, "metadata.k.k.k.k.k", "at most 5 levels"),
    ("metadata empty at 6", {"metadata": nested(5, {})}, "metadata.k.k.k.k.k", "5 levels"),
    ("metadata lists 6", {"metadata": {"a": [[[[[1]]]]]}}, "metadata.a[0][0][0][0]", "5 levels"),
    ("metadata int too big", {"metadata": {"n": 2**64}}, "metadata.n", "integer out of range"),
    ("metadata int too small", {"metadata": {"a": [-(2**63) - 1]}}, "metadata.a[0]", "range"),
    ("unknown field", {"foo": 1}, "foo", "unknown field"),
    ("unknown field case", {"Level": "INFO"}, "Level", "unknown field"),
    ("unknown odd field", {'a "b"': 1}, '["a \\"b\\""]', "unknown field"),
    ("unknown long field", {"f" * 100: 1}, '["' + "f" * 64 + '..."]', "unknown field"),
]


@pytest.mark.parametrize(
    ("fields", "path", "fragment"), [v[1:] for v in INVALID], ids=[v[0] for v in INVALID]
)
def test_invalid_entry(fields: dict[str, Any], path: str, fragment: str) -> None:
    found = problems([entry(**fields)])
    sep = "" if path.startswith("[") else "."
    assert len(found) == 1, found
    assert found[0]["field"] == f"entries[0]{sep}{path}"
    assert fragment in found[0]["message"]


@pytest.mark.parametrize(
    ("raw", "kind"),
    [([], "array"), ("entry", "string"), (None, "null"), (3, "number"), (True, "boolean")],
)
def test_entry_must_be_an_object(raw: Any, kind: str) -> None:
    assert problems([raw]) == [
        {"field": "entries[0]", "message": f"must be a JSON object (got {kind})"}
    ]


def test_batch_size_limits() -> None:
    assert problems([]) == [{"field": "entries", "message": "must contain at least 1 entry"}]
    small = SchemaSettings(max_entries=3)
    assert len(validate_entries([entry()] * 3, small)) == 3
    # Too many entries is reported alone: the entries are not looked at (cheap rejection).
    assert problems([entry(level="LOUD")] * 4, small) == [
        {"field": "entries", "message": "at most 3 entries per request (got 4)"}
    ]
    assert problems({"a": 1}) == [  # type: ignore[arg-type]
        {"field": "entries", "message": "must be a JSON array of log entries (got object)"}
    ]


def test_entry_size_limit() -> None:
    raw = entry(metadata={"blob": ""})
    size = len(msgspec.json.encode(raw))
    schema = SchemaSettings(max_entry_bytes=size + 10)
    assert one(entry(metadata={"blob": "x" * 10}), schema).metadata == {"blob": "x" * 10}
    assert problems([entry(metadata={"blob": "x" * 11})], schema) == [
        {
            "field": "entries[0]",
            "message": f"encodes to {size + 11} bytes of JSON; at most {size + 10} allowed",
        }
    ]
    # Escapes count as encoded: a quote takes two bytes.
    assert problems([entry(metadata={"blob": '"' * 6})], schema)


def test_default_entry_size_is_32_kib() -> None:
    overhead = len(msgspec.json.encode(entry(metadata={"b": ""})))
    fits = entry(metadata={"b": "x" * (32 * 1024 - overhead)})
    assert one(fits).metadata is not None
    too_big = entry(metadata={"b": "x" * (32 * 1024 - overhead + 1)})
    assert problems([too_big])[0]["field"] == "entries[0]"


# --- labels -------------------------------------------------------------------------------------


def test_reserved_labels_are_accepted_but_never_override() -> None:
    raw = entry(
        level="info",
        labels={"service": "evil", "env": "staging", "level": "DEBUG", "region": "eu"},
    )
    result = one(raw)
    assert result.labels == {"region": "eu"}
    assert (result.service, result.env, result.level) == ("payments-api", "prod", "INFO")
    assert result.stream_labels() == {
        "region": "eu",
        "service": "payments-api",
        "env": "prod",
        "level": "INFO",
    }
    # The reserved keys were dropped from the entry's labels, not from the request.
    assert raw["labels"]["service"] == "evil"


def test_only_reserved_labels() -> None:
    assert one(entry(labels={"service": "payments-api", "env": "prod"})).labels == {}


def test_label_count_limit_counts_allowed_keys_only() -> None:
    keys = [f"k{i}" for i in range(7)]
    schema = SchemaSettings(label_allowlist=keys, max_labels=6)
    six = {k: "v" for k in keys[:6]}
    reserved = {"service": "s", "env": "e", "level": "l"}
    assert one(entry(labels={**six, **reserved}), schema).labels == six
    seven = {k: "v" for k in keys}
    assert problems([entry(labels=seven)], schema) == [
        {"field": "entries[0].labels", "message": "at most 6 labels allowed (got 7)"}
    ]
    assert problems([entry(labels={"k0": "v"})], SchemaSettings(label_allowlist=keys, max_labels=0))


def test_label_allowlist_comes_from_settings() -> None:
    schema = SchemaSettings(label_allowlist=["team"])
    assert one(entry(labels={"team": "core"}), schema).labels == {"team": "core"}
    [found] = problems([entry(labels={"region": "eu"})], schema)
    assert found == {
        "field": "entries[0].labels.region",
        "message": "not an allowed label (allowed: team)",
    }
    # The defaults are unaffected by the other settings object (rules are per settings).
    assert one(entry(labels={"region": "eu"})).labels == {"region": "eu"}


def test_every_bad_label_is_listed() -> None:
    found = problems([entry(labels={"team": "a", "region": 1, "zone": "b", "tenant": "t"})])
    assert [p["field"] for p in found] == [
        "entries[0].labels.team",
        "entries[0].labels.region",
        "entries[0].labels.zone",
    ]


# --- metadata depth -----------------------------------------------------------------------------


@pytest.mark.parametrize("limit", [1, 2, 5, 8])
def test_metadata_depth_boundary(limit: int) -> None:
    """Depth: the metadata object is level 1; each object or array inside adds one."""
    schema = SchemaSettings(max_metadata_depth=limit)
    assert one(entry(metadata=nested(limit)), schema).metadata == nested(limit)
    assert problems([entry(metadata=nested(limit + 1))], schema)
    as_list: Any = 1
    for _ in range(limit - 1):
        as_list = [as_list]
    assert one(entry(metadata={"a": as_list}), schema).metadata == {"a": as_list}
    assert problems([entry(metadata={"a": [as_list]})], schema)


def test_metadata_depth_one_means_scalars_only() -> None:
    schema = SchemaSettings(max_metadata_depth=1)
    assert one(entry(metadata={"a": 1, "b": "x"}), schema).metadata == {"a": 1, "b": "x"}
    for deeper in ({"a": {}}, {"a": []}):
        [found] = problems([entry(metadata=deeper)], schema)
        assert found == {
            "field": "entries[0].metadata.a",
            "message": "metadata may nest at most 1 levels (the metadata object is level 1)",
        }


def test_metadata_too_deep_is_reported_once_per_entry() -> None:
    found = problems([entry(metadata={"a": nested(6), "b": nested(6), "n": 2**70})])
    assert sorted(p["message"][:20] for p in found) == [
        "integer out of range",
        "metadata may nest at",
    ]


# --- timestamps ---------------------------------------------------------------------------------

TIMESTAMPS: list[tuple[str, int]] = [
    ("1970-01-01T00:00:00Z", 0),
    ("1970-01-01T00:00:00.000000001Z", 1),
    ("1970-01-01T00:00:00-00:01", 60 * 10**9),
    ("2025-09-24T12:00:00Z", BASE_NS),
    ("2025-09-24T12:00:00.000Z", BASE_NS),
    ("2025-09-24T12:00:00.1Z", BASE_NS + 100_000_000),
    ("2025-09-24T12:00:00.123456789Z", BASE_NS + 123_456_789),
    ("2025-09-24T12:00:00.000000009Z", BASE_NS + 9),
    ("2025-09-24T12:00:00.123456Z", BASE_NS + 123_456_000),
    ("2025-09-24T14:00:00.5+02:00", BASE_NS + 500_000_000),
    ("2025-09-24T07:30:00-04:30", BASE_NS),
    ("2025-09-24T12:00:00+00:00", BASE_NS),
    ("2025-09-24T12:00:00-00:00", BASE_NS),
    ("2025-09-25T11:59:00+23:59", BASE_NS),
    ("2025-09-23T12:01:00-23:59", BASE_NS),
    ("2025-09-24t12:00:00z", BASE_NS),
    ("2025-09-24 12:00:00Z", BASE_NS),
    ("2024-02-29T23:59:59Z", 1_709_251_199 * 10**9),
    ("2000-02-29T00:00:00Z", 951_782_400 * 10**9),
    ("2016-12-31T23:59:60Z", 1_483_228_800 * 10**9),  # leap second: as POSIX counts it
    ("2262-04-11T23:47:16.854775807Z", 2**63 - 1),
]


@pytest.mark.parametrize(("text", "ns"), TIMESTAMPS, ids=[t for t, _ in TIMESTAMPS])
def test_timestamp_to_nanoseconds(text: str, ns: int) -> None:
    assert parse_timestamp(text) == ns
    result = one(entry(timestamp=text))
    assert result.timestamp_ns == ns
    assert result.timestamp == text  # kept exactly as sent


def test_timestamp_cache_does_not_hide_errors() -> None:
    assert parse_timestamp("2025-09-24T12:00:00Z") == BASE_NS
    assert isinstance(parse_timestamp("2025-09-24T12:00:61Z"), str)
    assert isinstance(parse_timestamp("2025-09-24T12:00:00.Z"), str)
    assert isinstance(parse_timestamp("2025-09-24T12:00:00+24:00"), str)
    assert isinstance(parse_timestamp("2025-09-24T12:00"), str)
    assert isinstance(parse_timestamp("2025-09-24T12:00:0Z"), str)
    assert parse_timestamp("2025-09-24T12:00:00.5Z") == BASE_NS + 500_000_000
    for _ in range(2):  # the invalid minute is never cached as valid
        assert parse_timestamp("2025-02-30T12:00:00Z") == "day must be 01-28 in that month"


@settings(max_examples=300)
@given(
    moment=st.datetimes(
        min_value=datetime(1971, 1, 1), max_value=datetime(2261, 12, 31), timezones=st.just(UTC)
    ),
    nanos=st.integers(0, 999),
    offset_minutes=st.integers(-(23 * 60 + 59), 23 * 60 + 59),
    sep=st.sampled_from(["T", "t", " "]),
)
def test_timestamp_matches_datetime(
    moment: datetime, nanos: int, offset_minutes: int, sep: str
) -> None:
    """Against the standard library: µs from ``datetime``, the extra 3 digits by hand."""
    local = moment.astimezone(timezone(timedelta(minutes=offset_minutes)))
    text = local.strftime(f"%Y-%m-%d{sep}%H:%M:%S") + f".{local.microsecond:06d}{nanos:03d}"
    sign = "-" if offset_minutes < 0 else "+"
    text += f"{sign}{abs(offset_minutes) // 60:02d}:{abs(offset_minutes) % 60:02d}"
    expected = calendar.timegm(moment.utctimetuple()) * 10**9 + moment.microsecond * 1000 + nanos
    assert parse_timestamp(text) == expected


# --- many problems ------------------------------------------------------------------------------


def test_every_problem_across_entries_is_listed_in_order() -> None:
    raws = [
        entry(),
        entry(level="LOUD", timestamp="2025-13-01T00:00:00Z"),
        entry(),
        entry(message="", foo="x", labels={"team": "a"}, metadata=[1]),
        "not an entry",
    ]
    with pytest.raises(ValidationError) as info:
        validate_entries(raws, DEFAULTS)
    error = info.value
    assert (error.status, error.code, error.reason) == (400, "validation_error", "schema")
    assert [p["field"] for p in error.details["errors"]] == [
        "entries[1].timestamp",
        "entries[1].level",
        "entries[3].foo",
        "entries[3].message",
        "entries[3].labels.team",
        "entries[3].metadata",
        "entries[4]",
    ]
    assert set(error.details) == {"errors"}
    assert error.message.startswith(
        "7 problems: entries[1].timestamp: month must be 01-12; entries[1].level: must be one of"
    )
    assert error.message.endswith("; and 4 more")
    assert len(error.message) <= 500


def test_single_problem_message_is_field_and_rule() -> None:
    with pytest.raises(ValidationError) as info:
        validate_entries([entry(), entry(env="PROD")], DEFAULTS)
    assert info.value.message == "entries[1].env: must be 1-32 characters from a-z, 0-9 and '-'"


def test_problem_list_is_capped() -> None:
    raws = [entry(level="LOUD", env="X")] * 200
    with pytest.raises(ValidationError) as info:
        validate_entries(raws, DEFAULTS)
    details = info.value.details
    assert len(details["errors"]) == MAX_PROBLEMS
    assert details["truncated"] is True
    assert details["errors"][-1]["field"] == "entries[49].env"
    assert info.value.message.startswith(f"more than {MAX_PROBLEMS} problems: ")
    # Also inside one entry: a flood of unknown label names stops early.
    flood = {f"k{i}": "v" for i in range(10_000)}
    with pytest.raises(ValidationError) as info:
        validate_entries([entry(labels=flood)], DEFAULTS)
    assert len(info.value.details["errors"]) == MAX_PROBLEMS
    assert info.value.details["truncated"] is True


SECRET = "sk_live_SECRET_VALUE_123"


def test_values_are_never_echoed() -> None:
    raws = [
        entry(timestamp=SECRET),
        entry(level=SECRET),
        entry(service=SECRET),
        entry(env=SECRET),
        entry(message=SECRET * 400),
        entry(labels={"region": SECRET * 3}),
        entry(trace_id=SECRET * 6),
        entry(span_id=SECRET * 3),
        entry(metadata=SECRET),
        entry(labels=SECRET),
        entry(timestamp=f"2025-09-24T12:00:00.{'1' * 12}Z"),
    ]
    with pytest.raises(ValidationError) as info:
        validate_entries(raws, DEFAULTS)
    assert len(info.value.details["errors"]) == len(raws)
    text = info.value.message + json.dumps(info.value.details)
    assert "SECRET" not in text
    assert "1" * 12 not in text


def test_non_json_input_is_a_validation_error() -> None:
    """Inputs JSON cannot produce still give a ValidationError, never TypeError & co."""
    bad_values: list[Any] = [
        entry(metadata={"t": (1, 2)}),
        entry(metadata={1: "x"}),
        entry(metadata={"s": {1, 2}}),
        entry(metadata={"o": object()}),
        {1: "x", **entry()},
        entry(labels={1: "x"}),
        entry(message="lone \ud800 surrogate"),
        entry(labels={"region": "\udfff"}),
        entry(metadata={"a": ["\ud800"]}),
        entry(level="INFO", timestamp=b"2025-09-24T12:00:00Z"),
    ]
    for raw in bad_values:
        assert problems([raw]), raw


def test_results_encode_for_the_wal_and_loki() -> None:
    result = validate_entries(
        [entry(metadata={"a": [1, 2**64 - 1, -(2**63), {"b": None}]}, labels=[])], DEFAULTS
    )
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(result), type=list[LogEntry]) == result
    msgspec.json.encode(result)


# --- properties ---------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)

FIELD_NAMES = [*sorted(BASE), "labels", "trace_id", "span_id", "metadata", "extra"]
field_values = (
    json_values
    | st.sampled_from(["INFO", "warning", "2025-09-24T12:00:00Z", "payments-api", "", "eu"])
    | st.dictionaries(
        st.sampled_from(["region", "tenant", "service", "level", "team"]),
        json_values | st.text(max_size=70),
        max_size=5,
    )
)
mutated_entries = st.builds(
    lambda changes: {**BASE, **changes},
    st.dictionaries(st.sampled_from(FIELD_NAMES), field_values, max_size=4),
)


def check_outcome(raw_entries: Any) -> None:
    """Either every entry comes back as an encodable ``LogEntry`` or a ValidationError lists
    problems with ``entries`` paths; nothing else may escape."""
    try:
        result = validate_entries(raw_entries, DEFAULTS)
    except ValidationError as error:
        errors = error.details["errors"]
        assert 1 <= len(errors) <= MAX_PROBLEMS
        assert all(e["field"].startswith("entries") and e["message"] for e in errors)
        assert error.message
        return
    assert len(result) == len(raw_entries)
    assert all(type(e) is LogEntry for e in result)
    msgspec.msgpack.encode(result)
    msgspec.json.encode(result)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(json_values, max_size=5) | json_values)
def test_arbitrary_json_never_escapes_as_another_error(raw_entries: Any) -> None:
    check_outcome(raw_entries)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(mutated_entries, min_size=1, max_size=4))
def test_mutated_entries_never_escape_as_another_error(raw_entries: list[Any]) -> None:
    check_outcome(raw_entries)


@settings(max_examples=200)
@given(json_values)
def test_json_round_trip_input_behaves_the_same(value: Any) -> None:
    """What the HTTP body decoder produces (JSON text → Python) is covered as well."""
    check_outcome(msgspec.json.decode(msgspec.json.encode([value])))


@settings(max_examples=3000, derandomize=True, database=None, deadline=None)
@given(
    st.sampled_from(["2026-11-26T12:00:00", "2016-12-31T23:59:60", "1970-01-01T00:00:00"]),
    st.text(alphabet="0123456789.Zz+-: _T\u0661", max_size=13),
)
def test_second_cache_shortcut_answers_like_the_full_parse(prefix: str, tail: str) -> None:
    """Timestamps whose second was seen before skip the regex: same answers, valid or not."""
    from logstack._schema import _parse_timestamp

    parse_timestamp(prefix + "Z")  # the prefix is now cached
    text = prefix + tail
    assert parse_timestamp(text) == _parse_timestamp(text)
