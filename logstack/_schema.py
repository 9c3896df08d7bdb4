"""Schema enforcement for ingested entries (SPEC §3.1): decoded JSON in, ``LogEntry`` out.

``validate_entries`` is all-or-nothing: it either returns one ``LogEntry`` per input entry or
raises one ``ValidationError`` listing every problem found, each as
``{"field": "entries[3].level", "message": "..."}``. Messages name the field and the rule,
never the offending value (values may be secrets that masking did not recognise).

The happy path is the common one, so every rule is a cheap inline test there; only when a
test fails does an out-of-line ``_explain_*`` helper work out *why*, and error text is built
only then. Small bounded caches (compiled settings, the start of recently seen timestamp
minutes, recently seen service/env names) keep repeated work off that path. A ``LogEntry``
shares its ``labels``/``metadata`` dicts with the decoded input where nothing had to change.
Whatever passes is guaranteed to encode as JSON and as MessagePack (the WAL), so no
input can turn into a 500 further down the pipeline.

Rules beyond the SPEC table, decided here:

* ``timestamp`` follows RFC 3339 §5.6: ``T`` or ``t`` (or, as §5.6 allows, a space) between
  date and time, ``Z``/``z`` or ``±hh:mm``, 1-9 fraction digits. Second ``60`` (a leap
  second) is accepted and counts like POSIX time does, as the next second. The instant must
  lie in [1970-01-01T00:00:00Z, 2262-04-11T23:47:16.854775807Z], so ``timestamp_ns`` fits
  the signed 64-bit nanoseconds Loki and the WAL use.
* ``null`` for an optional field means absent. An empty ``labels``/``metadata`` array is an
  empty object (PHP clients); a non-empty array is an error.
* ``labels`` values are strings of at most 64 characters, including those of the reserved
  keys ``service``/``env``/``level``, which are accepted and dropped and do not count
  towards ``max_labels``.
* ``metadata`` nesting depth: a scalar has depth 0; an object or array has 1 + the largest
  depth of its members (1 if empty). The metadata object's depth must be at most
  ``max_metadata_depth``: depth 1 is an object of scalars only, ``{"a": {}}`` and
  ``{"a": [1]}`` are depth 2; arrays count like objects.
* ``metadata`` may hold only JSON values (objects with string keys, arrays, strings, numbers,
  booleans, null); integers must fit MessagePack (-2**63 .. 2**64-1).
* The size rule is ``len(msgspec.json.encode(entry)) <= max_entry_bytes`` on the entry as
  received (after masking), unknown fields included.
* More than ``max_entries`` entries is reported alone, without looking at the entries, and at
  most ``MAX_PROBLEMS`` problems are collected (``details["truncated"]`` is then ``true``):
  rejections stay cheap however bad the input is.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any, Final, NoReturn

import msgspec

from ._config import SchemaSettings
from ._entry import LogEntry
from ._errors import ValidationError

__all__ = ["MAX_PROBLEMS", "check_entry_count", "parse_timestamp", "validate_entries"]

MAX_PROBLEMS: Final = 100
"""At most this many problems are listed; beyond it collection stops and the answer says
``"truncated": true`` (rejections stay cheap whatever the input)."""

_SUMMARY_PROBLEMS: Final = 3
_SUMMARY_MAX_CHARS: Final = 500
_KEY_SHOWN_CHARS: Final = 64
_MAX_LABEL_VALUE_CHARS: Final = 64
_MAX_TRACE_ID_CHARS: Final = 128
_MAX_SPAN_ID_CHARS: Final = 64
_MAX_SERVICE_CHARS: Final = 64
_MAX_ENV_CHARS: Final = 32

_FIELDS: Final = frozenset(
    ("timestamp", "level", "message", "service", "env", "labels", "trace_id", "span_id", "metadata")
)
_RESERVED_LABELS: Final = frozenset(("service", "env", "level"))

_LEVEL_NAMES: Final = ("TRACE", "DEBUG", "INFO", "WARN", "ERROR", "FATAL")
_LEVEL_ALIASES: Final = {"WARNING": "WARN", "CRITICAL": "FATAL"}


def _level_table() -> dict[str, str]:
    """Every accepted spelling → normalised level; the usual casings are looked up directly."""
    table: dict[str, str] = {}
    for name, normal in [*((n, n) for n in _LEVEL_NAMES), *_LEVEL_ALIASES.items()]:
        for spelling in (name, name.lower(), name.capitalize()):
            table[spelling] = normal
    return table


_LEVELS: Final = _level_table()
_NAME_RE: Final = re.compile(r"[a-z0-9-]+", re.ASCII)
_PLAIN_KEY_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*", re.ASCII)

# --- timestamps -------------------------------------------------------------------------------

_TIMESTAMP_RE: Final = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}"
    r"(?:\.([0-9]+))?(?:[Zz]|([+-])([0-9]{2}):([0-9]{2}))",
    re.ASCII,
)
"""Fixed positions: year [0:4], month [5:7], day [8:10], hour [11:13], minute [14:16],
second [17:19]; groups: fraction, offset sign, offset hours, offset minutes."""
_NS_PER_S: Final = 1_000_000_000
_MAX_NS: Final = 2**63 - 1
_FRACTION_SCALE: Final = tuple(10 ** (9 - digits) for digits in range(10))
_DAYS_IN_MONTH: Final = (0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)

_TS_FORMAT: Final = (
    "must be an RFC 3339 timestamp with Z or a UTC offset, "
    "e.g. 2025-09-24T12:00:00.123456789Z or 2025-09-24T14:00:00+02:00"
)
_TS_FRACTION: Final = "at most 9 fractional-second digits (nanoseconds)"
_TS_MONTH: Final = "month must be 01-12"
_TS_HOUR: Final = "hour must be 00-23"
_TS_MINUTE: Final = "minute must be 00-59"
_TS_SECOND: Final = "second must be 00-60"
_TS_OFFSET: Final = "UTC offset must be within -23:59..+23:59"
_TS_RANGE: Final = (
    "must lie between 1970-01-01T00:00:00Z and 2262-04-11T23:47:16.854775807Z "
    "(nanoseconds since the epoch must fit in 64 bits)"
)


def _days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm)."""
    year -= month <= 2
    era = year // 400
    year_of_era = year - era * 400
    day_of_year = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    day_of_era = year_of_era * 365 + year_of_era // 4 - year_of_era // 100 + day_of_year
    return era * 146097 + day_of_era - 719468


