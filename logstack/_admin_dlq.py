"""Admin endpoints of the dead-letter queue (SPEC §3): list, replay and drop.

* ``GET /v1/admin/dlq[?token=<key name>][&limit=50][&offset=0]`` — per key: records, entries,
  how many are unconfirmed, oldest/newest, the most frequent reasons; then one page of
  records (newest last, per key in file order) with their reason and a short sample of their
  entries. Output is bounded: ``limit`` ≤ 500 records, reasons cut to 2,000 characters, three
  sample entries per record with lines cut to 500 characters. ``next_offset`` pages on.
* ``POST /v1/admin/dlq/replay`` with ``{"token": "<key name>"}`` — re-sends that key's dead
  letters to Loki (after the operator fixed the cause), with the key's *current* tenant.
  What Loki takes leaves the queue; what it refuses again stays with the new reason; a 429,
  5xx or unreachable Loki stops the replay and keeps the rest. ``200`` with the report when
  nothing remains queued, else ``502 replay_incomplete`` with the same report in
  ``details``; ``409`` while a replay of that key runs; ``503`` if the forwarder is not
  running.
* ``POST /v1/admin/dlq/drop`` with ``{"token": "<key name>", "ids": ["<record id>", ...]}``
  — removes those records for good (Loki will never take them: too old, or refused for a
  reason the operator accepts). ``200`` with what was dropped and the ids not found (a
  repeated drop is harmless); ``409`` while a replay of that key runs. Logged as a warning
  with the ids and counts, the only trace the entries leave.

All need the admin token (``require_admin``). ``token`` always means a key's *name*.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
import trio
from quart import Response, request

from ._admin import NotFoundError, require_admin
from ._api_types import DlqDropRequest, DlqDropResult
from ._config import KEY_NAME_PATTERN
from ._dlq import (
    DeadLetter,
    DeadLetterHeader,
    DeadLetterQueue,
    ReplayBusyError,
    dead_letter_queue,
)
from ._errors import RejectError, UnavailableError, ValidationError

if TYPE_CHECKING:
    from quart_trio import QuartTrio

    from ._service import Service

log = logging.getLogger("logstack.admin")

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
REASON_CHARS = 2000
SAMPLE_ENTRIES = 3
SAMPLE_LINE_CHARS = 500
TOP_REASONS = 5
_KEY_NAME = re.compile(KEY_NAME_PATTERN)
_json = msgspec.json.Encoder()


class ReplayConflictError(RejectError):
    status = 409
    code = "conflict"


class ReplayIncompleteError(RejectError):
    status = 502
    code = "replay_incomplete"


class _ReplayRequest(msgspec.Struct, forbid_unknown_fields=True):
    token: str


_Body = TypeVar("_Body")
_replay_decoder = msgspec.json.Decoder(_ReplayRequest)
_drop_decoder = msgspec.json.Decoder(DlqDropRequest)


def _bad(field: str, message: str) -> ValidationError:
    return ValidationError(
        f"{field}: {message}",
        details={"errors": [{"field": field, "message": message}]},
        reason="bad_admin_request",
    )


async def _body(decoder: msgspec.json.Decoder[_Body], expected: str) -> _Body:
    """The admin request's JSON body as ``decoder`` reads it, or a 400 saying what was
    expected."""
    raw = await request.get_data(cache=False)
    assert isinstance(raw, bytes)
    try:
        return decoder.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise _bad("body", f"expected {expected}: {exc}") from None


def _key_name(value: str, field: str) -> str:
    if not _KEY_NAME.match(value):
        raise _bad(field, "must be an API key name (letters, digits, '.', '_', '-'; ≤ 64)")
    return value


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _bad(name, f"must be an integer from {low} to {high}") from None
    if not low <= value <= high:
        raise _bad(name, f"must be an integer from {low} to {high}")
    return value


def _short(text: str | None, limit: int) -> str | None:
    if text is None:
        return None
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _first_line(text: str) -> str:
    line = text.strip().split("\n", 1)[0]
    return _short(line, 300) or ""


def _summary(key: str, headers: list[DeadLetterHeader]) -> dict[str, Any]:
    reasons = Counter(_first_line(h.reason) for h in headers)
    return {
        "token": key,
        "records": len(headers),
        "entries": sum(h.entries for h in headers),
        "unconfirmed": sum(h.unconfirmed for h in headers),
        "oldest": headers[0].dead_lettered_at if headers else None,
        "newest": headers[-1].dead_lettered_at if headers else None,
        "reasons": [
            {"reason": reason, "records": n} for reason, n in reasons.most_common(TOP_REASONS)
        ],
    }


def _record_view(record: DeadLetter) -> dict[str, Any]:
    sample: list[dict[str, Any]] = []
    for stream in record.streams:
        for entry in stream.entries:
            if len(sample) >= SAMPLE_ENTRIES:
                break
            item: dict[str, Any] = {
                "stream": stream.stream,
                "timestamp_ns": entry.ts,
                "line": _short(entry.line, SAMPLE_LINE_CHARS),
            }
            if entry.metadata:
                item["structured_metadata"] = entry.metadata
            if entry.reason:
                item["reason"] = _short(entry.reason, REASON_CHARS)
            if entry.unconfirmed:
                item["unconfirmed"] = True
            sample.append(item)
    return {
        "id": record.id,
        "token": record.key,
        "dead_lettered_at": record.dead_lettered_at,
        "status": record.status,
        "reason": _short(record.reason, REASON_CHARS),
        "entries": record.entries,
        "unconfirmed": record.unconfirmed,
        "tenant": record.tenant,
        "replay_attempts": record.replay_attempts,
        "last_replay_error": _short(record.last_replay_error, REASON_CHARS),
        "sample": sample,
    }


def list_dead_letters(
    queue: DeadLetterQueue, keys: list[str], offset: int, limit: int
) -> dict[str, Any]:
    """The ``GET /v1/admin/dlq`` answer (blocking: run it in a worker thread)."""
    summaries: list[dict[str, Any]] = []
    page: list[tuple[str, str]] = []
    total = 0
    for key in keys:
        headers = queue.headers_sync(key)
        if not headers:
            continue
        summaries.append(_summary(key, headers))
        for header in headers:
            if offset <= total < offset + limit:
                page.append((key, header.id))
            total += 1
    records: list[dict[str, Any]] = []
    wanted: dict[str, set[str]] = {}
    for key, record_id in page:
        wanted.setdefault(key, set()).add(record_id)
    loaded = {key: queue.records_sync(key, ids) for key, ids in wanted.items()}
    for key, record_id in page:
        record = loaded[key].get(record_id)
        if record is not None:
            records.append(_record_view(record))
    return {
        "keys": summaries,
        "records": records,
        "total_records": total,
        "offset": offset,
        "limit": limit,
        "next_offset": offset + limit if offset + limit < total else None,
    }


def _json_response(body: dict[str, Any], status: int) -> Response:
    return Response(_json.encode(body), status=status, content_type="application/json")


def register_dlq_routes(app: QuartTrio, service: Service) -> None:
    """Add ``GET /v1/admin/dlq`` and ``POST /v1/admin/dlq/{replay,drop}`` to ``app``."""
    from ._http import error_response

    def queue() -> DeadLetterQueue:
        return dead_letter_queue(service.context.services, service.wal.root)

    def known(name: str) -> str:
        """``name`` if a key, a WAL or a dead-letter queue has it; else 404, as ``flush``
        answers (an empty answer would hide a typo)."""
        if (
            service.context.settings.key_by_name(name) is None
            and name not in service.wal.logs
            and name not in queue().keys()  # noqa: SIM118 - a method listing names, not a dict
        ):
            raise NotFoundError(
                f"no API key, WAL or dead letters named {name!r}", details={"token": name}
            )
        return name

    @app.get("/v1/admin/dlq")
    async def admin_dlq() -> Response:
        try:
            require_admin(service)
            token = request.args.get("token")
            if token is not None:
                token = known(_key_name(token, "token"))
            limit = _int_arg("limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
            offset = _int_arg("offset", 0, 0, 1 << 40)
        except RejectError as error:
            return error_response(error)
        dlq = queue()
        keys = [token] if token is not None else dlq.keys()
        body = await trio.to_thread.run_sync(list_dead_letters, dlq, keys, offset, limit)
        return _json_response(body, 200)

    @app.post("/v1/admin/dlq/drop")
    async def admin_dlq_drop() -> Response:
        try:
            require_admin(service)
            asked = await _body(_drop_decoder, '{"token": "<key name>", "ids": ["<id>", ...]}')
            token = known(asked.token)
            forwarder = service.context.services.get("forwarder")
            if forwarder is not None and forwarder.replaying(token):
                raise ReplayConflictError(
                    f"a replay of {token}'s dead letters is running; drop after it ends",
                    details={"token": token},
                )
        except RejectError as error:
            return error_response(error)
        dropped = await queue().drop(token, asked.ids)
        found = {header.id for header in dropped}
        result = DlqDropResult(
            token,
            len(dropped),
            sum(header.entries for header in dropped),
            [i for i in dict.fromkeys(asked.ids) if i not in found],
        )
        if dropped:
            log.warning(
                "dead letters dropped by an admin; their entries will not reach Loki",
                extra={
                    "token": token,
                    "records": result.dropped_records,
                    "entries": result.dropped_entries,
                    "ids": [header.id for header in dropped],
                },
            )
        return _json_response(msgspec.to_builtins(result), 200)

    @app.post("/v1/admin/dlq/replay")
    async def admin_dlq_replay() -> Response:
        try:
            require_admin(service)
            asked = await _body(_replay_decoder, '{"token": "<key name>"}')
            token = known(_key_name(asked.token, "token"))
            forwarder = service.context.services.get("forwarder")
            if forwarder is None:
                raise UnavailableError(
                    "the forwarder is not running; dead letters cannot be replayed now",
                    retry_after=5,
                    reason="forwarder_stopped",
                )
            try:
                report = await forwarder.replay(token)
            except ReplayBusyError:
                raise ReplayConflictError(
                    f"a replay of {token}'s dead letters is already running",
                    details={"token": token},
                ) from None
        except RejectError as error:
            return error_response(error)
        body = {
            "token": report.token,
            "replayed_records": report.replayed_records,
            "replayed_entries": report.replayed_entries,
            "refused_again_entries": report.refused_again_entries,
            "remaining_records": report.remaining_records,
            "remaining_entries": report.remaining_entries,
            "loki_status": report.loki_status,
            "error": report.error,
        }
        if report.remaining_records == 0:
            return _json_response(body, 200)
        message = report.error or (
            f"Loki refused {report.refused_again_entries} entries again; they stay queued"
        )
        return error_response(ReplayIncompleteError(message, details=body))
