"""The published schema cannot drift from the validator.

For generated ingest bodies (valid, near the limits, and broken in every field), three
checkers must agree:

1. the server's path: ``Envelope.document()`` then ``validate_entries`` (what the pipeline
   runs);
2. the msgspec types ``/openapi.json`` is generated from (``api_types(schema)``);
3. the published JSON Schema itself, evaluated by an independent JSON Schema engine with
   ECMA-262 regexes (``jsonschema_rs``);
4. the validation fast path (``validate_body``: the body decoded straight into typed
   structs), which may decline any body but, whenever it answers, must answer exactly the
   entries (1) builds.

(1) and (2) must give the same accept/reject answer. (3) must accept everything the server
accepts; where it accepts what the server refuses, the refusal must come from a rule the
schema leaves to the entry type's ``__post_init__`` (29 February outside leap years, the
exact ends of the 64-bit nanosecond range, the label count when the allowlist is longer
than ``max_labels``, metadata integers above 2**64-1, a trailing newline that Python's
``$`` lets through) — those rules are
stated in the field descriptions instead. The one rule neither type nor schema checks is
the encoded size of an entry as received (``max_entry_bytes``); bodies breaking it must be
refused by the server and are otherwise left out of the comparison. And one JSON Schema
quirk: a metadata integer out of range still matches the ``number`` branch (JSON Schema's
numbers include integers, msgspec's ``float`` does not), so the schema admits it while the
type (and the server) refuse it; that refusal is allowed too.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

import jsonschema_rs
import msgspec
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from logstack._api_types import LEVEL_ALIASES, LEVEL_NAMES, api_types
from logstack._config import SchemaSettings, Settings
from logstack._entry import LogEntry
from logstack._envelope import Envelope
from logstack._errors import ValidationError
from logstack._openapi import openapi_document
from logstack._schema import validate_entries
from logstack._schema_fast import validate_body

DEFAULT = SchemaSettings()
SMALL = SchemaSettings(
    label_allowlist=["region", "tenant", "zone", "level"],
    max_entries=3,
    max_message_chars=12,
    max_labels=2,
    max_metadata_depth=3,
    max_entry_bytes=2048,
)
NOT_A_SCHEMA_RULE = re.compile(
    r" - at `\$\.entries\[\d+\]`$"  # __post_init__
    r"|^Expected `int` >= -9223372036854775808 - at `\$\.entries\[\d+\]\.metadata"
)


class Verdicts:
    def __init__(self, schema: SchemaSettings) -> None:
        self.schema = schema
        self.types = api_types(schema)
        document = openapi_document(Settings(schema=schema))
        self.validator = jsonschema_rs.Draft202012Validator(
            {
                "$ref": "#/components/schemas/IngestRequest",
                "components": document["components"],
            }
        )

    def server(self, body: bytes) -> bool:
        return self.server_entries(body) is not None

    def server_entries(self, body: bytes) -> list[LogEntry] | None:
        try:
            entries = Envelope("conformance", None, body).document()
            return validate_entries(entries, self.schema)
        except ValidationError:
            return None

    def check_fast_path(self, body: bytes) -> None:
        fast = validate_body(body, self.schema)
        if fast is not None:
            assert fast == self.server_entries(body), f"fast path differs for {body!r}"

    def typed(self, body: bytes) -> tuple[bool, str]:
        try:
            self.types.decode_request(body)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            return False, str(exc)
        return True, ""

    def published(self, body: bytes) -> bool:
        try:
            instance = msgspec.json.decode(body)
        except msgspec.DecodeError:
            return False
        return bool(self.validator.is_valid(instance))

    def check(self, doc: Any) -> bool:
        """Assert the three agree as described above; return the server's verdict."""
        body = msgspec.json.encode(doc)
        self.check_fast_path(body)
        server = self.server(body)
        if _oversized(doc, self.schema.max_entry_bytes):
            assert not server, "an oversized entry was accepted"
            return server
        typed, why = self.typed(body)
        assert typed == server, f"server {server}, msgspec type {typed} ({why}) for {body!r}"
        published = self.published(body)
        if server:
            assert published, f"the published schema refuses an accepted body: {body!r}"
        elif published:
            assert NOT_A_SCHEMA_RULE.search(why), (
                f"the published schema accepts a body refused by a schema rule ({why}): {body!r}"
            )
        return server


VERDICTS = {"default": Verdicts(DEFAULT), "small": Verdicts(SMALL)}


def _oversized(doc: Any, limit: int) -> bool:
    entries = doc.get("entries") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        return False
    return any(isinstance(e, dict) and len(msgspec.json.encode(e)) > limit for e in entries)


# --- strategies ---------------------------------------------------------------------------------