def parse_timestamp(text: str) -> int | str:
    """Nanoseconds since the epoch (UTC) of an RFC 3339 timestamp, or why it is invalid.

    Returns an ``int`` on success and the rule it breaks (a ``str`` that never quotes the
    input) otherwise; see the module docstring for the accepted syntax and range.

    Entries of a batch mostly share their second: once a ``YYYY-MM-DDTHH:MM:SS`` prefix has
    been parsed in full, later timestamps with it and a plain UTC tail (``Z`` or
    ``.fffZ``, 1-9 digits) skip the regex.
    """
    seconds = _second_cache.get(text[:19])
    if seconds is not None:
        tail = text[19:]
        if tail == "Z" or tail == "z":
            ns = seconds * _NS_PER_S
        elif (
            3 <= len(tail) <= 11
            and tail[0] == "."
            and (tail[-1] == "Z" or tail[-1] == "z")
            and (fraction := tail[1:-1]).isdigit()
            and fraction.isascii()
        ):
            ns = seconds * _NS_PER_S + int(fraction) * _FRACTION_SCALE[len(fraction)]
        else:
            return _parse_timestamp(text)
        return ns if 0 <= ns <= _MAX_NS else _TS_RANGE
    return _parse_timestamp(text)


def _parse_timestamp(text: str) -> int | str:
    match = _TIMESTAMP_RE.fullmatch(text)
    if match is None:
        return _TS_FORMAT
    minute_start: int | str | None = _minute_cache.get(text[:16])
    if minute_start is None:
        minute_start = _minute_start(text)
    if isinstance(minute_start, str):
        return minute_start
    second = int(text[17:19])
    if second > 60:
        return _TS_SECOND
    if len(_second_cache) >= _SECOND_CACHE_SIZE:
        _second_cache.clear()
    _second_cache[text[:19]] = minute_start + second  # valid, local time: see parse_timestamp
    ns = (minute_start + second) * _NS_PER_S
    if len(text) > 20:  # more than "...:ssZ": a fraction and/or an offset
        fraction, sign, offset_h, offset_m = match.groups()
        if fraction is not None:
            if len(fraction) > 9:
                return _TS_FRACTION
            ns += int(fraction) * _FRACTION_SCALE[len(fraction)]
        if sign is not None:
            hours, minutes = int(offset_h), int(offset_m)
            if hours > 23 or minutes > 59:
                return _TS_OFFSET
            offset = (hours * 3600 + minutes * 60) * _NS_PER_S
            ns = ns - offset if sign == "+" else ns + offset
    if not 0 <= ns <= _MAX_NS:
        return _TS_RANGE
    return ns


