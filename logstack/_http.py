"""The HTTP face (SPEC §3): Quart-Trio routes plus three ASGI wrappers.

``POST /v1/logs:ingest`` is served by ``IngestEndpoint`` (``_ingest``), installed as the
Quart app's ASGI middleware: the route that carries the load skips Quart's per-request
machinery. The others are Quart routes.

``instrument`` wraps the whole app: it gives each request its id (``X-Request-Id``, and the
``request_id`` of every log line written while serving it) and counts
``http_requests_total``/``http_request_duration_seconds`` with bounded labels.
``normalise_slashes`` routes ``//v1/logs:ingest`` like ``/v1/logs:ingest``.
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid
from typing import TYPE_CHECKING, Any, Final

import msgspec
import trio
from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from . import __version__
from ._admin import readiness_checks, register_admin_routes
from ._admin_dlq import register_dlq_routes
from ._api_types import (
    ERROR_CODES,
    Health,
    Readiness,
    ReadinessStatus,
    ServiceInfo,
)
from ._errors import InternalError, RejectError
from ._ingest import (
    INGEST_METHODS,
    INGEST_PATH,
    ASGIApp,
    IngestEndpoint,
    Message,
    Receive,
    Scope,
    Send,
    payload_too_large,
)
from ._logging import request_id_var
from ._openapi import openapi_document
from ._workers import gather_metrics

if TYPE_CHECKING:
    from ._service import Service

log = logging.getLogger("logstack.http")
_json = msgspec.json.Encoder()


KNOWN_ENDPOINTS = frozenset(
    {
        INGEST_PATH,
        "/healthz",
        "/readyz",
        "/metrics",
        "/",
        "/openapi.json",
        "/v1/admin/flush",
        "/v1/admin/status",
        "/v1/admin/dlq",
        "/v1/admin/dlq/replay",
        "/v1/admin/dlq/drop",
    }
)
"""The ``endpoint`` label values; any other path counts as ``other`` (bounded cardinality)."""
KNOWN_METHODS: Final = frozenset({"GET", "POST", "HEAD"})
_SLASHES = re.compile(r"/{2,}")
REQUEST_ID_HEADER: Final = b"x-request-id"
WORKER_HEADER: Final = b"x-logstack-worker"
"""With several workers: which one answered (its index), e.g. for the admin endpoints."""
FINAL_SEND_TIMEOUT_S: Final = 5.0
CLIENT_CLOSED_REQUEST: Final = 499
"""``http_requests_total{status_code}`` of a request whose client went away before its
answer (nginx's convention): counted, but not as a server error."""


def json_response(
    body: dict[str, Any], status: int, headers: dict[str, str] | None = None
) -> Response:
    return Response(
        _json.encode(body), status=status, headers=headers, content_type="application/json"
    )


def struct_response(
    body: msgspec.Struct, status: int, headers: dict[str, str] | None = None
) -> Response:
    """Encode one of the documented answer types (``_api_types``) as it is published."""
    return Response(
        _json.encode(body), status=status, headers=headers, content_type="application/json"
    )


def error_response(error: RejectError) -> Response:
    return json_response(error.body(), error.status, error.headers())


def normalise_slashes(app: ASGIApp) -> ASGIApp:
    """Route ``//v1/logs:ingest`` like ``/v1/logs:ingest``.

    Clients configured with a base URL ending in ``/`` send the double slash."""

    async def wrapper(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and "//" in scope["path"]:
            scope = dict(scope)
            scope["path"] = _SLASHES.sub("/", scope["path"])
            scope["raw_path"] = _SLASHES.sub("/", scope["raw_path"].decode("latin-1")).encode(
                "latin-1"
            )
        await app(scope, receive, send)

    return wrapper


def instrument(app: ASGIApp, service: Service) -> ASGIApp:
    """Request id and HTTP metrics for every request, whatever answers it.

    The id is set in ``request_id_var`` before the app runs (tasks the app starts inherit
    it) and sent back as ``X-Request-Id``; ingest uses it as the request's id. Metrics use
    a bounded ``endpoint`` label (unknown paths count as ``other``) and method label.
    """
    metrics = service.context.metrics
    role = service.role
    extra_headers = [(WORKER_HEADER, str(role.index).encode())] if not role.single else []

    async def wrapper(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = str(uuid.uuid4())
        reset = request_id_var.set(request_id)
        status = 500
        counted = False
        service.request_started()

        def count() -> None:
            nonlocal counted
            counted = True
            elapsed = time.perf_counter() - started
            path = scope["path"]
            endpoint = path if path in KNOWN_ENDPOINTS else "other"
            method = scope["method"] if scope["method"] in KNOWN_METHODS else "other"
            metrics.http_requests.labels(
                method=method, endpoint=endpoint, status_code=str(status)
            ).inc()
            metrics.http_duration.labels(method=method, endpoint=endpoint).observe(elapsed)
            log.debug(
                "request served",
                extra={
                    "method": method,
                    "endpoint": endpoint,
                    "status": status,
                    "duration_ms": round(elapsed * 1000, 3),
                },
            )

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = dict(message)
                message["headers"] = [
                    *message.get("headers", ()),
                    (REQUEST_ID_HEADER, request_id.encode()),
                    *extra_headers,
                ]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                # Counted before the last byte leaves: whoever saw the answer sees it counted.
                count()
                # Shielded: Hypercorn's end-of-response work (recycle the keep-alive
                # connection, or close it while stopping) runs inside this call and itself
                # tells the app "http.disconnect", on which Quart-Trio cancels the request
                # task, i.e. this very call. Cut short, a stopping server left connections
                # half-closed and clients waiting for the whole grace period (seen in
                # tests/e2e/test_ops_signals.py). The socket writes in it are shielded by
                # Hypercorn anyway; the deadline bounds the rest.
                with trio.CancelScope(shield=True) as shield:
                    shield.deadline = trio.current_time() + FINAL_SEND_TIMEOUT_S
                    await send(message)
                return
            await send(message)

        gone = False

        async def receive_wrapper() -> Message:
            nonlocal gone
            message = await receive()
            if message["type"] == "http.disconnect":
                gone = True
            return message

        try:
            await app(scope, receive_wrapper, send_wrapper)
        finally:
            service.request_finished()
            if not counted:
                # No complete answer: the client went away first (nginx's 499, "client
                # closed request": not a server error, no 5xx alert), or a crash (500).
                if gone and status == 500:
                    status = CLIENT_CLOSED_REQUEST
                count()
            request_id_var.reset(reset)

    return wrapper


def create_app(service: Service) -> QuartTrio:
    app = QuartTrio("logstack", static_folder=None)
    settings = service.context.settings
    app.config["MAX_CONTENT_LENGTH"] = settings.server.max_body_bytes
    app.config["BODY_TIMEOUT"] = 60
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = False
    metrics = service.context.metrics
    openapi_cache: dict[str, Any] = {}

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        code = exc.code or 500
        if code == 413:
            return error_response(payload_too_large(service.context.settings.server.max_body_bytes))
        names = {404: "not_found", 405: "method_not_allowed", 400: "validation_error"}
        error = names.get(code, "http_error")
        assert error in ERROR_CODES
        headers = None
        if isinstance(exc, MethodNotAllowed) and exc.valid_methods:
            headers = {"Allow": ", ".join(sorted(exc.valid_methods))}  # RFC 9110 §15.5.6
        return json_response(
            {"error": error, "message": exc.description or exc.name, "details": {}}, code, headers
        )

    @app.errorhandler(Exception)
    async def internal_error(exc: Exception) -> Response:
        log.exception("unhandled error while serving a request")
        return error_response(InternalError("internal error"))

    @app.get("/healthz")
    async def healthz() -> Response:
        return struct_response(Health("ok"), 200)

    @app.get("/readyz")
    async def readyz() -> Response:
        checks = service.readiness()
        ready = all(check["ok"] for check in checks.values())
        status: ReadinessStatus = (
            "stopping" if service.stopping else ("ready" if ready else "not_ready")
        )
        return struct_response(
            Readiness(status, readiness_checks(checks)), 200 if status == "ready" else 503
        )

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        service.refresh_gauges()
        body = metrics.exposition()
        role = service.role
        if role.peers_dir is not None and request.args.get("scope") != "worker":
            body = await gather_metrics(role, body)  # every worker's, labelled by worker
        return Response(body, status=200, content_type=metrics.content_type)

    @app.get("/openapi.json")
    async def openapi() -> Response:
        current = service.context.settings
        cached = openapi_cache.get("doc")
        if cached is None or cached[0] is not current:
            cached = openapi_cache["doc"] = (
                current,
                _json.encode(openapi_document(current)),
            )
        return Response(cached[1], status=200, content_type="application/json")

    @app.get("/")
    async def index() -> Response:
        return struct_response(ServiceInfo("logstack", __version__), 200)

    register_admin_routes(app, service)
    register_dlq_routes(app, service)
    app.asgi_app = IngestEndpoint(app.asgi_app, service)  # type: ignore[method-assign,assignment]
    return app


def served_routes(app: QuartTrio) -> list[tuple[str, str]]:
    """Every (method, path) the app answers: Quart's routes and the ingest endpoint."""
    routes = {
        (method, rule.rule)
        for rule in app.url_map.iter_rules()
        for method in rule.methods or ()
        if method not in ("HEAD", "OPTIONS")
    }
    routes.update((method, INGEST_PATH) for method in INGEST_METHODS)
    return sorted(routes)


def disk_free_ratio(path: os.PathLike[str] | str) -> float:
    stats = os.statvfs(path)
    return stats.f_bavail / stats.f_blocks if stats.f_blocks else 0.0
