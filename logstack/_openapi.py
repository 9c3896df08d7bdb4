"""``/openapi.json``: the OpenAPI 3.1 document, generated from the types the code uses.

Schemas come from ``msgspec.json.schema_components`` over the request types built from the
running ``SchemaSettings`` and the answer structs the handlers encode (``_api_types``);
nothing about a body's shape is written here by hand. This module only says which route
takes and answers which type (``OPERATIONS``, the DLQ routes of ``_admin_dlq`` included);
``tests/core/test_openapi.py`` checks that every route the app serves is described and
every described route is served.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import msgspec

from . import __version__
from ._api_types import (
    ANSWER_TYPES,
    CONTENT_ENCODING_PATTERN,
    AdminStatus,
    DlqDropRequest,
    DlqDropResult,
    DlqListing,
    DlqReplayReport,
    DlqReplayRequest,
    ErrorBody,
    FlushRequest,
    FlushResult,
    Health,
    IngestAccepted,
    Readiness,
    ServiceInfo,
    ValidationDetails,
    api_types,
)
from ._config import KEY_NAME_PATTERN, Settings

__all__ = ["INGEST_BODY", "Answer", "Operation", "openapi_document"]

REF_TEMPLATE: Final = "#/components/schemas/{name}"
INGEST_BODY: Final = "ingest"
"""Placeholder for the ingest request type, which is built from the running settings."""

Auth = Literal["none", "api_key", "admin"]


@dataclass(frozen=True, slots=True)
class Answer:
    """One documented answer of an operation."""

    status: int
    description: str
    body: Any = ErrorBody
    """A msgspec type, or ``None`` for no JSON body."""
    media_type: str = "application/json"
    headers: tuple[str, ...] = ()
    """Names from ``HEADERS``."""


@dataclass(frozen=True, slots=True)
class Operation:
    """One route: what it takes, what it answers. ``request`` is a msgspec type,
    ``INGEST_BODY``, or ``None``."""

    method: str
    path: str
    operation_id: str
    summary: str
    description: str
    tag: str
    auth: Auth
    answers: tuple[Answer, ...]
    request: Any = None
    request_required: bool = True
    parameters: tuple[dict[str, Any], ...] = field(default=())


HEADERS: Final[dict[str, dict[str, Any]]] = {
    "Retry-After": {
        "description": "Whole seconds (at least 1) after which the request may pass.",
        "schema": {"type": "integer", "minimum": 1},
    },
    "WWW-Authenticate": {
        "description": 'Always `Bearer realm="logstack"`.',
        "schema": {"type": "string"},
    },
    "X-Request-Id": {
        "description": "The id of this request; every service log line about it carries it.",
        "schema": {"type": "string"},
    },
}

_E401 = Answer(
    401,
    "Missing, malformed, unknown or inactive bearer token.",
    headers=("WWW-Authenticate",),
)
_E403 = Answer(403, "A valid API key that is not the admin token.")
_E400 = Answer(400, "Malformed JSON or a schema violation; `details` lists every problem.")
_E500 = Answer(500, "A bug: no stack trace, no input echoed.")
_E503 = Answer(
    503,
    "WAL disk below its free-space floor, WAL not writable or too slow (timeout), pipeline "
    "full, too many request bodies in flight (`server.max_body_bytes_in_flight`), or "
    "shutting down.",
    headers=("Retry-After",),
)

INGEST_DESCRIPTION: Final = """\
Authenticates the caller, applies its rate limit, masks sensitive data, enforces the entry
schema and appends the batch to the key's write-ahead log. `202` is sent only after the
fsync; delivery to Loki follows asynchronously, retried until Loki has the entries.