_second_cache: dict[str, int] = {}
"""``YYYY-MM-DDTHH:MM:SS`` (already validated) → its seconds since the epoch, read as UTC."""
_SECOND_CACHE_SIZE: Final = 4096

_minute_cache: dict[str, int] = {}
"""``YYYY-MM-DDTHH:MM`` → its seconds since the epoch: entries of a batch mostly share it."""
_MINUTE_CACHE_SIZE: Final = 1024


def _minute_start(text: str) -> int | str:
    """Seconds since the epoch at the start of the (local) minute ``text`` begins with."""
    year, month, day = int(text[0:4]), int(text[5:7]), int(text[8:10])
    hour, minute = int(text[11:13]), int(text[14:16])
    if not 1 <= month <= 12:
        return _TS_MONTH
    days_in_month = _DAYS_IN_MONTH[month]
    if month == 2 and year % 4 == 0 and (year % 100 != 0 or year % 400 == 0):
        days_in_month = 29
    if not 1 <= day <= days_in_month:
        return f"day must be 01-{days_in_month} in that month"
    if hour > 23:
        return _TS_HOUR
    if minute > 59:
        return _TS_MINUTE
    seconds = _days_from_civil(year, month, day) * 86400 + hour * 3600 + minute * 60
    if len(_minute_cache) >= _MINUTE_CACHE_SIZE:
        _minute_cache.clear()
    _minute_cache[text[:16]] = seconds
    return seconds


# --- compiled settings ------------------------------------------------------------------------


class _Rules:
    """``SchemaSettings`` turned into what the checks use (sets built once per settings)."""

    __slots__ = (
        "accepted_labels",
        "allowed_labels",
        "allowed_text",
        "max_entries",
        "max_entry_bytes",
        "max_labels",
        "max_message_chars",
        "max_metadata_depth",
        "settings",
    )

    def __init__(self, settings: SchemaSettings) -> None:
        self.settings = settings
        self.allowed_labels = frozenset(settings.label_allowlist)
        self.accepted_labels = self.allowed_labels | _RESERVED_LABELS
        self.allowed_text = ", ".join(sorted(self.allowed_labels)) or "none"
        self.max_entries = settings.max_entries
        self.max_entry_bytes = settings.max_entry_bytes
        self.max_labels = settings.max_labels
        self.max_message_chars = settings.max_message_chars
        self.max_metadata_depth = settings.max_metadata_depth


_rules_cache: _Rules | None = None


def _rules_for(settings: SchemaSettings) -> _Rules:
    """The compiled rules of ``settings``; one slot suffices (settings change on reload only)."""
    global _rules_cache
    rules = _rules_cache
    if rules is None or rules.settings is not settings:
        rules = _rules_cache = _Rules(settings)
    return rules


# --- validation -------------------------------------------------------------------------------

Problem = dict[str, str]


def check_entry_count(raw_entries: list[Any], settings: SchemaSettings) -> None:
    """Refuse an ``entries`` that is not an array of 1 to ``max_entries`` items, as
    ``validate_entries`` does: also called before the masking walk, so that an oversized
    request is refused without its entries being walked."""
    if type(raw_entries) is not list:
        kind = _kind(raw_entries)
        _raise([_problem("entries", f"must be a JSON array of log entries (got {kind})")])
    count = len(raw_entries)
    if count == 0:
        _raise([_problem("entries", "must contain at least 1 entry")])
    if count > settings.max_entries:
        limit = settings.max_entries
        _raise([_problem("entries", f"at most {limit} entries per request (got {count})")])


def validate_entries(raw_entries: list[Any], settings: SchemaSettings) -> list[LogEntry]:
    """Check the decoded ``entries`` array against the schema and build the ``LogEntry`` list.

    Raises ``ValidationError`` (``reason="schema"``) listing every problem in
    ``details["errors"]`` if any entry breaks any rule; nothing else escapes for any input.
    """
    rules = _rules_for(settings)
    check_entry_count(raw_entries, settings)
    buffer = bytearray()
    entries: list[LogEntry] = []
    problems: list[Problem] = []
    for index, raw in enumerate(raw_entries):
        entry = _entry(index, raw, rules, problems, buffer)
        if entry is not None:
            entries.append(entry)
        elif len(problems) > MAX_PROBLEMS:
            break
    if problems:
        _raise(problems)
    return entries


