"""The fast path of schema validation: the raw body decoded straight into typed structs.

``validate_entries`` (``_schema``) checks decoded JSON rule by rule, in Python, and explains
every problem. Most bodies are valid, and most of those rules are types, lengths and sets
that msgspec checks in C while it decodes. ``validate_body`` does that: one typed decode of
the body (field names, types, lengths, level spellings, entry count), then per entry only
what C cannot do (the timestamp's value, name characters, the label allowlist, the encoded
size), and builds the same ``LogEntry`` list.

It is only ever a shortcut. It returns ``None`` for any body it cannot prove valid — invalid
ones, and valid ones outside its narrower types (an empty array for ``labels``, say) — and
the caller then runs ``validate_entries`` on the decoded document, whose answer (entries, or
the error listing every problem) is the one given. ``tests/core/test_schema_fast.py`` holds
the two in agreement on generated bodies: whenever the fast path answers, its entries equal
the full validator's.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal

import msgspec
from msgspec import Meta

from ._api_types import metadata_value
from ._config import SchemaSettings
from ._entry import LogEntry
from ._schema import (
    _FRACTION_SCALE,
    _LEVELS,
    _MAX_ENV_CHARS,
    _MAX_LABEL_VALUE_CHARS,
    _MAX_NS,
    _MAX_SERVICE_CHARS,
    _MAX_SPAN_ID_CHARS,
    _MAX_TRACE_ID_CHARS,
    _NS_PER_S,
    _known_names,
    _labels,
    _learn_name,
    _Rules,
    _rules_for,
    _second_cache,
    parse_timestamp,
)

__all__ = ["validate_body"]

_NULL_FIELDS_SLACK: Final = len('"labels":null,"trace_id":null,"span_id":null,"metadata":null,')
"""How much longer an entry as received can encode than its struct: the struct leaves out
optional fields sent as ``null``; nothing else about the two encodings differs in length."""

_encode = msgspec.json.Encoder().encode

# Literal of every spelling the level table knows (the usual casings): checked in C.
_Level = Literal[tuple(_LEVELS)]  # type: ignore[valid-type]


_Int64 = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]
_Scalar = str | _Int64 | float | bool | None
"""Metadata leaves with integers within int64, so depth and range are checked in C. (The
full rule allows integers up to 2**64-1; msgspec bounds stop at int64, so such rare bodies
take the full path.)"""


def _decoder_for(rules: _Rules) -> msgspec.json.Decoder[Any]:
    """A decoder of the body with the limits of ``rules`` as msgspec constraints."""
    message_t = Annotated[str, Meta(min_length=1, max_length=rules.max_message_chars)]
    service_t = Annotated[str, Meta(min_length=1, max_length=_MAX_SERVICE_CHARS)]
    env_t = Annotated[str, Meta(min_length=1, max_length=_MAX_ENV_CHARS)]
    label_value_t = Annotated[str, Meta(max_length=_MAX_LABEL_VALUE_CHARS)]
    trace_id_t = Annotated[str, Meta(max_length=_MAX_TRACE_ID_CHARS)]
    span_id_t = Annotated[str, Meta(max_length=_MAX_SPAN_ID_CHARS)]
    metadata_t = dict[str, metadata_value(rules.max_metadata_depth - 1, _Scalar)]  # type: ignore[misc,valid-type]

    # defstruct, not class bodies: the types are built here, from the running limits.
    fast_entry = msgspec.defstruct(
        "FastEntry",
        [
            ("timestamp", str),
            ("level", _Level),
            ("message", message_t),
            ("service", service_t),
            ("env", env_t),
            ("labels", dict[str, label_value_t] | None, None),
            ("trace_id", trace_id_t | None, None),
            ("span_id", span_id_t | None, None),
            ("metadata", metadata_t | None, None),
        ],
        forbid_unknown_fields=True,
        omit_defaults=True,
        gc=False,
    )
    entries_t = Annotated[list[fast_entry], Meta(min_length=1, max_length=rules.max_entries)]  # type: ignore[valid-type]
    fast_body = msgspec.defstruct(
        "FastBody", [("entries", entries_t)], forbid_unknown_fields=True, gc=False
    )
    return msgspec.json.Decoder(fast_body)


_decoders: dict[int, tuple[_Rules, msgspec.json.Decoder[Any]]] = {}


def _decoder(rules: _Rules) -> msgspec.json.Decoder[Any]:
    cached = _decoders.get(id(rules))
    if cached is None or cached[0] is not rules:
        _decoders.clear()  # one set of rules is live at a time (reload replaces it)
        cached = _decoders[id(rules)] = (rules, _decoder_for(rules))
    return cached[1]


def validate_body(body: bytes, settings: SchemaSettings) -> list[LogEntry] | None:
    """The body's entries if it is valid and within the fast path's types, else ``None``
    (then ``validate_entries`` on the decoded document decides, and explains)."""
    rules = _rules_for(settings)
    try:
        decoded = _decoder(rules).decode(body)
    except (msgspec.DecodeError, RecursionError, UnicodeDecodeError):
        return None
    raw = decoded.entries
    try:
        total = len(_encode(raw))
    except (TypeError, ValueError, OverflowError, RecursionError, msgspec.EncodeError):
        return None
    max_bytes = rules.max_entry_bytes - _NULL_FIELDS_SLACK
    if total > max_bytes:  # the whole array fits if any entry may not: look at each
        try:
            if any(len(_encode(entry)) > max_bytes for entry in raw):
                return None
        except (TypeError, ValueError, OverflowError, RecursionError, msgspec.EncodeError):
            return None
    known = _known_names
    levels = _LEVELS
    entries: list[LogEntry] = []
    append = entries.append
    passed: dict[str, str] | None = None  # the last labels that passed the checks unchanged
    seconds_of = _second_cache.get
    for entry in raw:
        timestamp = entry.timestamp
        # parse_timestamp's fast path for a fraction and "Z", inlined: the call and the
        # tail's slice are a quarter of what it costs per entry. Anything else calls it.
        n = len(timestamp)
        seconds = seconds_of(timestamp[:19])
        if (
            seconds is not None
            and 22 <= n <= 30
            and timestamp[19] == "."
            and timestamp[-1] in "Zz"
            and (fraction := timestamp[20:-1]).isdigit()
            and fraction.isascii()
        ):
            ns = seconds * _NS_PER_S + int(fraction) * _FRACTION_SCALE[n - 21]
            if not 0 <= ns <= _MAX_NS:
                return None
        else:
            parsed = parse_timestamp(timestamp)
            if type(parsed) is not int:
                return None
            ns = parsed
        service = entry.service
        env = entry.env
        if not (service in known or _learn_name(service)) or not (env in known or _learn_name(env)):
            return None
        labels = entry.labels
        if not labels:
            labels = {}
        elif labels != passed:  # a service's entries mostly repeat their labels: checked once
            checked = _labels(labels, rules)
            if checked is None:
                return None
            if checked is labels:
                passed = labels
            labels = checked
        metadata = entry.metadata  # depth and integers were checked by the decoder
        append(
            LogEntry(
                ns,
                levels[entry.level],
                entry.message,
                service,
                env,
                labels,
                entry.trace_id,
                entry.span_id,
                metadata,
                timestamp,
            )
        )
    return entries
