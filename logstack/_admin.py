"""Admin endpoints (SPEC §3): admin-token authentication and the routes behind it.

The admin token is not an API key: without a token (or with an unknown one) the answer is
401, with a valid API key that is not the admin token it is 403. Every admin route calls
``require_admin`` before it reads its body.

* ``POST /v1/admin/flush`` seals the active WAL segment of each selected key and asks the
  batcher to push what is waiting now (``KeyLog.rotate("manual")`` +
  ``KeyLog.request_flush()``); it answers what it did per key.
* ``GET /v1/admin/status`` reports per-key WAL and delivery state, the forwarder and its
  Loki endpoints, dead-letter counts and the config version.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import time
from typing import TYPE_CHECKING, Any, Literal

import msgspec
import trio
from quart import Response, request

from . import __version__
from ._api_types import (
    AdminStatus,
    ConfigStatus,
    EndpointStatus,
    FlushRequest,
    FlushResult,
    ForwarderStatus,
    KeyFlush,
    KeyStatus,
    ReadinessCheck,
    ReadinessChecks,
)
from ._dlq import DeadLetterQueue, dead_letter_queue
from ._errors import (
    AuthenticationError,
    ForbiddenError,
    RejectError,
    UnavailableError,
    ValidationError,
    WalError,
)

if TYPE_CHECKING:
    from quart_trio import QuartTrio

    from ._service import Service

log = logging.getLogger("logstack.admin")


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def require_admin(service: Service) -> None:
    """Raise ``AuthenticationError`` (401) or ``ForbiddenError`` (403) unless the request
    carries the admin token. Comparisons are constant-time on SHA-256 digests."""
    settings = service.context.settings
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise AuthenticationError(
            "admin endpoints need 'Authorization: Bearer <admin token>'",
            reason="missing_credentials",
        )
    presented = _digest(token)
    admin = settings.security.admin_token
    if admin is not None and hmac.compare_digest(presented, _digest(admin)):
        return
    for api_token in settings.security.api_keys:
        if hmac.compare_digest(presented, _digest(api_token)):
            raise ForbiddenError("this API key may ingest but not use admin endpoints")
    raise AuthenticationError("unknown admin token", reason="unknown_key")


class NotFoundError(RejectError):
    status = 404
    code = "not_found"


# --- flush --------------------------------------------------------------------------------------

_flush_decoder = msgspec.json.Decoder(FlushRequest)


def parse_flush_request(body: bytes) -> FlushRequest:
    if not body.strip():
        return FlushRequest()
    try:
        return _flush_decoder.decode(body)
    except msgspec.ValidationError as exc:
        message = str(exc)
    except (msgspec.DecodeError, UnicodeDecodeError):
        message = "body is not valid JSON"
    raise ValidationError(
        f"invalid flush request: {message}",
        details={"errors": [{"field": "body", "message": message}]},
        reason="admin_flush",
    )


def _flush_failed(service: Service, name: str, exc: WalError, message: str) -> None:
    """Said in the log (the admin's 503 was the only trace) and in readiness, as a failed
    write of the pipeline is."""
    service.context.health.wal_failed(name, str(exc))
    log.error(message, extra={"token": name, "error": str(exc)})


async def flush(service: Service, flush_request: FlushRequest) -> FlushResult:
    """Seal active segments and ask delivery to push now; report what was done per key.

    A key's active segment is sealed when it holds records written since it was opened and
    either some entries wait for delivery or ``force`` is set; the sealed segment is fsynced
    before the answer. Delivery is asked to push at once wherever entries wait.
    """
    store = service.wal
    settings = service.context.settings
    if flush_request.token is not None:
        name = flush_request.token
        if name not in store.logs and settings.key_by_name(name) is None:
            raise NotFoundError(f"no API key and no WAL named {name!r}", details={"token": name})
        names = [name]
    else:
        names = sorted(store.logs)
    results: list[KeyFlush] = []
    for name in names:
        keylog = store.logs.get(name)
        if keylog is None or not keylog.segments:
            results.append(KeyFlush(name, "no_wal", None, 0))
            continue
        waiting = keylog.has_unread_entries(keylog.delivered) or (
            keylog.last_entry_end > keylog.synced_end  # appended, fsync under way
        )
        sealed: int | None = None
        if waiting or flush_request.force:
            candidate = keylog.active.seq
            try:
                rotated = keylog.rotate("manual")
            except WalError as exc:  # a full disk, say: the WAL's 503, not a 500
                _flush_failed(service, name, exc, "admin flush: could not start a new segment")
                raise UnavailableError(
                    f"could not start a new segment of {name!r}: {exc}", retry_after=5
                ) from None
            if rotated:
                sealed = candidate
                try:
                    await keylog.sync()  # the sealed segment is durable before we say so
                except WalError as exc:
                    _flush_failed(service, name, exc, "admin flush: could not fsync a segment")
                    raise UnavailableError(
                        f"sealed a segment of {name!r} but could not fsync it: {exc}",
                        retry_after=5,
                    ) from None
                keylog.delete_delivered()
        if waiting:
            keylog.request_flush()
        action: Literal["sealed", "pushed", "nothing_to_flush"]
        if sealed is not None:
            action = "sealed"
        elif waiting:
            action = "pushed"
        else:
            action = "nothing_to_flush"
        results.append(KeyFlush(name, action, sealed, keylog.undelivered_bytes()))
    result = FlushResult(
        force=flush_request.force,
        sealed_segments=sum(1 for r in results if r.action == "sealed"),
        keys=results,
    )
    log.info(
        "admin flush",
        extra={
            "force": flush_request.force,
            "sealed": [r.token for r in results if r.action == "sealed"],
            "pushed": [r.token for r in results if r.action in ("sealed", "pushed")],
        },
    )
    return result


# --- status -------------------------------------------------------------------------------------


def count_dead_letters(queue: DeadLetterQueue, key: str) -> tuple[int, int]:
    """``(records, entries)`` in a key's dead-letter queue (blocking: run it in a thread)."""
    headers = queue.headers_sync(key)
    return len(headers), sum(header.entries for header in headers)


def _endpoints(service: Service) -> list[EndpointStatus]:
    now = trio.current_time()
    for stage in service.stages:
        pool = getattr(stage, "pool", None)
        endpoints = getattr(pool, "endpoints", None)
        if endpoints is None:
            continue
        out = []
        for endpoint in endpoints:
            until = float(getattr(endpoint, "unhealthy_until", 0.0))
            out.append(
                EndpointStatus(
                    url=str(endpoint.url),
                    healthy=until <= now,
                    failures=int(getattr(endpoint, "failures", 0)),
                    retry_in_s=round(max(0.0, until - now), 3),
                )
            )
        return out
    return [
        EndpointStatus(url=url, healthy=True, failures=0, retry_in_s=0.0)
        for url in service.context.settings.loki.endpoints()
    ]


async def status(service: Service) -> AdminStatus:
    settings = service.context.settings
    health = service.context.health
    store = service.wal
    configured = {key.name: key for key in settings.security.api_keys.values()}
    logs = dict(store.logs)
    queue = dead_letter_queue(service.context.services, store.root)
    dlq = await trio.to_thread.run_sync(
        lambda: {name: count_dead_letters(queue, name) for name in logs}
    )
    now_ns = time.time_ns()
    keys: list[KeyStatus] = []
    for name in sorted(set(logs) | set(configured)):
        key = configured.get(name)
        keylog = logs.get(name)
        if keylog is None:
            keys.append(
                KeyStatus(
                    token=name,
                    configured=True,
                    active=bool(key and key.active),
                    wal_bytes=0,
                    wal_segments=0,
                    undelivered_bytes=0,
                    oldest_undelivered_age_s=None,
                    delivered_segment=0,
                    delivered_offset=0,
                    dlq_records=0,
                    dlq_entries=0,
                )
            )
            continue
        # When the oldest undelivered entry was received (one record read at the
        # checkpoint), as forwarder_lag_seconds says: the creation of its segment, up to
        # the forced rotation's 6 h earlier, read hours for a key that logs little.
        oldest = keylog.oldest_undelivered_received_ns()
        records, entries = dlq.get(name, (0, 0))
        keys.append(
            KeyStatus(
                token=name,
                configured=key is not None,
                active=bool(key and key.active),
                wal_bytes=keylog.disk_bytes,
                wal_segments=len(keylog.segments),
                undelivered_bytes=keylog.undelivered_bytes(),
                oldest_undelivered_age_s=(
                    None if oldest is None else round(max(0.0, (now_ns - oldest) / 1e9), 3)
                ),
                delivered_segment=keylog.delivered[0],
                delivered_offset=keylog.delivered[1],
                dlq_records=records,
                dlq_entries=entries,
            )
        )
    checks = service.readiness()
    ready = all(c["ok"] for c in checks.values())
    last_ok = health.loki_last_ok
    return AdminStatus(
        service="logstack",
        version=__version__,
        uptime_s=round(time.time() - service.started_at, 3),
        status="stopping" if service.stopping else ("ready" if ready else "not_ready"),
        checks=readiness_checks(checks),
        config=ConfigStatus(
            version=service.config_version,
            loaded_at=_rfc3339(service.config_loaded_at),
            path=None if service.config_path is None else os.fspath(service.config_path),
            last_reload_error=service.last_reload_error,
            api_keys=len(settings.security.api_keys),
        ),
        forwarder=ForwarderStatus(
            running=health.forwarder_running,
            loki_last_ok_age_s=(None if last_ok is None else round(time.monotonic() - last_ok, 3)),
            loki_last_error=health.loki_last_error,
            endpoints=_endpoints(service),
        ),
        pipeline=[stage.name for stage in service.stages],
        keys=keys,
    )


def readiness_checks(checks: dict[str, dict[str, Any]]) -> ReadinessChecks:
    return ReadinessChecks(
        **{name: ReadinessCheck(bool(c["ok"]), str(c["detail"])) for name, c in checks.items()}
    )


def _rfc3339(epoch_s: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch_s))


# --- routes -------------------------------------------------------------------------------------


def register_admin_routes(app: QuartTrio, service: Service) -> None:
    from ._http import error_response, struct_response

    @app.post("/v1/admin/flush")
    async def admin_flush() -> Response:
        try:
            require_admin(service)
            body = await request.get_data(cache=False)
            assert isinstance(body, bytes)
            result = await flush(service, parse_flush_request(body))
        except RejectError as error:
            return error_response(error)
        return struct_response(result, 200)

    @app.get("/v1/admin/status")
    async def admin_status() -> Response:
        try:
            require_admin(service)
        except RejectError as error:
            return error_response(error)
        return struct_response(await status(service), 200)