MISSING = object()
TEXT = st.characters(exclude_categories=("Cs",))  # JSON text cannot carry lone surrogates
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.sampled_from([2**63 - 1, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1])
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(TEXT, max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.text(TEXT, max_size=4), children, max_size=3)
    ),
    max_leaves=12,
)
not_strings = st.none() | st.booleans() | st.integers() | st.lists(st.integers(), max_size=1)


def _two(n: int) -> str:
    return f"{n:02d}"


timestamps_built = st.builds(
    lambda y, mo, d, sep, h, mi, s, frac, zone: (
        f"{y:04d}-{_two(mo)}-{_two(d)}{sep}{_two(h)}:{_two(mi)}:{_two(s)}{frac}{zone}"
    ),
    st.sampled_from([1969, 1970, 1972, 2000, 2023, 2024, 2100, 2200, 2260, 2261, 2262, 2263]),
    st.integers(0, 13),
    st.sampled_from([0, 1, 9, 10, 19, 20, 28, 29, 30, 31, 32]),
    st.sampled_from(["T", "t", " ", "_"]),
    st.integers(0, 24),
    st.integers(0, 60),
    st.integers(0, 61),
    st.sampled_from(["", ".", ".5", ".123456", ".123456789", ".1234567890"]),
    st.sampled_from(["Z", "z", "", "+00:00", "-01:30", "+23:59", "+24:00", "-00:60", "Z\n"]),
)
timestamps = (
    timestamps_built
    | st.sampled_from(
        [
            "2262-04-11T23:47:16.854775807Z",
            "2262-04-11T23:47:16.854775808Z",
            "1970-01-01T00:00:00Z",
            "1970-01-01T00:30:00+01:00",
            "1969-12-31T23:30:00-01:00",
            "2024-02-29T00:00:00Z",
            "2023-02-29T00:00:00Z",
            "2025-09-24T12:00:60Z",
        ]
    )
    | st.text(st.sampled_from("0123456789-:TZ.+ "), max_size=30)
    | not_strings
)


def _recase(word: str, flips: list[bool]) -> str:
    return "".join(c.swapcase() if flip else c for c, flip in zip(word, flips, strict=False))


levels = (
    st.builds(
        _recase,
        st.sampled_from([*LEVEL_NAMES, *LEVEL_ALIASES]),
        st.lists(st.booleans(), min_size=8, max_size=8),
    )
    | st.sampled_from(
        ["", "INF", "WARNINGS", "info\n", " info", "\u0131nfo", "\u0130NFO", "ERROR "]
    )
    | st.text(TEXT, max_size=6)
    | not_strings
)


def sized_text(limit: int, alphabet: Any = TEXT) -> st.SearchStrategy[str]:
    return st.text(alphabet, max_size=4) | st.text(alphabet, min_size=limit - 1, max_size=limit + 1)


def names(limit: int) -> st.SearchStrategy[Any]:
    return (
        sized_text(limit, st.sampled_from("ab09-"))
        | st.text(st.sampled_from("az09-_A .\n"), max_size=6)
        | st.sampled_from(["payments-api", "prod", "a\n", "-", "a_b"])
        | not_strings
    )


def labels(schema: SchemaSettings) -> st.SearchStrategy[Any]:
    keys = st.sampled_from(
        [*schema.label_allowlist, "service", "env", "level", "team", "Region", ""]
    )
    values = sized_text(64, st.sampled_from("xy")) | st.text(TEXT, max_size=3) | not_strings
    return (
        st.dictionaries(keys, values, max_size=6)
        | st.just([])
        | st.lists(st.text(max_size=1), min_size=1, max_size=2)
        | not_strings
    )


def metadata(depth: int) -> st.SearchStrategy[Any]:
    nested: st.SearchStrategy[Any] = st.integers(0, 3)
    for _ in range(depth + 1):
        nested = st.dictionaries(st.sampled_from(["k", "l"]), nested, max_size=1) | st.lists(
            nested, max_size=1
        )
    return (
        st.dictionaries(st.text(TEXT, max_size=4), json_values, max_size=3)
        | st.dictionaries(st.just("deep"), nested, min_size=1, max_size=1)
        | st.just([])
        | st.lists(json_values, min_size=1, max_size=2)
        | json_scalars
    )


