"""``POST /v1/logs:ingest`` as a plain ASGI handler, in front of the Quart routes.

Quart's request machinery (a nursery and two tasks per request, the ``Request`` and
``Response`` objects, the request context, routing, hooks) costs ~0.4 ms of CPU per request
on the project's machine: half of what the bare Hypercorn + Quart-Trio endpoint spends, and
more than LogStack's own work on a one-line request. The ingest route is the one that
carries the load, so it is served here, at the ASGI level: the same transport checks,
answers, headers and metrics, without that machinery. Every other route is Quart's.

Installed as Quart's ASGI middleware (``app.asgi_app``), so it runs inside ``instrument``
(request id, HTTP metrics) like every route. It does only transport work (method, media
type, encoding, size, idempotency key) and hands an ``Envelope`` to the pipeline head;
stages decide the answer. A full head channel answers 503 at once: backpressure becomes an
HTTP status.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any, Final

import msgspec
import trio

from ._api_types import IngestAccepted
from ._body_budget import BodyBudget, held_for
from ._config import ApiKey, ServerSettings
from ._context import AUTHENTICATE, RATE_LIMIT
from ._envelope import Accepted, Envelope
from ._errors import (
    InternalError,
    PayloadTooLargeError,
    RejectError,
    UnavailableError,
    UnsupportedMediaTypeError,
    ValidationError,
)
from ._logging import request_id_var
from ._media_type import charset_of, codec_name

if TYPE_CHECKING:
    from ._service import Service

log = logging.getLogger("logstack.http")

REFUSAL_LOG_INTERVAL_S: Final = 1.0
"""At most one ``ingest unavailable``/``ingest failed`` line per key, reason and interval:
under overload every 503 wrote one (4,148 lines in 25 s in an audit), drowning the rest."""
_last_refusal_log: dict[tuple[str, str, str], tuple[float, int]] = {}


def _log_refusal(message: str, token: str, reason: str) -> None:
    """Log a 5xx refusal, or count it towards the next line (``suppressed``: how many of
    the same were not logged since the last line)."""
    now = time.monotonic()
    key = (message, token, reason)
    last, suppressed = _last_refusal_log.get(key, (-math.inf, 0))
    if now - last < REFUSAL_LOG_INTERVAL_S:
        _last_refusal_log[key] = (last, suppressed + 1)
        return
    if len(_last_refusal_log) > 10_000:  # keys and reasons are bounded; stay so anyway
        _last_refusal_log.clear()
    _last_refusal_log[key] = (now, 0)
    extra: dict[str, Any] = {"token": token, "reason": reason}
    if suppressed:
        extra["suppressed"] = suppressed
    log.warning(message, extra=extra)


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[..., Awaitable[None]]

INGEST_PATH: Final = "/v1/logs:ingest"
INGEST_METHODS: Final = ("POST",)
MAX_IDEMPOTENCY_KEY: Final = 128
BODY_TIMEOUT_S: Final = 60.0
"""How long a client may take to send its body (Quart's ``BODY_TIMEOUT`` default)."""

_encode = msgspec.json.Encoder().encode
_JSON: Final = (b"content-type", b"application/json")
_WANTED: Final = frozenset(
    {
        b"authorization",
        b"content-type",
        b"content-encoding",
        b"content-length",
        b"x-idempotency-key",
    }
)


class _BodyTimeout(RejectError):
    """The body did not arrive in time (Quart answered the same with a 408)."""

    status = 408
    code = "http_error"


class _MethodNotAllowed(RejectError):
    """Not a POST (the other routes get the same answer from Quart's handler)."""

    status = 405
    code = "method_not_allowed"

    def headers(self) -> dict[str, str]:
        return {"Allow": ", ".join(INGEST_METHODS)}


class _Gone(Exception):
    """The client disconnected before its body arrived: nobody is left to answer."""


def payload_too_large(limit: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(
        f"request body exceeds {limit} bytes", details={"max_body_bytes": limit}
    )


class IngestEndpoint:
    """ASGI middleware: answers every request for ``INGEST_PATH``, passes the rest on."""

    def __init__(self, app: ASGIApp, service: Service) -> None:
        self.app = app
        self.service = service
        self.budget = BodyBudget(service.context.settings.server.max_body_bytes_in_flight)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != INGEST_PATH:
            await self.app(scope, receive, send)
            return
        if scope["method"] not in INGEST_METHODS:
            refused = _MethodNotAllowed("The method is not allowed for the requested URL.")
            await _answer(send, refused.status, refused.body(), refused.headers())
            return
        try:
            status, body, headers = await self._ingest(scope, receive)
        except _Gone:
            return
        except Exception:
            log.exception("unhandled error while serving a request")
            error = InternalError("internal error")
            status, body, headers = error.status, error.body(), error.headers()
        await _answer(send, status, body, headers)

    async def _ingest(
        self, scope: Scope, receive: Receive
    ) -> tuple[int, dict[str, Any] | msgspec.Struct, dict[str, str]]:
        service = self.service
        metrics = service.context.metrics
        request_id = request_id_var.get() or str(uuid.uuid4())
        server = service.context.settings.server
        budget = self.budget
        budget.limit = server.max_body_bytes_in_flight  # a reload applies to the next request
        headers = _request_headers(scope)
        key: ApiKey | None = None
        give_back: Callable[[], None] | None = None  # the rate-limit token, if taken here
        try:
            # A request without a valid key, or over its key's rate, is answered before its
            # body is read (the connection drops the body as it comes): it holds no memory
            # and takes no pipeline step. The ``auth`` stage checks the key again (a reload
            # may come in between); it rate-limits only what did not pass here.
            services = service.context.services
            authenticate = services.get(AUTHENTICATE)
            if authenticate is not None:
                key = authenticate(headers.get(b"authorization"))
            encoding, idempotency_key = _check_headers(headers, server.max_body_bytes)
            rate_limit = services.get(RATE_LIMIT)
            if key is not None and rate_limit is not None:
                give_back = rate_limit(key)
            length = headers.get(b"content-length")
            if length is not None and length.isdigit() and encoding == "identity":
                # A body that cannot fit is refused before it is read: under twice the
                # capacity, reading the bodies of the 503s left the accepted ones ~40% less
                # CPU (docs/benchmarks.md).
                budget.check_room(int(length))
            body = await _read_body(receive, server.max_body_bytes, budget)
            envelope = _envelope(
                headers, body, encoding, idempotency_key, request_id, server, budget, key
            )
            envelope.rate_checked = give_back is not None
        except RejectError as transport_error:
            # Refused by the service itself before the pipeline (503: no room for its
            # body): not a request the key's rate counts. A refusal for the client's own
            # fault (413, 408) keeps the token: given back, a key could hold the body
            # budget with stalled bodies again and again, unbounded by its rate (an audit).
            if give_back is not None and transport_error.status == 503:
                give_back()
            # A refusal after the key was known is that key's (the metric's ``token``).
            token = key.name if key is not None else "unauthenticated"
            metrics.logs_rejected.labels(token=token, reason=transport_error.reason).inc()
            return transport_error.status, transport_error.body(), transport_error.headers()
        try:
            return await self._through_pipeline(envelope, give_back)
        finally:
            envelope.release()  # the request is answered: what it held goes back

    async def _through_pipeline(
        self, envelope: Envelope, give_back: Callable[[], None] | None
    ) -> tuple[int, dict[str, Any] | msgspec.Struct, dict[str, str]]:
        """Hand ``envelope`` to the pipeline head and wait for its answer; a head that
        cannot take it gives its rate-limit token back (``give_back``)."""
        service = self.service
        metrics = service.context.metrics
        server = service.context.settings.server
        head = service.head
        error: RejectError
        try:
            # While stopping, requests that reached the app are still taken: the head stays
            # open until every in-flight request is answered ("drain to the WAL"). Only
            # the listeners are closed, and idle connections once nothing is in flight.
            if head is None:
                raise trio.ClosedResourceError
            head.send_nowait([envelope])
        except trio.WouldBlock:
            error = UnavailableError(
                "ingest pipeline is full; retry later", retry_after=1, reason="pipeline_full"
            )
            if give_back is not None:
                give_back()
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            error = UnavailableError(
                "service is shutting down", retry_after=5, reason="shutting_down"
            )
            if give_back is not None:
                give_back()
        else:
            with trio.move_on_after(server.request_timeout_s):
                outcome = await envelope.reply.wait()
                if isinstance(outcome, Accepted):
                    accepted = IngestAccepted(
                        "Logs accepted for processing",
                        outcome.entries_accepted,
                        outcome.request_id,
                        now_rfc3339(),
                    )
                    return 202, accepted, {}
                error = outcome
            if not envelope.reply.resolved:
                # The WAL's fsync, most often; or a stage holding the request (a plugin
                # that never passes it on or answers it).
                error = UnavailableError(
                    "timed out waiting for the request to be stored (the pipeline or the WAL "
                    "is too slow)",
                    retry_after=5,
                    reason="timeout",
                )
                # Answered now: a stage that gets to it later skips it, and ``wal_append``
                # neither writes it (if it has not yet) nor counts it as ingested.
                envelope.reject(error)
        metrics.logs_rejected.labels(token=envelope.key_name, reason=error.reason).inc()
        if error.status >= 500:
            _log_refusal(
                "ingest failed" if error.status == 500 else "ingest unavailable",
                envelope.key_name,
                error.reason,
            )
        return error.status, error.body(), error.headers()


def _request_headers(scope: Scope) -> dict[bytes, str]:
    """The headers ingest reads, as Quart reads them: latin-1, the first of repeated ones."""
    headers: dict[bytes, str] = {}
    for name, value in scope["headers"]:
        if name in _WANTED and name not in headers:
            headers[name] = value.decode("latin-1")
    return headers


def _check_headers(headers: dict[bytes, str], max_body_bytes: int) -> tuple[str, str | None]:
    """The transport checks on the headers (media type, encoding, declared size, idempotency
    key); returns the body's encoding (``identity`` or ``gzip``) and the idempotency key."""
    content_type = headers.get(b"content-type", "")
    media, _, parameters = content_type.partition(";")
    media = media.strip().lower()
    if media != "application/json":
        raise UnsupportedMediaTypeError(
            "Content-Type must be application/json",
            details={"content_type": media or None},
        )
    charset = charset_of(content_type) if parameters else None
    if charset is not None and codec_name(charset) != "utf-8":
        # RFC 8259 §8.1: JSON between systems is UTF-8; a body in another charset would
        # be read as UTF-8 anyway, and refused or stored garbled.
        raise UnsupportedMediaTypeError(
            "JSON must be encoded as UTF-8", details={"charset": charset}
        )
    encoding = headers.get(b"content-encoding", "identity").strip().lower()
    if encoding not in ("identity", "gzip", ""):
        raise UnsupportedMediaTypeError(
            "Content-Encoding must be gzip or absent", details={"content_encoding": encoding}
        )
    length = headers.get(b"content-length")
    if length is not None and length.isdigit() and int(length) > max_body_bytes:
        raise payload_too_large(max_body_bytes)
    idempotency_key = headers.get(b"x-idempotency-key")
    if idempotency_key is not None and not 0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY:
        raise ValidationError(
            f"X-Idempotency-Key must be 1-{MAX_IDEMPOTENCY_KEY} characters",
            details={"errors": [{"field": "X-Idempotency-Key", "message": "1-128 characters"}]},
            reason="bad_idempotency_key",
        )
    return ("gzip" if encoding == "gzip" else "identity"), idempotency_key


def _envelope(
    headers: dict[bytes, str],
    body: bytes,
    encoding: str,
    idempotency_key: str | None,
    request_id: str,
    server: ServerSettings,
    budget: BodyBudget,
    key: ApiKey | None,
) -> Envelope:
    """The request as the pipeline takes it, holding its body's bytes of ``budget`` and,
    for a plain body, the estimate of its decoded form. No JSON decoding. ``key`` is the
    one authenticated on the headers, if the ``auth`` stage published its check (until
    ``auth`` runs, it names the request in metrics and logs: a full pipeline's 503 is that
    key's)."""
    envelope = Envelope(
        request_id=request_id,
        authorization=headers.get(b"authorization"),
        body=body,
        idempotency_key=idempotency_key,
        content_encoding=encoding,
        max_body_bytes=server.max_body_bytes,
        key=key,
        budget=budget,
        held=len(body),
    )
    if encoding != "gzip":  # a gzip body's decoded form is held once it is inflated
        try:
            envelope.hold(held_for(len(body)) - len(body))
        except UnavailableError:
            envelope.release()
            raise
    return envelope


async def _read_body(receive: Receive, max_body_bytes: int, budget: BodyBudget) -> bytes:
    """The whole body, refused (413) as soon as it outgrows the limit, whether or not a
    ``Content-Length`` announced it; 408 if it takes longer than ``BODY_TIMEOUT_S``; 503
    if the bytes of all bodies being received would pass ``budget``. The body's bytes stay
    taken from ``budget`` (its envelope gives them back once the request is answered)
    unless it is refused here."""
    chunks: list[bytes] = []
    size = 0
    try:
        with trio.move_on_after(BODY_TIMEOUT_S):
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    raise _Gone  # http.disconnect
                chunk = message.get("body", b"")
                if chunk:
                    if size + len(chunk) > max_body_bytes:
                        raise payload_too_large(max_body_bytes)
                    budget.take(len(chunk))
                    size += len(chunk)
                    chunks.append(chunk)
                if not message.get("more_body", False):
                    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        raise _BodyTimeout(f"the request body did not arrive within {BODY_TIMEOUT_S:g} s")
    except BaseException:
        budget.give_back(size)
        raise


async def _answer(
    send: Send,
    status: int,
    body: dict[str, Any] | msgspec.Struct,
    headers: dict[str, str],
) -> None:
    payload = _encode(body)
    raw_headers = [_JSON, (b"content-length", str(len(payload)).encode())]
    raw_headers += [(name.lower().encode(), value.encode()) for name, value in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload, "more_body": False})


def now_rfc3339() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"
