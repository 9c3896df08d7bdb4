"""The HTTP API's shapes as msgspec types: what ``/openapi.json`` publishes and admin answers.

Two kinds of types live here:

* **Request types built from the running ``SchemaSettings``** (``api_types(schema)``): the
  ingest body and its entries with the configured limits (entries per request, message
  length, label allowlist, ...). They are the machine-readable twin of the imperative
  validator ``logstack._schema.validate_entries`` (which stays the one the pipeline runs,
  for its error messages and speed); ``tests/core/test_openapi_conformance.py`` decodes
  generated bodies with both and requires the same accept/reject answer, so the published
  schema cannot drift from what the server enforces.
* **Answer types** (``IngestAccepted``, ``ErrorBody``, ``Readiness``, ``AdminStatus``, ...):
  the handlers encode these very structs, so the documented answer is the sent one.

Patterns are written for JSON Schema's ECMA-262 semantics, where ``$`` only matches at the
end. msgspec evaluates them with Python's ``re``, whose ``$`` also matches before a final
newline; the entry's ``__post_init__`` rejects that case, so both readings agree.

Rules JSON Schema cannot state (or only at absurd length) are checked in ``__post_init__``
and said in the field's description: 29 February only in leap years and the exact ends of
the 64-bit nanosecond range (1970-01-01T00:00:00Z .. 2262-04-11T23:47:16.854775807Z, offsets
applied); at most ``max_labels`` non-reserved labels when the allowlist is longer than that;
metadata integers up to 2**64-1 (published as ``maximum``; msgspec bounds stop at int64).
The metadata depth *is* in the schema (one nested type per level). The
size of one encoded entry (``max_entry_bytes``) is checked by the server on the entry *as
received* and only described.

Intentional differences from a naive reading of SPEC §3.1, shared by both checkers:
``level`` is case-insensitive and ``WARNING``/``CRITICAL`` are accepted (stored as
``WARN``/``FATAL``); an empty JSON array stands for an empty ``labels``/``metadata`` object
(PHP clients); ``null`` for an optional field means absent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal, get_args

import msgspec
from msgspec import UNSET, Meta, UnsetType

from ._config import KEY_NAME_PATTERN, SchemaSettings
from ._schema import parse_timestamp

__all__ = [
    "ERROR_CODES",
    "AdminStatus",
    "ApiTypes",
    "ConfigStatus",
    "DlqDropRequest",
    "DlqDropResult",
    "DlqKeySummary",
    "DlqListing",
    "DlqReason",
    "DlqRecord",
    "DlqReplayReport",
    "DlqReplayRequest",
    "DlqSampleEntry",
    "EndpointStatus",
    "ErrorBody",
    "FlushRequest",
    "FlushResult",
    "ForwarderStatus",
    "Health",
    "IngestAccepted",
    "KeyFlush",
    "KeyStatus",
    "Problem",
    "Readiness",
    "ReadinessCheck",
    "ReadinessChecks",
    "ServiceInfo",
    "ValidationDetails",
    "api_types",
]

# --- the entry ----------------------------------------------------------------------------------

LEVEL_NAMES: Final = ("TRACE", "DEBUG", "INFO", "WARN", "ERROR", "FATAL")
LEVEL_ALIASES: Final = {"WARNING": "WARN", "CRITICAL": "FATAL"}
RESERVED_LABELS: Final = ("service", "env", "level")
MAX_SERVICE_CHARS: Final = 64
MAX_ENV_CHARS: Final = 32
MAX_LABEL_VALUE_CHARS: Final = 64
MAX_TRACE_ID_CHARS: Final = 128
MAX_SPAN_ID_CHARS: Final = 64
INT_MIN: Final = -(2**63)
INT_MAX: Final = 2**64 - 1


def _any_case(word: str) -> str:
    return "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in word)


LEVEL_PATTERN: Final = (
    "^(?:" + "|".join(_any_case(name) for name in (*LEVEL_NAMES, *LEVEL_ALIASES)) + ")$"
)
"""Every level name and alias in any ASCII letter case (ECMA regexes have no ``(?i)``)."""

CONTENT_ENCODING_PATTERN: Final = (
    r"^[ \t]*(?:" + _any_case("gzip") + "|" + _any_case("identity") + r")?[ \t]*$"
)
"""What ingest takes as ``Content-Encoding``: gzip or identity, any case, or empty."""

TIMESTAMP_PATTERN: Final = (
    r"^(?:1969|19[7-9][0-9]|2[01][0-9]{2}|22[0-5][0-9]|226[0-2])-"
    r"(?:(?:0[1-9]|1[0-2])-(?:0[1-9]|1[0-9]|2[0-9])|(?:0[13-9]|1[0-2])-30|(?:0[13578]|1[02])-31)"
    r"[Tt ](?:[01][0-9]|2[0-3]):[0-5][0-9]:(?:[0-5][0-9]|60)(?:\.[0-9]{1,9})?"
    r"(?:[Zz]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])$"
)
"""RFC 3339 within the years 1969-2262 (1969: the last hours of it, with a negative offset,
are the first of 1970 in UTC) and the days each month can have (29 February in any year:
whether the year is a leap year, and the exact ends of the range, are checked in
``__post_init__``)."""
NAME_PATTERN: Final = "^[a-z0-9-]+$"

EmptyArray = Annotated[
    list[Any],
    Meta(max_length=0, description="An empty array stands for an empty object (PHP clients)."),
]


MetadataInt = Annotated[
    int,
    # msgspec bounds must fit an int64, so the uint64 ceiling is published here and checked
    # in the entry's ``__post_init__``.
    Meta(ge=INT_MIN, extra_json_schema={"maximum": INT_MAX}),
]
MetadataScalar = str | MetadataInt | float | bool | None


def _int_over(root: Any, limit: int) -> bool:
    """Whether an integer above ``limit`` sits anywhere in ``root`` (iteratively)."""
    pending = [root]
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
        elif isinstance(value, int) and not isinstance(value, bool) and value > limit:
            return True
    return False


def metadata_value(levels: int, scalar: Any = MetadataScalar) -> Any:
    """A metadata value holding at most ``levels`` more levels of arrays/objects whose
    leaves are ``scalar`` (the validation fast path narrows its integers)."""
    value: Any = scalar
    for _ in range(levels):
        value = scalar | list[value] | dict[str, value]
    return value


def _label_value(description: str) -> Any:
    return Annotated[str, Meta(max_length=MAX_LABEL_VALUE_CHARS, description=description)]


@dataclass(frozen=True, slots=True)
class ApiTypes:
    """The request types for one ``SchemaSettings``."""

    schema: SchemaSettings
    entry: type[msgspec.Struct]
    labels: type[msgspec.Struct]
    request: type[msgspec.Struct]

    def decode_request(self, body: bytes) -> Any:
        """Decode and check an ingest body; raises ``msgspec.ValidationError``/``DecodeError``."""
        return msgspec.json.decode(body, type=self.request)


def _build(schema: SchemaSettings) -> ApiTypes:
    allowed = list(dict.fromkeys(schema.label_allowlist))
    label_names = allowed + [r for r in RESERVED_LABELS if r not in allowed]
    counted = [name for name in allowed if name not in RESERVED_LABELS]
    fields: list[tuple[str, Any, Any]] = []
    rename: dict[str, str] = {}
    for index, name in enumerate(label_names):
        attr = f"label_{index}"
        rename[attr] = name
        what = (
            "Accepted for existing clients and dropped: the entry's own field wins."
            if name in RESERVED_LABELS
            else "An allowed stream label."
        )
        fields.append((attr, _label_value(what) | UnsetType, UNSET))
    count_rule = (
        f" At most {schema.max_labels} of the allowed labels per entry."
        if len(counted) > schema.max_labels
        else ""
    )
    labels_type = msgspec.defstruct(
        "EntryLabels",
        fields,
        rename=rename,
        forbid_unknown_fields=True,
        omit_defaults=True,
        module=__name__,
        namespace={
            "__doc__": (
                "Extra Loki stream labels: names from `schema.label_allowlist` "
                f"({', '.join(allowed) or 'none'}); `service`, `env`, `level` may appear "
                f"but never override the entry's fields.{count_rule}"
            )
        },
    )
    label_attrs = [f"label_{label_names.index(name)}" for name in counted]
    max_labels = schema.max_labels
    max_depth = schema.max_metadata_depth

    def entry_post_init(self: Any) -> None:
        for name in ("level", "service", "env"):
            if getattr(self, name).endswith("\n"):
                raise ValueError(f"{name}: must not end with a newline")
        parsed = parse_timestamp(self.timestamp)
        if isinstance(parsed, str):
            raise ValueError(f"timestamp: {parsed}")
        if isinstance(self.metadata, dict) and _int_over(self.metadata, INT_MAX):
            raise ValueError(f"metadata: integers must be at most {INT_MAX}")
        labels = self.labels
        if isinstance(labels, labels_type):
            used = sum(1 for attr in label_attrs if getattr(labels, attr) is not UNSET)
            if used > max_labels:
                raise ValueError(f"labels: at most {max_labels} labels allowed")

    entry_fields: list[tuple[str, Any, Any] | tuple[str, Any]] = [
        (
            "timestamp",
            Annotated[
                str,
                Meta(
                    pattern=TIMESTAMP_PATTERN,
                    description=(
                        "RFC 3339 with `Z` or a UTC offset; up to 9 fractional digits, kept to "
                        "the nanosecond. The day must exist in its month and the instant lie "
                        "between 1970-01-01T00:00:00Z and 2262-04-11T23:47:16.854775807Z."
                    ),
                    examples=["2025-09-24T12:00:00.123456789Z", "2025-09-24T14:00:00+02:00"],
                ),
            ],
        ),
        (
            "level",
            Annotated[
                str,
                Meta(
                    pattern=LEVEL_PATTERN,
                    description=(
                        "TRACE, DEBUG, INFO, WARN, ERROR or FATAL in any letter case; WARNING "
                        "is stored as WARN and CRITICAL as FATAL."
                    ),
                    examples=["ERROR", "info", "Warning"],
                ),
            ],
        ),
        (
            "message",
            Annotated[
                str,
                Meta(
                    min_length=1,
                    max_length=schema.max_message_chars,
                    description="The log message.",
                    examples=["Payment failed"],
                ),
            ],
        ),
        (
            "service",
            Annotated[
                str,
                Meta(
                    pattern=NAME_PATTERN,
                    min_length=1,
                    max_length=MAX_SERVICE_CHARS,
                    description="The emitting service; a Loki stream label.",
                    examples=["payments-api"],
                ),
            ],
        ),
        (
            "env",
            Annotated[
                str,
                Meta(
                    pattern=NAME_PATTERN,
                    min_length=1,
                    max_length=MAX_ENV_CHARS,
                    description="The environment; a Loki stream label.",
                    examples=["prod"],
                ),
            ],
        ),
        ("labels", labels_type | EmptyArray | None, None),
        (
            "trace_id",
            Annotated[str, Meta(max_length=MAX_TRACE_ID_CHARS, description="Trace id.")] | None,
            None,
        ),
        (
            "span_id",
            Annotated[str, Meta(max_length=MAX_SPAN_ID_CHARS, description="Span id.")] | None,
            None,
        ),
        (
            "metadata",
            Annotated[
                dict[str, metadata_value(max_depth - 1)],  # type: ignore[misc]
                Meta(
                    description=(
                        f"Any JSON object nesting at most {max_depth} levels (the object is "
                        "level 1; arrays count like objects); integers within -2**63 .. "
                        "2**64-1. Sensitive keys are masked before storage."
                    )
                ),
            ]
            | EmptyArray
            | None,
            None,
        ),
    ]
    entry_type = msgspec.defstruct(
        "LogEntryIn",
        entry_fields,
        forbid_unknown_fields=True,
        module=__name__,
        namespace={
            "__post_init__": entry_post_init,
            "__doc__": (
                "One log entry. Unknown fields are rejected; `null` for an optional field "
                f"means absent. Encoded as JSON, one entry may take at most "
                f"{schema.max_entry_bytes} bytes."
            ),
        },
    )
    request_type = msgspec.defstruct(
        "IngestRequest",
        [
            (
                "entries",
                Annotated[
                    list[entry_type],  # type: ignore[valid-type]
                    Meta(
                        min_length=1,
                        max_length=schema.max_entries,
                        description="The batch: all entries are accepted, or none.",
                    ),
                ],
            )
        ],
        forbid_unknown_fields=True,
        module=__name__,
        namespace={"__doc__": "The body of `POST /v1/logs:ingest`."},
    )
    return ApiTypes(schema, entry_type, labels_type, request_type)


_cache: ApiTypes | None = None


def api_types(schema: SchemaSettings) -> ApiTypes:
    """The request types of ``schema`` (rebuilt only when the settings object changes)."""
    global _cache
    cached = _cache
    if cached is None or cached.schema is not schema:
        cached = _cache = _build(schema)
    return cached


# --- answers ------------------------------------------------------------------------------------

ErrorCode = Literal[
    "authentication_error",
    "forbidden",
    "validation_error",
    "payload_too_large",
    "unsupported_media_type",
    "idempotency_key_reused",
    "rate_limit_exceeded",
    "quota_exceeded",
    "unavailable",
    "internal_error",
    "not_found",
    "method_not_allowed",
    "conflict",
    "replay_incomplete",
    "http_error",
]
ERROR_CODES: Final = get_args(ErrorCode)


class ErrorBody(msgspec.Struct):
    """Every error answer has this shape."""

    error: Annotated[ErrorCode, Meta(description="Machine-readable error code.")]
    message: Annotated[str, Meta(description="Human-readable explanation; never echoes input.")]
    details: Annotated[
        dict[str, Any],
        Meta(description="Structured detail; for `validation_error` see `ValidationDetails`."),
    ]


class Problem(msgspec.Struct):
    """One validation problem."""

    field: Annotated[str, Meta(examples=["entries[3].level"])]
    message: str


class ValidationDetails(msgspec.Struct):
    """`details` of a `validation_error`: every problem found (at most 100)."""

    errors: list[Problem] = []
    truncated: bool = False


class IngestAccepted(msgspec.Struct):
    """The entries are fsynced to the WAL and will reach Loki (or the dead-letter queue)."""

    message: Literal["Logs accepted for processing"]
    entries_accepted: Annotated[int, Meta(ge=1)]
    request_id: Annotated[str, Meta(description="UUID of the request; also in `X-Request-Id`.")]
    timestamp: Annotated[str, Meta(description="When the request was accepted (RFC 3339).")]


class Health(msgspec.Struct):
    status: Literal["ok"]


class ServiceInfo(msgspec.Struct):
    service: Literal["logstack"]
    version: str


class ReadinessCheck(msgspec.Struct):
    ok: bool
    detail: str


class ReadinessChecks(msgspec.Struct):
    loki: Annotated[
        ReadinessCheck, Meta(description="A push or a /ready probe succeeded within 60 s.")
    ]
    disk: Annotated[ReadinessCheck, Meta(description="The WAL disk has enough free space.")]
    wal: Annotated[ReadinessCheck, Meta(description="The WAL is writable.")]
    forwarder: Annotated[ReadinessCheck, Meta(description="The forwarder stage is running.")]


ReadinessStatus = Literal["ready", "not_ready", "stopping"]


class Readiness(msgspec.Struct):
    """`ready` (200) only if every check passes; `not_ready` or `stopping` (503) otherwise."""

    status: ReadinessStatus
    checks: ReadinessChecks


KeyName = Annotated[str, Meta(min_length=1, max_length=64, examples=["payments-api"])]


class FlushRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Body of `POST /v1/admin/flush` (optional: an empty body flushes every key)."""

    token: Annotated[
        KeyName | None, Meta(description="Only this API key (by name); default every key.")
    ] = None
    force: Annotated[
        bool,
        Meta(
            description=(
                "Seal the active segment even when nothing in it waits for delivery "
                "(without it, keys with nothing undelivered are left alone)."
            )
        ),
    ] = False