def entries(schema: SchemaSettings) -> st.SearchStrategy[Any]:
    def optional(strategy: st.SearchStrategy[Any], missing_weight: int = 1) -> Any:
        return st.one_of(*([st.just(MISSING)] * missing_weight), strategy)

    fields = st.fixed_dictionaries(
        {
            "timestamp": optional(timestamps),
            "level": optional(levels),
            "message": optional(sized_text(schema.max_message_chars) | not_strings),
            "service": optional(names(64)),
            "env": optional(names(32)),
            "labels": optional(labels(schema), 2),
            "trace_id": optional(sized_text(128) | not_strings, 2),
            "span_id": optional(sized_text(64) | not_strings, 2),
            "metadata": optional(metadata(schema.max_metadata_depth), 2),
            "extra": optional(json_scalars, 6),
        }
    )
    return st.builds(lambda d: {k: v for k, v in d.items() if v is not MISSING}, fields) | (
        json_scalars
    )


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """``one_of`` with weights (``one_of`` itself drops repeated strategies)."""
    pool = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(pool) - 1).flatmap(lambda i: pool[i])


NAME_CHARS = st.sampled_from("abz09-")
valid_timestamps = st.builds(
    lambda moment, digits, zone: (
        moment.strftime("%Y-%m-%dT%H:%M:%S")
        + (f".{moment.microsecond:06d}"[: digits + 1] if digits else "")
        + zone
    ),
    st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2262, 4, 10)),
    st.integers(0, 6),
    st.sampled_from(["Z", "z", "+00:00", "-05:30", "+14:00"]),
)


def valid_entries(schema: SchemaSettings) -> st.SearchStrategy[dict[str, Any]]:
    allowed = [n for n in schema.label_allowlist if n not in ("service", "env", "level")]
    return st.fixed_dictionaries(
        {
            "timestamp": valid_timestamps,
            "level": st.builds(
                _recase,
                st.sampled_from([*LEVEL_NAMES, *LEVEL_ALIASES]),
                st.lists(st.booleans(), min_size=8, max_size=8),
            ),
            "message": st.text(TEXT, min_size=1, max_size=min(schema.max_message_chars, 40)),
            "service": st.text(NAME_CHARS, min_size=1, max_size=64),
            "env": st.text(NAME_CHARS, min_size=1, max_size=32),
        },
        optional={
            "labels": st.dictionaries(
                st.sampled_from(allowed), st.text(TEXT, max_size=64), max_size=schema.max_labels
            )
            | st.dictionaries(st.sampled_from(["service", "env", "level"]), st.text(max_size=3))
            | st.just([])
            | st.none(),
            "trace_id": st.text(TEXT, max_size=128) | st.none(),
            "span_id": st.text(TEXT, max_size=64) | st.none(),
            "metadata": st.dictionaries(st.text(TEXT, max_size=4), json_values, max_size=3)
            | st.just([])
            | st.none(),
        },
    )


FIELD_NAMES = [
    "timestamp", "level", "message", "service", "env", "labels", "trace_id", "span_id",
    "metadata", "extra",
]  # fmt: skip


def mutated_entries(schema: SchemaSettings) -> st.SearchStrategy[dict[str, Any]]:
    """A valid entry with one field replaced by anything a field may hold, or removed."""
    values = st.one_of(
        st.just(MISSING),
        timestamps,
        levels,
        names(64),
        labels(schema),
        metadata(schema.max_metadata_depth),
        sized_text(schema.max_message_chars),
    )
    return st.builds(
        lambda entry, name, value: {
            k: v for k, v in {**entry, name: value}.items() if v is not MISSING
        },
        valid_entries(schema),
        st.sampled_from(FIELD_NAMES),
        values,
    )


def bodies(schema: SchemaSettings) -> st.SearchStrategy[Any]:
    one = weighted((6, valid_entries(schema)), (3, mutated_entries(schema)), (1, entries(schema)))
    batch = st.lists(one, min_size=0, max_size=min(schema.max_entries + 1, 4))
    return weighted(
        (8, st.builds(lambda e: {"entries": e}, batch)),
        (1, st.builds(lambda e, x: {"entries": e, "extra": x}, batch, json_scalars)),
        (1, json_values),
    )


# --- the properties -----------------------------------------------------------------------------