_encode_into = msgspec.json.Encoder().encode_into
_ENCODE_ERRORS: Final = (TypeError, ValueError, OverflowError, RecursionError, msgspec.EncodeError)


def _entry(
    index: int, raw: Any, rules: _Rules, problems: list[Problem], buffer: bytearray
) -> LogEntry | None:
    """One entry as a ``LogEntry``; ``None`` if it is invalid (its problems are appended)
    or if an earlier entry was (the request is rejected anyway; only problems matter)."""
    if type(raw) is not dict:
        problems.append(_problem(f"entries[{index}]", f"must be a JSON object (got {_kind(raw)})"))
        return None
    ok = True
    before = len(problems)
    get: Callable[[str], Any] = raw.get
    if not raw.keys() <= _FIELDS:
        ok = False
        _explain_unknown(index, raw, problems)

    timestamp = get("timestamp")
    ns = 0
    if type(timestamp) is str:
        parsed = parse_timestamp(timestamp)
        if isinstance(parsed, int):
            ns = parsed
        else:
            ok = False
            problems.append(_problem(f"entries[{index}].timestamp", parsed))
    else:
        ok = False
        _field_problem(index, "timestamp", timestamp, _TS_FORMAT, problems)

    level = get("level")
    normal = _LEVELS.get(level) if type(level) is str else None
    if normal is None:
        if type(level) is str and level.isascii():
            normal = _LEVELS.get(level.upper())
        if normal is None:
            ok = False
            normal = ""
            _field_problem(index, "level", level, _LEVEL_RULE, problems)

    message = get("message")
    if not (type(message) is str and 0 < len(message) <= rules.max_message_chars):
        ok = False
        _explain_message(index, message, rules, problems)

    service = get("service")
    if not (
        type(service) is str
        and len(service) <= _MAX_SERVICE_CHARS
        and (service in _known_names or _learn_name(service))
    ):
        ok = False
        _field_problem(index, "service", service, _SERVICE_RULE, problems)

    env = get("env")
    if not (
        type(env) is str
        and len(env) <= _MAX_ENV_CHARS
        and (env in _known_names or _learn_name(env))
    ):
        ok = False
        _field_problem(index, "env", env, _ENV_RULE, problems)

    raw_labels = get("labels")
    labels = {} if raw_labels is None else _labels(raw_labels, rules)
    if labels is None:
        ok = False
        labels = {}
        _explain_labels(index, raw_labels, rules, problems)

    trace_id = get("trace_id")
    if trace_id is not None and not (
        type(trace_id) is str and len(trace_id) <= _MAX_TRACE_ID_CHARS
    ):
        ok = False
        _field_problem(index, "trace_id", trace_id, _TRACE_ID_RULE, problems)

    span_id = get("span_id")
    if span_id is not None and not (type(span_id) is str and len(span_id) <= _MAX_SPAN_ID_CHARS):
        ok = False
        _field_problem(index, "span_id", span_id, _SPAN_ID_RULE, problems)

    metadata = get("metadata")
    if metadata is not None:
        if type(metadata) is list and not metadata:
            metadata = {}
        elif not (type(metadata) is dict and _metadata_ok(metadata, rules.max_metadata_depth)):
            ok = False
            _explain_metadata(index, metadata, rules, problems)

    # Also the guard that whatever passes can be encoded later (no lone surrogates, ...).
    try:
        _encode_into(raw, buffer)
    except _ENCODE_ERRORS:
        if ok:  # otherwise the problems above already explain it
            ok = False
            problems.append(_problem(f"entries[{index}]", "is not encodable as UTF-8 JSON"))
    else:
        if len(buffer) > rules.max_entry_bytes:
            ok = False
            problems.append(
                _problem(
                    f"entries[{index}]",
                    f"encodes to {len(buffer)} bytes of JSON; "
                    f"at most {rules.max_entry_bytes} allowed",
                )
            )
    if not ok:
        if len(problems) == before:  # never reached unless an explainer misses a case
            problems.append(_problem(f"entries[{index}]", "invalid entry"))
        return None
    if problems:
        return None
    return LogEntry(
        ns, normal, message, service, env, labels, trace_id, span_id, metadata, timestamp
    )


_known_names: set[str] = set()
"""Strings known to match ``_NAME_RE``: services and envs repeat, a set lookup is cheaper."""
_KNOWN_NAMES_SIZE: Final = 1024