class KeyFlush(msgspec.Struct):
    """What a flush did for one key."""

    token: KeyName
    action: Annotated[
        Literal["sealed", "pushed", "nothing_to_flush", "no_wal"],
        Meta(
            description=(
                "`sealed`: the active segment was sealed (and fsynced) and delivery asked to "
                "push now; `pushed`: entries wait in already sealed segments, delivery was "
                "asked to push now; `nothing_to_flush`: everything is delivered (use `force` "
                "to seal anyway); `no_wal`: the key has written nothing yet."
            )
        ),
    ]
    sealed_segment: Annotated[
        int | None, Meta(description="Sequence number of the segment that was sealed.")
    ]
    undelivered_bytes: Annotated[
        int,
        Meta(ge=0, description="WAL bytes after the delivery checkpoint (0: all delivered)."),
    ]


class FlushResult(msgspec.Struct):
    force: bool
    sealed_segments: Annotated[int, Meta(ge=0)]
    keys: list[KeyFlush]


class KeyStatus(msgspec.Struct):
    """The WAL and delivery state of one key (by name)."""

    token: KeyName
    configured: Annotated[bool, Meta(description="Named by a configured API key.")]
    active: Annotated[bool, Meta(description="Configured and active (may ingest).")]
    wal_bytes: Annotated[int, Meta(ge=0)]
    wal_segments: Annotated[int, Meta(ge=0)]
    undelivered_bytes: Annotated[
        int,
        Meta(ge=0, description="WAL bytes after the delivery checkpoint (0: all delivered)."),
    ]
    oldest_undelivered_age_s: Annotated[
        float | None,
        Meta(
            description="Seconds since the oldest undelivered entry was received (as "
            "`forwarder_lag_seconds`); null if none."
        ),
    ]
    delivered_segment: Annotated[int, Meta(description="Delivery checkpoint: segment.")]
    delivered_offset: Annotated[int, Meta(description="Delivery checkpoint: byte offset.")]
    dlq_records: Annotated[int, Meta(ge=0, description="Dead-lettered pushes.")]
    dlq_entries: Annotated[int, Meta(ge=0, description="Entries in dead-lettered pushes.")]