A batch is all-or-nothing. Bodies may be gzip-compressed (`Content-Encoding: gzip`); the
limits apply to the decoded body. Repeated slashes in the path route like one
(`//v1/logs:ingest`)."""

OPERATIONS: Final[tuple[Operation, ...]] = (
    Operation(
        "post",
        "/v1/logs:ingest",
        "ingestLogs",
        "Ingest a batch of log entries",
        INGEST_DESCRIPTION,
        "ingest",
        "api_key",
        request=INGEST_BODY,
        parameters=(
            {
                "name": "X-Idempotency-Key",
                "in": "header",
                "required": False,
                "description": (
                    "A retry with the same key and token within 15 minutes gets the first "
                    "answer and is stored once, also across restarts."
                ),
                "schema": {"type": "string", "minLength": 1, "maxLength": 128},
            },
            {
                "name": "Content-Encoding",
                "in": "header",
                "required": False,
                "description": "`gzip` or `identity` (any letter case; empty means identity).",
                "schema": {"type": "string", "pattern": CONTENT_ENCODING_PATTERN},
            },
        ),
        answers=(
            Answer(202, "Accepted: the entries are fsynced to the WAL.", IngestAccepted),
            _E400,
            _E401,
            Answer(408, "The body did not arrive within 60 s (`http_error`)."),
            Answer(413, "The (decoded) body exceeds `server.max_body_bytes`."),
            Answer(415, "Not `application/json`, or an encoding other than gzip."),
            Answer(
                422,
                "`idempotency_key_reused`: the `X-Idempotency-Key` was used in the last 15 "
                "minutes for a request with other entries; `details` names that request.",
            ),
            Answer(
                429,
                "`rate_limit_exceeded` (the key's token bucket) or `quota_exceeded` (the "
                "key's WAL backlog is at 80% of its size or age quota).",
                headers=("Retry-After",),
            ),
            _E500,
            _E503,
        ),
    ),
    Operation(
        "get",
        "/healthz",
        "getHealth",
        "Liveness",
        "`200` while the process serves.",
        "operations",
        "none",
        answers=(Answer(200, "Alive.", Health),),
    ),
    Operation(
        "get",
        "/readyz",
        "getReadiness",
        "Readiness, with each check's detail",
        "Loki reached within `loki.ready_window_s` (from pushes or a cached `/ready` probe, "
        "never probed per call), WAL disk free space, WAL writable, forwarder running.",
        "operations",
        "none",
        answers=(
            Answer(200, "Every check passes.", Readiness),
            Answer(503, "A check fails, or the service is stopping.", Readiness),
        ),
    ),
    Operation(
        "get",
        "/metrics",
        "getMetrics",
        "Prometheus metrics",
        "Prometheus text exposition; `token` labels carry the key's name, never the token.",
        "operations",
        "none",
        answers=(
            Answer(
                200,
                "Prometheus text format 0.0.4.",
                {"type": "string"},
                media_type="text/plain",
            ),
        ),
    ),
    Operation(
        "get",
        "/openapi.json",
        "getOpenApi",
        "This document",
        "Generated from the running configuration's validating types.",
        "operations",
        "none",
        answers=(Answer(200, "OpenAPI 3.1 document.", {"type": "object"}),),
    ),
    Operation(
        "get",
        "/",
        "getServiceInfo",
        "Service name and version",
        "",
        "operations",
        "none",
        answers=(Answer(200, "Name and version.", ServiceInfo),),
    ),
    Operation(
        "post",
        "/v1/admin/flush",
        "adminFlush",
        "Seal active WAL segments and forward now",
        "Seals the active segment of every key (or of `token`) that holds undelivered "
        "entries, or of every selected key with `force`, and asks delivery to push what is "
        "waiting at once. Answers what it did per key; delivery itself stays asynchronous.",
        "admin",
        "admin",
        request=FlushRequest,
        request_required=False,
        answers=(
            Answer(200, "What was flushed.", FlushResult),
            Answer(400, "The body is not a valid flush request."),
            _E401,
            _E403,
            Answer(404, "No API key and no WAL has that name."),
            _E500,
        ),
    ),
    Operation(
        "get",
        "/v1/admin/status",
        "adminStatus",
        "Per-key WAL, forwarder, Loki endpoints, DLQ counts, config version",
        "",
        "admin",
        "admin",
        answers=(Answer(200, "The state.", AdminStatus), _E401, _E403, _E500),
    ),
    Operation(
        "get",
        "/v1/admin/dlq",
        "adminDeadLetters",
        "Dead-lettered entries per key, with reasons",
        "Per key: records, entries, unconfirmed entries, oldest/newest and the most frequent "
        "reasons; then one page of records (per key in file order) with a short sample of "
        "their entries. `next_offset` pages on.",
        "admin",
        "admin",
        parameters=(
            {
                "name": "token",
                "in": "query",
                "required": False,
                "description": "Only this key (by name).",
                "schema": {"type": "string", "pattern": KEY_NAME_PATTERN},
            },
            {
                "name": "limit",
                "in": "query",
                "required": False,
                "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 50},
            },
            {
                "name": "offset",
                "in": "query",
                "required": False,
                "schema": {"type": "integer", "minimum": 0, "default": 0},
            },
        ),
        answers=(
            Answer(200, "Summaries and one page of records.", DlqListing),
            Answer(400, "A query parameter is invalid."),
            _E401,
            _E403,
            Answer(404, "No API key, WAL or dead-letter queue has that name."),
            _E500,
        ),
    ),
    Operation(
        "post",
        "/v1/admin/dlq/replay",
        "adminReplayDeadLetters",
        "Send a key's dead letters to Loki again",
        "Re-sends the key's dead letters with its current tenant (after the cause was "
        "fixed). What Loki takes leaves the queue; what it refuses again stays with the new "
        "reason; a 429, 5xx or unreachable Loki stops the replay and keeps the rest.",
        "admin",
        "admin",
        request=DlqReplayRequest,
        answers=(
            Answer(200, "Nothing of the key remains queued.", DlqReplayReport),
            Answer(400, 'The body is not `{"token": "<key name>"}`.'),
            _E401,
            _E403,
            Answer(404, "No API key, WAL or dead-letter queue has that name."),
            Answer(409, "A replay of that key is already running (`conflict`)."),
            _E500,
            Answer(
                502,
                "`replay_incomplete`: something remains queued; `details` is the report "
                "(`DlqReplayReport`).",
            ),
            Answer(503, "The forwarder is not running.", headers=("Retry-After",)),
        ),
    ),
    Operation(
        "post",
        "/v1/admin/dlq/drop",
        "adminDropDeadLetters",
        "Remove dead-letter records for good",
        "Removes the key's records with the given ids (Loki will never take them: too old, "
        "or refused for a reason accepted). Their entries will not reach Loki; the drop is "
        "logged with the ids and counts. Ids the queue does not hold are listed in "
        "`not_found`, so a repeated drop is harmless.",
        "admin",
        "admin",
        request=DlqDropRequest,
        answers=(
            Answer(200, "What was dropped.", DlqDropResult),
            Answer(400, 'The body is not `{"token": "<key name>", "ids": ["<id>", ...]}`.'),
            _E401,
            _E403,
            Answer(404, "No API key, WAL or dead-letter queue has that name."),
            Answer(409, "A replay of that key is running (`conflict`)."),
            _E500,
        ),
    ),
)


def _content(body: Any, media_type: str, refs: dict[Any, dict[str, Any]]) -> dict[str, Any]:
    schema = body if isinstance(body, dict) else refs[body]
    return {media_type: {"schema": schema}}


def _security(auth: Auth) -> list[dict[str, list[str]]]:
    if auth == "api_key":
        return [{"apiKey": []}]
    if auth == "admin":
        return [{"adminToken": []}]
    return []


def openapi_document(
    settings: Settings, operations: Iterable[Operation] = OPERATIONS
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of ``operations`` under ``settings``' schema limits."""
    operations = list(operations)
    types = api_types(settings.schema_)

    def resolve(kind: Any) -> Any:
        return types.request if kind == INGEST_BODY else kind

    wanted: list[Any] = [types.request, *ANSWER_TYPES, ValidationDetails]
    for op in operations:
        for kind in (op.request, *(a.body for a in op.answers)):
            kind = resolve(kind)
            if kind is not None and not isinstance(kind, dict) and kind not in wanted:
                wanted.append(kind)
    schemas, components = msgspec.json.schema_components(wanted, ref_template=REF_TEMPLATE)
    refs = dict(zip(wanted, schemas, strict=True))

    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        responses: dict[str, Any] = {}
        for answer in op.answers:
            doc: dict[str, Any] = {
                "description": answer.description,
                "headers": {
                    name: {"$ref": f"#/components/headers/{name}"}
                    for name in ("X-Request-Id", *answer.headers)
                },
            }
            if answer.body is not None:
                doc["content"] = _content(resolve(answer.body), answer.media_type, refs)
            responses[str(answer.status)] = doc
        entry: dict[str, Any] = {
            "operationId": op.operation_id,
            "summary": op.summary,
            "tags": [op.tag],
            "security": _security(op.auth),
            "responses": responses,
        }
        if op.description:
            entry["description"] = op.description
        if op.parameters:
            entry["parameters"] = list(op.parameters)
        if op.request is not None:
            entry["requestBody"] = {
                "required": op.request_required,
                "content": _content(resolve(op.request), "application/json", refs),
            }
        paths.setdefault(op.path, {})[op.method] = entry

    return {
        "openapi": "3.1.0",
        "info": {
            "title": "LogStack",
            "version": __version__,
            "description": (
                "A durable, masking log-ingestion gateway in front of Grafana Loki. Every "
                "error answer has the shape `ErrorBody`; `token` in metrics, logs and admin "
                "answers is always the API key's name, never the token."
            ),
        },
        "tags": [
            {"name": "ingest", "description": "Sending logs."},
            {"name": "operations", "description": "Health, readiness, metrics, this document."},
            {"name": "admin", "description": "Needs the admin token (API keys get 403)."},
        ],
        "paths": paths,
        "components": {
            "schemas": components,
            "headers": HEADERS,
            "securitySchemes": {
                "apiKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API key from `security.api_keys`.",
                },
                "adminToken": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "`security.admin_token` (not an API key).",
                },
            },
        },
    }


def described_routes(document: dict[str, Any]) -> Sequence[tuple[str, str]]:
    """``(METHOD, path)`` of every operation in ``document``."""
    return sorted(
        (method.upper(), path) for path, item in document["paths"].items() for method in item
    )