def _learn_name(value: str) -> bool:
    """Whether ``value`` matches ``_NAME_RE`` (remembered in ``_known_names`` if it does)."""
    if _NAME_RE.fullmatch(value) is None:
        return False
    if len(_known_names) >= _KNOWN_NAMES_SIZE:
        _known_names.clear()
    _known_names.add(value)
    return True


def _labels(value: Any, rules: _Rules) -> dict[str, str] | None:
    """Valid ``labels`` without the reserved keys, or ``None`` if any rule is broken."""
    if type(value) is not dict:
        return {} if type(value) is list and not value else None
    if not value:
        return value
    if not value.keys() <= rules.accepted_labels:
        return None
    for item in value.values():
        if type(item) is not str or len(item) > _MAX_LABEL_VALUE_CHARS:
            return None
    if not value.keys().isdisjoint(_RESERVED_LABELS):
        value = {key: item for key, item in value.items() if key not in _RESERVED_LABELS}
    return value if len(value) <= rules.max_labels else None


_INT_MIN: Final = -(2**63)
_INT_MAX: Final = 2**64 - 1


def _metadata_ok(root: dict[Any, Any], max_depth: int) -> bool:
    """Whether ``root`` holds only JSON values, nests at most ``max_depth`` levels deep
    (``root`` itself is level 1) and has only MessagePack-sized integers. Iterative."""
    pending: list[tuple[Any, int]] = []
    container: Any = root
    depth = 1
    while True:
        if type(container) is dict:
            for key in container:
                if type(key) is not str:
                    return False
            values = container.values()
        else:
            values = container
        for value in values:
            kind = type(value)
            if kind is str or kind is float or kind is bool or value is None:
                continue
            if kind is int:
                if _INT_MIN <= value <= _INT_MAX:
                    continue
                return False
            if kind is dict or kind is list:
                if depth >= max_depth:
                    return False
                pending.append((value, depth + 1))
                continue
            return False
        if not pending:
            return True
        container, depth = pending.pop()


# --- explaining problems (only runs for invalid input) ------------------------------------------

_LEVEL_RULE: Final = (
    "must be one of TRACE, DEBUG, INFO, WARN (or WARNING), ERROR, FATAL (or CRITICAL), "
    "in any letter case"
)
_SERVICE_RULE: Final = f"must be 1-{_MAX_SERVICE_CHARS} characters from a-z, 0-9 and '-'"
_ENV_RULE: Final = f"must be 1-{_MAX_ENV_CHARS} characters from a-z, 0-9 and '-'"
_TRACE_ID_RULE: Final = f"must be a string of at most {_MAX_TRACE_ID_CHARS} characters"
_SPAN_ID_RULE: Final = f"must be a string of at most {_MAX_SPAN_ID_CHARS} characters"


def _problem(field: str, message: str) -> Problem:
    return {"field": field, "message": message}


def _kind(value: Any) -> str:
    """The JSON type name of ``value`` (never the value itself)."""
    kind = type(value)
    if value is None:
        return "null"
    if kind is bool:
        return "boolean"
    if kind is int or kind is float:
        return "number"
    if kind is str:
        return "string"
    if kind is list:
        return "array"
    if kind is dict:
        return "object"
    return "a non-JSON value"


def _member(base: str, key: Any) -> str:
    """The path of ``key`` inside ``base``: ``base.key``, or ``base["odd key"]`` quoted."""
    if type(key) is not str:
        return f"{base}[<{_kind(key)} key>]"
    if len(key) <= _KEY_SHOWN_CHARS and _PLAIN_KEY_RE.fullmatch(key):
        return f"{base}.{key}"
    return f"{base}[{json.dumps(shown_key(key))}]"


def shown_key(key: str) -> str:
    """A client's key as an error shows it: at most 64 characters, so an answer stays small
    whatever was sent (a 500 KB key name is not echoed back)."""
    return key if len(key) <= _KEY_SHOWN_CHARS else key[:_KEY_SHOWN_CHARS] + "..."


def _field_problem(
    index: int,
    name: str,
    value: Any,
    rule: str,
    problems: list[Problem],
) -> None:
    """Report a string field: missing (``null`` counts), not a string, or breaking ``rule``."""
    if value is None:
        message = "required"
    elif type(value) is not str:
        message = f"must be a string (got {_kind(value)})"
    else:
        message = rule
    problems.append(_problem(f"entries[{index}].{name}", message))


def _explain_unknown(index: int, raw: dict[Any, Any], problems: list[Problem]) -> None:
    base = f"entries[{index}]"
    for key in raw:
        if key not in _FIELDS:
            problems.append(_problem(_member(base, key), "unknown field"))
            if len(problems) > MAX_PROBLEMS:
                return