class EndpointStatus(msgspec.Struct):
    url: str
    healthy: bool
    failures: Annotated[int, Meta(ge=0, description="Consecutive failed pushes.")]
    retry_in_s: Annotated[float, Meta(ge=0, description="Skipped for this long after failures.")]


class ForwarderStatus(msgspec.Struct):
    running: bool
    loki_last_ok_age_s: Annotated[
        float | None, Meta(description="Seconds since Loki last answered 2xx (push or probe).")
    ]
    loki_last_error: str | None
    endpoints: list[EndpointStatus]


class ConfigStatus(msgspec.Struct):
    version: Annotated[int, Meta(ge=1, description="1 at start, +1 per successful reload.")]
    loaded_at: Annotated[str, Meta(description="When the running config was loaded.")]
    path: str | None
    last_reload_error: Annotated[
        list[str] | None,
        Meta(description="Problems of the last rejected reload (the running config was kept)."),
    ] = None
    api_keys: Annotated[int, Meta(ge=0, description="Configured API keys.")] = 0


class AdminStatus(msgspec.Struct):
    """`GET /v1/admin/status`: per-key WAL, forwarder, Loki endpoints, DLQ, config."""

    service: Literal["logstack"]
    version: str
    uptime_s: float
    status: ReadinessStatus
    checks: ReadinessChecks
    config: ConfigStatus
    forwarder: ForwarderStatus
    pipeline: list[str]
    keys: list[KeyStatus]