PROPERTY = settings(
    max_examples=1500,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@PROPERTY
@given(bodies(DEFAULT))
def test_default_limits_agree(doc: Any) -> None:
    event("accepted" if VERDICTS["default"].check(doc) else "rejected")


@PROPERTY
@given(bodies(SMALL))
def test_configured_limits_agree(doc: Any) -> None:
    event("accepted" if VERDICTS["small"].check(doc) else "rejected")


def _entry(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "timestamp": "2025-09-24T12:00:00.123456789Z",
        "level": "ERROR",
        "message": "Payment failed",
        "service": "payments-api",
        "env": "prod",
    }
    base.update(changes)
    return {k: v for k, v in base.items() if v is not MISSING}


EDGES: list[tuple[str, dict[str, Any], bool]] = [
    ("valid", _entry(), True),
    ("level any case", _entry(level="wArNiNg"), True),
    ("level trailing newline", _entry(level="INFO\n"), False),
    ("level dotless i", _entry(level="\u0131nfo"), False),
    ("service trailing newline", _entry(service="payments\n"), False),
    ("leap day", _entry(timestamp="2024-02-29T00:00:00Z"), True),
    ("no leap day", _entry(timestamp="2023-02-29T00:00:00Z"), False),
    ("leap century", _entry(timestamp="2000-02-29T00:00:00Z"), True),
    ("no leap century", _entry(timestamp="2100-02-29T00:00:00Z"), False),
    ("30 February", _entry(timestamp="2024-02-30T00:00:00Z"), False),
    ("31 April", _entry(timestamp="2024-04-31T00:00:00Z"), False),
    ("31 December", _entry(timestamp="2024-12-31T23:59:59Z"), True),
    ("year 1969", _entry(timestamp="1969-12-31T23:00:00Z"), False),
    ("1969 local, 1970 in UTC", _entry(timestamp="1969-12-31T23:00:00-01:00"), True),
    ("epoch via offset", _entry(timestamp="1970-01-01T01:00:00+01:00"), True),
    ("year 2263", _entry(timestamp="2263-01-01T00:00:00Z"), False),
    ("late 2262", _entry(timestamp="2262-12-31T00:00:00Z"), False),
    ("leap second", _entry(timestamp="2016-12-31T23:59:60Z"), True),
    ("last nanosecond", _entry(timestamp="2262-04-11T23:47:16.854775807Z"), True),
    ("past the last nanosecond", _entry(timestamp="2262-04-11T23:47:16.854775808Z"), False),
    ("before the epoch via offset", _entry(timestamp="1970-01-01T00:30:00+01:00"), False),
    ("ten fraction digits", _entry(timestamp="2025-09-24T12:00:00.1234567890Z"), False),
    ("labels as []", _entry(labels=[]), True),
    ("labels as [x]", _entry(labels=["x"]), False),
    ("metadata as []", _entry(metadata=[]), True),
    ("reserved labels do not count", _entry(labels={"service": "x", "env": "y"}), True),
    ("null optional", _entry(trace_id=None, labels=None, metadata=None), True),
    ("null required", _entry(message=None), False),
    ("missing required", _entry(env=MISSING), False),
    ("unknown field", _entry(colour="red"), False),
    ("metadata uint64 max", _entry(metadata={"n": 2**64 - 1}), True),
    ("metadata past uint64", _entry(metadata={"n": 2**64}), False),
    ("metadata depth 5", _entry(metadata={"a": {"b": {"c": {"d": {"e": 1}}}}}), True),
    ("metadata depth 6", _entry(metadata={"a": {"b": {"c": {"d": {"e": {}}}}}}), False),
    ("metadata arrays count", _entry(metadata={"a": [[[[1]]]]}), True),
    ("metadata arrays too deep", _entry(metadata={"a": [[[[[]]]]]}), False),
    ("metadata float", _entry(metadata={"f": 1e300, "g": -0.5}), True),
    ("metadata int min", _entry(metadata={"n": -(2**63)}), True),
    ("metadata below int min", _entry(metadata={"n": -(2**63) - 1}), False),
    ("label value 64", _entry(labels={"region": "x" * 64}), True),
    ("label value 65", _entry(labels={"region": "x" * 65}), False),
    ("message 8192", _entry(message="m" * 8192), True),
    ("message 8193", _entry(message="m" * 8193), False),
]


@pytest.mark.parametrize(("case", "entry", "accepted"), EDGES, ids=[c[0] for c in EDGES])
def test_edges_agree(case: str, entry: dict[str, Any], accepted: bool) -> None:
    assert VERDICTS["default"].check({"entries": [entry]}) is accepted


def test_label_count_rule_is_enforced_by_both() -> None:
    """SMALL allows three labels but at most two per entry: JSON Schema cannot say that."""
    verdicts = VERDICTS["small"]
    assert verdicts.check({"entries": [_entry(message="hi", labels={"region": "a", "zone": "b"})]})
    three = {"entries": [_entry(message="hi", labels={"region": "a", "zone": "b", "tenant": "c"})]}
    assert not verdicts.check(three)
    assert verdicts.published(msgspec.json.encode(three))  # described, not a schema rule


def test_batch_size_limits_come_from_the_settings() -> None:
    verdicts, entry = VERDICTS["small"], _entry(message="hi")
    assert verdicts.check({"entries": [entry] * 3})
    assert not verdicts.check({"entries": [entry] * 4})
    assert not verdicts.check({"entries": []})
    assert not verdicts.check({"entries": [entry], "extra": 1})