def _explain_message(index: int, value: Any, rules: _Rules, problems: list[Problem]) -> None:
    if type(value) is str:
        message = (
            "must not be empty"
            if not value
            else f"must be at most {rules.max_message_chars} characters"
        )
        problems.append(_problem(f"entries[{index}].message", message))
    else:
        _field_problem(index, "message", value, "must be a string", problems)


def _explain_labels(index: int, value: Any, rules: _Rules, problems: list[Problem]) -> None:
    base = f"entries[{index}].labels"
    if type(value) is not dict:
        if type(value) is list:
            message = "must be an object; only an empty array is accepted in its place"
        else:
            message = f"must be an object of string values (got {_kind(value)})"
        problems.append(_problem(base, message))
        return
    allowed = 0
    for key, item in value.items():
        if len(problems) > MAX_PROBLEMS:
            return
        if type(key) is not str:
            problems.append(_problem(_member(base, key), "label names must be strings"))
            continue
        if key not in rules.accepted_labels:
            problems.append(
                _problem(
                    _member(base, key), f"not an allowed label (allowed: {rules.allowed_text})"
                )
            )
            continue
        if key not in _RESERVED_LABELS:
            allowed += 1
        if type(item) is not str:
            problems.append(_problem(_member(base, key), f"must be a string (got {_kind(item)})"))
        elif len(item) > _MAX_LABEL_VALUE_CHARS:
            problems.append(
                _problem(_member(base, key), f"must be at most {_MAX_LABEL_VALUE_CHARS} characters")
            )
    if allowed > rules.max_labels:
        problems.append(
            _problem(base, f"at most {rules.max_labels} labels allowed (got {allowed})")
        )


def _explain_metadata(index: int, value: Any, rules: _Rules, problems: list[Problem]) -> None:
    base = f"entries[{index}].metadata"
    if type(value) is not dict:
        if type(value) is list:
            message = "must be an object; only an empty array is accepted in its place"
        else:
            message = f"must be a JSON object (got {_kind(value)})"
        problems.append(_problem(base, message))
        return
    max_depth = rules.max_metadata_depth
    too_deep = False
    pending: list[tuple[Any, str, int]] = [(value, base, 1)]
    while pending:
        container, path, depth = pending.pop()
        if type(container) is dict:
            items: Any = container.items()
        else:
            items = enumerate(container)
        for key, item in items:
            if len(problems) > MAX_PROBLEMS:
                return
            if type(container) is dict:
                if type(key) is not str:
                    problems.append(_problem(_member(path, key), "keys must be strings"))
                    continue
                where = _member(path, key)
            else:
                where = f"{path}[{key}]"
            kind = type(item)
            if kind is str or kind is float or kind is bool or item is None:
                continue
            if kind is int:
                if not _INT_MIN <= item <= _INT_MAX:
                    problems.append(
                        _problem(where, "integer out of range (-2**63 .. 2**64-1 allowed)")
                    )
            elif kind is dict or kind is list:
                if depth >= max_depth:
                    if not too_deep:
                        too_deep = True
                        problems.append(
                            _problem(
                                where,
                                f"metadata may nest at most {max_depth} levels "
                                "(the metadata object is level 1)",
                            )
                        )
                else:
                    pending.append((item, where, depth + 1))
            else:
                problems.append(_problem(where, "not a JSON value"))


# --- the error ----------------------------------------------------------------------------------


def _raise(problems: list[Problem]) -> NoReturn:
    """Raise the one ``ValidationError`` answering the request.

    More than ``MAX_PROBLEMS`` problems are cut to that many and marked ``truncated``.
    """
    truncated = len(problems) > MAX_PROBLEMS
    if truncated:
        problems = problems[:MAX_PROBLEMS]
    count = len(problems)
    shown = "; ".join(f"{p['field']}: {p['message']}" for p in problems[:_SUMMARY_PROBLEMS])
    if count == 1:
        summary = shown
    else:
        summary = f"{'more than ' if truncated else ''}{count} problems: {shown}"
        if count > _SUMMARY_PROBLEMS:
            summary += f"; and {count - _SUMMARY_PROBLEMS} more"
    if len(summary) > _SUMMARY_MAX_CHARS:
        summary = summary[: _SUMMARY_MAX_CHARS - 3] + "..."
    details: dict[str, Any] = {"errors": problems}
    if truncated:
        details["truncated"] = True
    raise ValidationError(summary, details=details, reason="schema")