# --- dead-letter queue (the answers of ``logstack._admin_dlq``) -------------------------------


class DlqReason(msgspec.Struct):
    reason: Annotated[str, Meta(description="First line of Loki's answer (≤ 300 characters).")]
    records: Annotated[int, Meta(ge=1)]


class DlqKeySummary(msgspec.Struct):
    """The dead letters of one key."""

    token: KeyName
    records: Annotated[int, Meta(ge=0, description="Refused pushes kept.")]
    entries: Annotated[int, Meta(ge=0)]
    unconfirmed: Annotated[
        int, Meta(ge=0, description="Entries Loki's answer did not account for.")
    ]
    oldest: str | None
    newest: str | None
    reasons: Annotated[list[DlqReason], Meta(description="The most frequent reasons.")]


class DlqSampleEntry(msgspec.Struct):
    stream: dict[str, str]
    timestamp_ns: Annotated[str, Meta(description="Nanoseconds since the epoch, as a string.")]
    line: Annotated[str, Meta(description="The Loki line (cut to 500 characters).")]
    structured_metadata: dict[str, str] | UnsetType = UNSET
    reason: Annotated[str, Meta(description="Why Loki refused this entry.")] | UnsetType = UNSET
    unconfirmed: bool | UnsetType = UNSET


class DlqRecord(msgspec.Struct):
    """One refused push (or its refused part), with a sample of its entries."""

    id: str
    token: KeyName
    dead_lettered_at: str
    status: Annotated[int | None, Meta(description="Loki's HTTP status.")]
    reason: str | None
    entries: Annotated[int, Meta(ge=0)]
    unconfirmed: Annotated[int, Meta(ge=0)]
    tenant: str | None
    replay_attempts: Annotated[int, Meta(ge=0)]
    last_replay_error: str | None
    sample: list[DlqSampleEntry]


class DlqListing(msgspec.Struct):
    """`GET /v1/admin/dlq`: per-key summaries, then one page of records."""

    keys: list[DlqKeySummary]
    records: list[DlqRecord]
    total_records: Annotated[int, Meta(ge=0)]
    offset: Annotated[int, Meta(ge=0)]
    limit: Annotated[int, Meta(ge=1, le=500)]
    next_offset: Annotated[int | None, Meta(description="Pass as `offset` for the next page.")]


class DlqReplayRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Body of `POST /v1/admin/dlq/replay`."""

    token: Annotated[str, Meta(pattern=KEY_NAME_PATTERN, description="The key (by name).")]


class DlqReplayReport(msgspec.Struct):
    """What a replay did; also the `details` of a `502 replay_incomplete`."""

    token: KeyName
    replayed_records: Annotated[int, Meta(ge=0)]
    replayed_entries: Annotated[int, Meta(ge=0)]
    refused_again_entries: Annotated[int, Meta(ge=0)]
    remaining_records: Annotated[int, Meta(ge=0)]
    remaining_entries: Annotated[int, Meta(ge=0)]
    loki_status: int | None
    error: str | None


MAX_DROP_IDS: Final = 500
"""The most record ids one ``POST /v1/admin/dlq/drop`` takes (a listing's page at most)."""


class DlqDropRequest(msgspec.Struct, forbid_unknown_fields=True):
    """Body of `POST /v1/admin/dlq/drop`."""

    token: Annotated[str, Meta(pattern=KEY_NAME_PATTERN, description="The key (by name).")]
    ids: Annotated[
        list[Annotated[str, Meta(min_length=1, max_length=64)]],
        Meta(
            min_length=1,
            max_length=MAX_DROP_IDS,
            description="Ids of the key's records to drop, as `GET /v1/admin/dlq` lists them.",
        ),
    ]


class DlqDropResult(msgspec.Struct):
    """What a drop did."""

    token: KeyName
    dropped_records: Annotated[int, Meta(ge=0)]
    dropped_entries: Annotated[int, Meta(ge=0)]
    not_found: Annotated[
        list[str], Meta(description="Ids asked for that the key's queue does not hold.")
    ]


ANSWER_TYPES: Final[tuple[type[msgspec.Struct], ...]] = (
    IngestAccepted,
    ErrorBody,
    ValidationDetails,
    Health,
    ServiceInfo,
    Readiness,
    FlushRequest,
    FlushResult,
    AdminStatus,
    DlqListing,
    DlqReplayRequest,
    DlqReplayReport,
    DlqDropRequest,
    DlqDropResult,
)
