"""A Loki-compatible push receiver: a real HTTP server on loopback, for tests and benchmarks.

It answers ``POST /loki/api/v1/push`` the way Loki's distributor and ingester do, so the
forwarder is tested against real behaviour rather than a mock's idea of it:

- ``Content-Type: application/json`` (optionally ``Content-Encoding: gzip``/``deflate``) is
  the JSON format; any other content type is a protobuf ``PushRequest`` in a raw snappy block.
- A body that cannot be decoded is ``400``; a push with no streams is ``422``.
- Each stream is validated on its own (label syntax and names, at least one label, label
  count and lengths), each entry too (``max_line_size``, structured metadata allowed and
  within its limits, optionally the age limits). The valid entries are stored; if anything
  was rejected the answer is ``400``. A ``400`` is therefore *not* "nothing happened":
  retrying it re-sends lines Loki already has.
- The 400 text is Loki's: the distributor's validation messages grouped like Go's
  ``util.GroupedErrors`` (``"2 errors like: ...; 1 errors like: ..."``), unless an ingester
  refused entries (out-of-order window, per-stream rate limit): then, as Loki's
  ``instance.Push`` does, only the *last* stream with refused entries is reported, listing at
  most ``max_returned_errors`` (10) of them (``entry with timestamp <Go Time.String()>
  ignored, reason: '...',``) and a ``total ignored: N out of M for stream: {...}`` trailer;
  the validation messages are dropped. Clients cannot learn every refused entry from a 400.
- The validated bytes of a push (line + structured metadata) are charged to a token bucket
  whose burst is ``burst_limit_bytes`` (Loki's ``ingestion_burst_size_mb``, 6 MB): a larger
  push can never pass and gets ``429``; nothing of it is stored.
- Per stream, an entry older than the stream's newest entry minus ``out_of_order_window_s``
  (``max_chunk_age / 2`` = 1 h by default) is rejected as "too far behind". An exact duplicate
  (same stream, timestamp and line) is accepted but not stored again; ``duplicates`` counts it.
- Success is ``204`` with an empty body.

Switches change behaviour while serving: ``fail_next``, ``clear_failures``, ``delay_s``,
``ready``, ``rate_limit_lines_per_push``. Inspection: ``streams``, ``entries()``, ``lines()``,
``pushes``, ``status_counts``, ``push_log``, ``received_headers``, ``duplicates``,
``wait_for_entries``. :class:`ReceiverTransport` serves receivers to the forwarder without
sockets, for tests on trio's autojump clock.

A process running ``python -m logstack.testing.loki`` is driven over HTTP instead:
``GET /_receiver/entries``, ``GET /_receiver/stats`` and ``POST /_receiver/control``.
"""

from __future__ import annotations

import gzip
import re
import socket
import time
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from operator import attrgetter
from typing import TYPE_CHECKING, Any, cast

import msgspec
import trio
from hypercorn.config import Config as HypercornConfig

if TYPE_CHECKING:
    from hypercorn.typing import ASGIFramework

from .._delivery import LokiAnswer, LokiTransportError
from .._http_server import serve as serve_asgi
from .._loki_proto import (
    PushEntry,
    decode_json_push,
    decode_push_request_raw,
    decompress_snappy,
    format_labels,
    go_time_string,
    is_valid_label_name,
    parse_labels,
    rfc3339_seconds,
)
from ._push_upb import decode_usual_push

__all__ = [
    "LokiReceiver",
    "PushRecord",
    "ReceiverTransport",
    "open_loki_receiver",
    "serve_loki_receiver",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

PUSH_PATH = "/loki/api/v1/push"
_NS = 1_000_000_000
_FAKE_TENANT = "fake"  # Loki's tenant when auth_enabled is false

_json_encoder = msgspec.json.Encoder()

_RawStream = tuple[str | dict[str, str], list[PushEntry]]
"""A decoded stream: its labels (a string from protobuf, a mapping from JSON), entries."""
_Accepted = tuple[str, dict[str, str], list[PushEntry]]
"""A validated stream: canonical label string, labels, the entries that passed."""
_timestamp_of = attrgetter("timestamp_ns")
_line_of = attrgetter("line")


class _Control(msgspec.Struct, forbid_unknown_fields=True):
    """Body of ``POST /_receiver/control`` (each field optional, applied in this order)."""

    reset: bool = False
    clear_failures: bool = False
    fail_next_status: int | None = None
    fail_next_count: int | None = None
    delay_s: float | None = None
    ready: bool | None = None
    rate_limit_lines_per_push: int | None = None
    clear_rate_limit: bool = False
    allow_structured_metadata: bool | None = None


_control_decoder = msgspec.json.Decoder(_Control)


class _StreamState:
    __slots__ = ("labels", "newest", "seen")

    def __init__(self, labels: dict[str, str]) -> None:
        self.labels = labels
        self.newest: int | None = None
        self.seen: set[tuple[int, str]] = set()


@dataclass(frozen=True, slots=True)
class PushRecord:
    """One answered push, as ``LokiReceiver.push_log`` keeps it."""

    at: float
    """``trio.current_time()`` when the answer was decided."""
    status: int
    tenant: str
    """``X-Scope-OrgID`` as sent ("" if absent)."""
    entries: int
    """Entries in the push as decoded (0 if it could not be decoded or was failed on purpose)."""
    streams: tuple[str, ...]
    """Label strings of the push's streams, in push order."""
    user_agent: str


async def answer_lifespan(receive: Receive, send: Send) -> None:
    """Acknowledge an ASGI server's lifespan startup and shutdown (nothing to set up)."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def _grouped_errors(errors: list[str]) -> str:
    """Go's ``util.GroupedErrors.Error()``: identical messages grouped and counted, joined
    by ``"; "``; each prefixed ``"<n> errors like: "`` unless there is a single error."""
    counts: dict[str, int] = {}
    for error in errors:
        counts[error] = counts.get(error, 0) + 1
    if len(counts) == 1 and len(errors) == 1:
        return errors[0]
    return "; ".join(f"{n} errors like: {error}" for error, n in counts.items())


class LokiReceiver:
    """The state and behaviour of one fake Loki; serve it with :func:`open_loki_receiver`.

    The same receiver can be served again after a stop (an outage), keeping what it stored:
    ``async with open_loki_receiver(port=rx.port, receiver=rx)``.
    """

    def __init__(
        self,
        *,
        max_line_size_bytes: int = 256 * 1024,
        out_of_order_window_s: float | None = 3600.0,
        burst_limit_bytes: int = 6 * 1024 * 1024,
        ingestion_rate_bytes_per_s: float | None = None,
        max_label_names_per_series: int = 15,
        max_label_name_length: int = 1024,
        max_label_value_length: int = 2048,
        reject_old_samples_max_age_s: float | None = None,
        creation_grace_period_s: float | None = None,
        require_tenant: bool = False,
        graceful_timeout_s: float = 0.2,
        max_returned_errors: int = 10,
        allow_structured_metadata: bool = True,
        max_structured_metadata_size_bytes: int = 64 * 1024,
        max_structured_metadata_entries: int = 128,
        probe_marker: str | None = None,
    ) -> None:
        """Limits default to Loki's defaults, with two deliberate exceptions.

        ``reject_old_samples_max_age_s`` (Loki: 168 h) and ``creation_grace_period_s``
        (Loki: 10 min) compare timestamps with the wall clock, which would make tests with
        fixed timestamps fail by date; they are off unless given. ``out_of_order_window_s``
        is ``max_chunk_age / 2`` (2 h / 2); ``0`` behaves like ``unordered_writes: false``
        and ``None`` accepts any order. ``ingestion_rate_bytes_per_s=None`` refills the
        bucket instantly, so only a single push over ``burst_limit_bytes`` is limited.
        ``max_returned_errors`` is the ingester's ``max_returned_stream_errors`` (10);
        ``allow_structured_metadata`` and the two structured-metadata limits are Loki 3's
        ``limits_config`` defaults (allowed, 64 KiB, 128 pairs per entry).

        ``probe_marker`` (for benchmarks): a stored line containing the marker followed by
        digits records its arrival time under those digits (``probe_arrivals``, served at
        ``GET /_receiver/probes``), so a client can measure ack-to-Loki latency.
        """
        self.probe_marker = probe_marker
        self._probe_pattern = (
            re.compile(re.escape(probe_marker) + r"([0-9]+)") if probe_marker else None
        )
        self.probe_arrivals: dict[str, int] = {}
        self.max_line_size_bytes = max_line_size_bytes
        self.out_of_order_window_s = out_of_order_window_s
        self.burst_limit_bytes = burst_limit_bytes
        self.ingestion_rate_bytes_per_s = ingestion_rate_bytes_per_s
        self.max_label_names_per_series = max_label_names_per_series
        self.max_label_name_length = max_label_name_length
        self.max_label_value_length = max_label_value_length
        self.reject_old_samples_max_age_s = reject_old_samples_max_age_s
        self.creation_grace_period_s = creation_grace_period_s
        self.require_tenant = require_tenant
        self.graceful_timeout_s = graceful_timeout_s
        self.serving_since_ns: int | None = None
        """Wall clock (``time.time_ns``) when the last ``serve`` began, just before it
        listened: the moment a client could first reach this receiver (kept by ``reset``)."""
        self.max_returned_errors = max_returned_errors
        self.allow_structured_metadata = allow_structured_metadata
        self.max_structured_metadata_size_bytes = max_structured_metadata_size_bytes
        self.max_structured_metadata_entries = max_structured_metadata_entries

        # Switches (plain attributes; change them at any time).
        self.delay_s: float = 0.0
        """Seconds to sleep before answering a push (the push is processed after the sleep)."""
        self.ready: bool = True
        """What ``GET /ready`` says: 200 ``ready`` or 503."""
        self.rate_limit_lines_per_push: int | None = None
        """Per stream and push, lines beyond this many are rejected as rate limited (429)."""
        self._fail_status: int | None = None
        self._fail_remaining: int | None = None

        # Server state.
        self.url: str | None = None
        """``http://127.0.0.1:PORT`` while serving (kept after a stop, for restarts)."""
        self.port: int | None = None
        self._shutdown: trio.Event | None = None
        self._changed = trio.Event()
        self._buckets: dict[str, tuple[float, float]] = {}
        """Each tenant's rate limiter: (tokens, when counted)."""
        self.reset()

    # ------------------------------------------------------------------ switches

    def fail_next(self, status: int, count: int | None = None) -> None:
        """Answer ``status`` to the next ``count`` pushes (``None``: until cleared).

        Nothing of a failed push is stored. Counted from the push's arrival.
        """
        if count is not None and count < 0:
            raise ValueError("count must be >= 0 or None")
        if count == 0:
            self.clear_failures()
            return
        self._fail_status = status
        self._fail_remaining = count

    def clear_failures(self) -> None:
        self._fail_status = None
        self._fail_remaining = None

    def reset(self) -> None:
        """Forget everything stored and counted (switches stay as they are)."""
        self.tenant_streams: dict[str, dict[str, list[PushEntry]]] = {}
        """Stored entries per tenant (``X-Scope-OrgID``, ``fake`` without one), then per
        canonical label string, in arrival order. As in Loki, tenants share nothing: the
        same labels in two tenants are two streams, with their own duplicates and order."""
        self._state: dict[tuple[str, str], _StreamState] = {}
        self.pushes = 0
        """Push requests received (answered or not yet)."""
        self.status_counts: Counter[int] = Counter()
        """Answered pushes by HTTP status."""
        self.duplicates = 0
        """Entries accepted but not stored because the stream already had them."""
        self.received_headers: dict[str, str] = {}
        self.ready_headers: dict[str, str] = {}
        """Headers of the last push (lower-case names)."""
        self.last_error: str | None = None
        """Body of the last non-2xx push answer."""
        self.push_log: list[PushRecord] = []
        """Every answered push, in answer order."""
        self.entry_count = 0
        self.first_stored_ns: int | None = None
        """Wall clock (``time.time_ns``) when the first push that stored entries was answered."""
        self.first_stored_entries = 0
        """How many entries that first push stored."""
        self.last_stored_ns: int | None = None
        """Wall clock when the last push that stored entries was answered."""
        self._notify()

    # ------------------------------------------------------------------ inspection

    @property
    def streams(self) -> dict[str, list[PushEntry]]:
        """Stored entries per canonical label string, when at most one tenant pushed (most
        tests); with several, a stream is only named with its tenant: ``tenant_streams``."""
        if len(self.tenant_streams) > 1:
            raise ValueError(
                f"entries of {len(self.tenant_streams)} tenants "
                f"({', '.join(sorted(self.tenant_streams))}): use tenant_streams"
            )
        return next(iter(self.tenant_streams.values()), {})

    def entries(self) -> list[tuple[dict[str, str], PushEntry]]:
        """Every stored entry with its stream's labels, stream by stream (every tenant)."""
        return [(labels, entry) for _, labels, entry in self.tenant_entries()]

    def tenant_entries(self) -> list[tuple[str, dict[str, str], PushEntry]]:
        """Every stored entry with its tenant and its stream's labels, stream by stream."""
        return [
            (tenant, self._state[tenant, key].labels, entry)
            for tenant, streams in self.tenant_streams.items()
            for key, entries in streams.items()
            for entry in entries
        ]

    def lines(self) -> list[str]:
        return [entry.line for _, _, entry in self.tenant_entries()]

    # ``timeout`` rather than the caller's ``trio.fail_after``: a timeout here is a test
    # failure and deserves a message saying what did arrive.
    async def wait_for_entries(self, n: int, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Return once at least ``n`` entries are stored; ``TimeoutError`` otherwise."""
        await self._wait(lambda: self.entry_count >= n, timeout, f"{n} stored entries")

    async def wait_for_pushes(self, n: int, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Return once at least ``n`` pushes have been answered (any status)."""
        await self._wait(lambda: self.status_counts.total() >= n, timeout, f"{n} answered pushes")

    async def _wait(self, done: Callable[[], bool], timeout_s: float, what: str) -> None:
        with trio.move_on_after(timeout_s):
            while not done():
                await self._changed.wait()
            return
        raise TimeoutError(
            f"waited {timeout_s:g}s for {what}: {self.entry_count} entries stored, "
            f"{self.pushes} pushes received, statuses {dict(self.status_counts)}, "
            f"{self.duplicates} duplicates, last error: {self.last_error!r}"
        )

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def statistics(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "pushes": self.pushes,
            "status_counts": {str(k): v for k, v in sorted(self.status_counts.items())},
            "entries": self.entry_count,
            "serving_since_ns": self.serving_since_ns,
            "first_stored_ns": self.first_stored_ns,
            "first_stored_entries": self.first_stored_entries,
            "last_stored_ns": self.last_stored_ns,
            "streams": len(self._state),
            "duplicates": self.duplicates,
            "last_error": self.last_error,
            "ready": self.ready,
        }

    def __repr__(self) -> str:
        state = self.url if self._shutdown is not None else "stopped"
        failing = (
            f", failing with {self._fail_status} "
            f"({'until cleared' if self._fail_remaining is None else self._fail_remaining})"
            if self._fail_status is not None
            else ""
        )
        return (
            f"<LokiReceiver {state}: {self.entry_count} entries in {len(self._state)} "
            f"streams, {self.pushes} pushes {dict(self.status_counts)}, "
            f"{self.duplicates} duplicates{failing}>"
        )

    # ------------------------------------------------------------------ serving

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until :meth:`stop` or cancellation; ``task_status.started(url)``."""
        if self._shutdown is not None:
            raise RuntimeError(f"{self!r} is already serving")
        # Bind here rather than in Hypercorn so a taken port raises a plain OSError, not
        # one nested in Hypercorn's nurseries. SO_REUSEADDR (as Hypercorn would set too)
        # lets a restart re-bind the port while old connections sit in TIME_WAIT.
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        except BaseException:
            sock.close()
            raise
        config = HypercornConfig()
        config.bind = [f"fd://{sock.detach()}"]  # Hypercorn's socket now owns the fd
        config.accesslog = None
        config.loglevel = "WARNING"
        config.graceful_timeout = self.graceful_timeout_s
        shutdown = self._shutdown = trio.Event()
        # Taken before listening, so no push can be stored before it.
        self.serving_since_ns = time.time_ns()
        try:
            async with trio.open_nursery() as nursery:
                binds: list[str] = await nursery.start(
                    partial(
                        serve_asgi,
                        cast("ASGIFramework", self._asgi),
                        config,
                        shutdown_trigger=shutdown.wait,
                    )
                )
                self.url = binds[0]
                self.port = int(self.url.rsplit(":", 1)[1])
                task_status.started(self.url)
        finally:
            self._shutdown = None

    def stop(self) -> None:
        """Stop serving: the listener closes, connections close after in-flight requests
        (cut after ``graceful_timeout_s``). Stored entries are kept."""
        if self._shutdown is not None:
            self._shutdown.set()

    # ------------------------------------------------------------------ ASGI

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await answer_lifespan(receive, send)
        if kind != "http":
            return
        method: str = scope["method"]
        path: str = scope["path"]
        if path == PUSH_PATH:
            if method != "POST":
                await _respond(send, 405, b"method not allowed\n")
                return
            headers = {
                k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]
            }
            body = await _read_body(receive)
            if body is None:
                return
            status, text = await self.handle_push(headers, body)
            await _respond(send, status, text.encode())
        elif path == "/ready" and method in ("GET", "HEAD"):
            status, text = self.handle_ready(
                {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
            )
            await _respond(send, status, text.encode())
        elif path == "/loki/api/v1/status/buildinfo" and method == "GET":
            info = {
                "version": "3.0.0-logstack-testing",
                "revision": "logstack",
                "branch": "main",
                "buildUser": "logstack.testing",
                "buildDate": "",
                "goVersion": "",
            }
            await _respond_json(send, info)
        elif path == "/_receiver/entries" and method == "GET":
            await _respond(send, 200, self.dump_json(), b"application/json")
        elif path == "/_receiver/stats" and method == "GET":
            await _respond_json(send, self.statistics())
        elif path == "/_receiver/probes" and method == "GET":
            await _respond_json(send, self.probe_arrivals)
        elif path == "/_receiver/control" and method == "POST":
            body = await _read_body(receive)
            if body is None:
                return
            try:
                self._apply_control(_control_decoder.decode(body))
            except (msgspec.MsgspecError, ValueError) as exc:
                await _respond(send, 400, f"{exc}\n".encode())
                return
            await _respond(send, 204, b"")
        else:
            await _respond(send, 404, b"404 page not found\n")

    def handle_ready(self, headers: dict[str, str] | None = None) -> tuple[int, str]:
        """Answer ``GET /ready``: 200 ``ready`` or 503. ``headers`` (lower-case names) are
        kept in ``ready_headers``, as a push's are in ``received_headers``."""
        self.ready_headers = headers or {}
        if self.ready:
            return 200, "ready\n"
        return 503, "Ingester not ready: receiver switched to not ready\n"

    def _apply_control(self, control: _Control) -> None:
        if control.reset:
            self.reset()
        if control.clear_failures:
            self.clear_failures()
        if control.fail_next_status is not None:
            self.fail_next(control.fail_next_status, control.fail_next_count)
        if control.delay_s is not None:
            self.delay_s = control.delay_s
        if control.ready is not None:
            self.ready = control.ready
        if control.clear_rate_limit:
            self.rate_limit_lines_per_push = None
        if control.rate_limit_lines_per_push is not None:
            self.rate_limit_lines_per_push = control.rate_limit_lines_per_push
        if control.allow_structured_metadata is not None:
            self.allow_structured_metadata = control.allow_structured_metadata

    def dump_json(self) -> bytes:
        """All stored entries as a JSON array of ``{tenant, labels, timestamp_ns, line,
        structured_metadata}`` objects (what ``GET /_receiver/entries`` answers)."""
        return _json_encoder.encode([_entry_record(*record) for record in self.tenant_entries()])

    def dump_json_lines(self) -> bytes:
        """The same records, one JSON object per line."""
        return b"".join(
            _json_encoder.encode(_entry_record(*record)) + b"\n" for record in self.tenant_entries()
        )

    # ------------------------------------------------------------------ the push path

    async def handle_push(self, headers: dict[str, str], body: bytes) -> tuple[int, str]:
        """Answer one push as ``POST /loki/api/v1/push`` would: ``(status, body text)``.

        ``headers`` have lower-case names. Used by the HTTP server and by
        :class:`ReceiverTransport` (no sockets, for tests on trio's autojump clock).
        """
        self.pushes += 1
        self.received_headers = headers
        failure: int | None = None
        if self._fail_status is not None:
            failure = self._fail_status
            if self._fail_remaining is not None:
                self._fail_remaining -= 1
                if self._fail_remaining <= 0:
                    self.clear_failures()
        if self.delay_s > 0:
            await trio.sleep(self.delay_s)
        entries = 0
        streams: tuple[str, ...] = ()
        if failure is not None:
            status, text = failure, f"simulated failure: {failure}\n"
        else:
            before = self.entry_count
            status, text, entries, streams = self._process(headers, body)
            if self.entry_count > before:
                self._stored_at(time.time_ns(), self.entry_count - before)
        self.status_counts[status] += 1
        self.push_log.append(
            PushRecord(
                at=trio.current_time(),
                status=status,
                tenant=headers.get("x-scope-orgid", ""),
                entries=entries,
                streams=streams,
                user_agent=headers.get("user-agent", ""),
            )
        )
        if status >= 300:
            self.last_error = text
        self._notify()
        return status, text

    def _stored_at(self, now_ns: int, stored: int) -> None:
        """Note when pushes stored entries: a backlog's drain rate is measured between the
        first and the last of them (``python -m logstack.bench --scenario outage``)."""
        if self.first_stored_ns is None:
            self.first_stored_ns = now_ns
            self.first_stored_entries = stored
        self.last_stored_ns = now_ns

    def _process(
        self, headers: dict[str, str], body: bytes
    ) -> tuple[int, str, int, tuple[str, ...]]:
        """Decode, validate and store one push. Synchronous, so a push is atomic.

        Returns (status, text, entries in the push, label strings of its streams).
        """
        tenant = headers.get("x-scope-orgid", "")
        if self.require_tenant and not tenant:
            return 401, "no org id\n", 0, ()
        tenant = tenant or _FAKE_TENANT
        try:
            raw_streams = _decode(headers, body)
        except _Refused as refused:
            return refused.status, refused.text, 0, ()
        pushed = sum(len(entries) for _, entries in raw_streams)
        names = tuple(s if isinstance(s, str) else format_labels(s) for s, _ in raw_streams)
        if not raw_streams:
            return 422, "error at least one valid stream is required for ingestion\n", 0, ()

        errors: list[str] = []
        accepted, validated_bytes = self._distribute(raw_streams, errors)
        # The distributor answers every validation problem at once, grouped like Go's
        # util.GroupedErrors; it is only returned if the ingesters accept the rest.
        validation_error = _grouped_errors(errors) if errors else None
        if not accepted:
            if validation_error is None:
                return 204, "", pushed, names
            return 400, validation_error + "\n", pushed, names
        # The tenant's rate limiter: a push over the burst can never pass.
        if not self._allow(tenant, validated_bytes):
            lines = sum(len(good) for _, _, good in accepted)
            return (
                429,
                f"Ingestion rate limit exceeded for user {tenant} (limit: "
                f"{self.ingestion_rate_bytes_per_s or self.burst_limit_bytes:.0f} bytes/sec) "
                f"while attempting to ingest '{lines}' lines totaling '{validated_bytes}' bytes, "
                "reduce log volume or contact your Loki administrator to see if the limit "
                "can be increased\n",
                pushed,
                names,
            )
        ingester_error = self._ingest(accepted, tenant)
        if ingester_error is not None:
            # The ingester's error replaces the distributor's validation errors.
            status, text = ingester_error
            return status, text + "\n", pushed, names
        if validation_error is not None:
            return 400, validation_error + "\n", pushed, names
        return 204, "", pushed, names

    def _distribute(
        self, raw_streams: list[_RawStream], errors: list[str]
    ) -> tuple[list[_Accepted], int]:
        """The distributor's checks: each stream's labels, then each entry.

        Returns the streams with their valid entries and the bytes those charge to the rate
        limiter (line plus structured metadata); rejections are appended to ``errors``.
        """
        now_ns = time.time_ns()
        oldest_ok = newest_ok = None
        if self.reject_old_samples_max_age_s is not None:
            oldest_ok = now_ns - int(self.reject_old_samples_max_age_s * _NS)
        if self.creation_grace_period_s is not None:
            newest_ok = now_ns + int(self.creation_grace_period_s * _NS)
        max_line = self.max_line_size_bytes
        max_sm_bytes = self.max_structured_metadata_size_bytes
        max_sm_count = self.max_structured_metadata_entries
        accepted: list[_Accepted] = []
        validated_bytes = 0
        for source, entries in raw_streams:
            if not entries:  # Loki skips these before looking at their labels
                continue
            labels, key, error = self._validate_labels(source)
            if error is not None:
                errors.append(error)
                continue
            good: list[PushEntry] = []
            for entry in entries:
                ts = entry.timestamp_ns
                if oldest_ok is not None and ts < oldest_ok:
                    errors.append(
                        f"entry for stream '{key}' has timestamp too old: {rfc3339_seconds(ts)}, "
                        f"oldest acceptable timestamp is: {rfc3339_seconds(oldest_ok)}"
                    )
                    continue
                if newest_ok is not None and ts > newest_ok:
                    errors.append(
                        f"entry for stream '{key}' has timestamp too new: {rfc3339_seconds(ts)}"
                    )
                    continue
                line = entry.line
                size = len(line) if line.isascii() else len(line.encode())  # isascii is O(1)
                if max_line and size > max_line:
                    errors.append(
                        f"Max entry size '{max_line}' bytes exceeded for stream '{key}' while "
                        f"adding an entry with length '{size}' bytes"
                    )
                    continue
                sm = entry.structured_metadata
                if sm:
                    sm_bytes = sum(len(k.encode()) + len(v.encode()) for k, v in sm.items())
                    if not self.allow_structured_metadata:
                        errors.append(
                            f"stream '{key}' includes structured metadata, but this feature is "
                            "disallowed. Please see `limits_config.allow_structured_metadata` "
                            "or contact your Loki administrator to enable it."
                        )
                        continue
                    if max_sm_bytes and sm_bytes > max_sm_bytes:
                        errors.append(
                            f"stream '{key}' has structured metadata too large: '{sm_bytes}' "
                            f"bytes, limit: '{max_sm_bytes}' bytes. Please see "
                            "`limits_config.max_structured_metadata_size` or contact your Loki "
                            "administrator to increase it."
                        )
                        continue
                    if max_sm_count and len(sm) > max_sm_count:
                        errors.append(
                            f"stream '{key}' has too many structured metadata labels: "
                            f"'{len(sm)}', limit: '{max_sm_count}'. Please see "
                            "`limits_config.max_structured_metadata_entries_count` or contact "
                            "your Loki administrator to increase it."
                        )
                        continue
                    size += sm_bytes
                validated_bytes += size
                good.append(entry)
            if good:
                accepted.append((key, labels, good))
        return accepted, validated_bytes

    def _ingest(self, accepted: list[_Accepted], tenant: str) -> tuple[int, str] | None:
        """The ingester: drop duplicates, apply the per-stream rate limit and the
        out-of-order window, store the rest.

        Like Loki's ``instance.Push``, only the *last* stream with refused entries is
        reported: ``(status, text)`` listing at most ``max_returned_errors`` of its entries,
        429 if the last refusal was the rate limit, else 400. ``None`` if nothing was refused.
        """
        report: tuple[int, str] | None = None
        window = self.out_of_order_window_s
        window_ns = int(window * _NS) if window is not None else None
        per_push_limit = self.rate_limit_lines_per_push
        probe_marker = self.probe_marker
        streams = self.tenant_streams.setdefault(tenant, {})
        for key, labels, good in accepted:
            state = self._state.get((tenant, key))
            if state is None:
                state = self._state[tenant, key] = _StreamState(labels)
                streams[key] = []
            stored = streams[key]
            if per_push_limit is None and self._store_whole(state, stored, good, window_ns):
                continue
            seen = state.seen
            newest = state.newest
            taken = 0
            failed: list[str] = []
            last_rate_limited = False
            for entry in good:
                ts = entry.timestamp_ns
                ident = (ts, entry.line)
                if ident in seen:
                    self.duplicates += 1
                    continue
                if per_push_limit is not None and taken >= per_push_limit:
                    failed.append(
                        f"entry with timestamp {go_time_string(ts)} ignored, reason: 'Per stream "
                        f"rate limit exceeded (limit: {per_push_limit} lines/push) while "
                        f"attempting to ingest for stream '{key}' totaling {len(entry.line)}B, "
                        "consider splitting a stream via additional labels or contact your "
                        "Loki administrator to see if the limit can be increased',"
                    )
                    last_rate_limited = True
                    continue
                taken += 1
                if window_ns is not None and newest is not None and ts < newest - window_ns:
                    failed.append(
                        f"entry with timestamp {go_time_string(ts)} ignored, reason: 'entry too "
                        f"far behind, entry timestamp is: {rfc3339_seconds(ts)}, oldest "
                        f"acceptable timestamp is: {rfc3339_seconds(newest - window_ns)}',"
                    )
                    last_rate_limited = False
                    continue
                seen.add(ident)
                stored.append(entry)
                self.entry_count += 1
                if probe_marker and probe_marker in entry.line:
                    self._note_probes((entry.line,))
                if newest is None or ts > newest:
                    newest = ts
            state.newest = newest
            if failed:
                listed = failed[: self.max_returned_errors] if self.max_returned_errors else failed
                text = (
                    "\n".join(listed)
                    + f"\nuser '{tenant}', total ignored: {len(failed)} out of {len(good)} "
                    f"for stream: {key}"
                )
                report = (429 if last_rate_limited else 400), text
        return report

    def _store_whole(
        self,
        state: _StreamState,
        stored: list[PushEntry],
        good: list[PushEntry],
        window_ns: int | None,
    ) -> bool:
        """Store all of a stream's entries at once, in C-level passes, when the entry-by-entry
        path of :meth:`_ingest` would store every one of them: none repeats an entry of the
        push or one stored before, and none is behind the window even counted from the
        newest of them all. ``False`` (nothing done) otherwise: that path then decides entry
        by entry.

        In a drain this receiver's work per push is most of each push's round trip, and the
        sender waits for the answer before its next push (``docs/performance.md``, "The
        drain"): per entry in Python, the duplicate check and storing were a quarter of it."""
        stamps = list(map(_timestamp_of, good))
        lines = list(map(_line_of, good))
        fresh = set(zip(stamps, lines, strict=True))
        seen = state.seen
        if len(fresh) != len(good) or not seen.isdisjoint(fresh):
            return False
        newest = max(stamps)
        if state.newest is not None and state.newest > newest:
            newest = state.newest
        if window_ns is not None and min(stamps) < newest - window_ns:
            return False
        seen |= fresh
        stored.extend(good)
        state.newest = newest
        self.entry_count += len(good)
        if self.probe_marker:
            self._note_probes(lines)
        return True

    def _note_probes(self, lines: Iterable[str]) -> None:
        """Record when each probe (``probe_marker`` and digits) first arrived."""
        marker, pattern = self.probe_marker, self._probe_pattern
        if not marker or pattern is None:
            return
        for line in lines:
            if marker in line:
                found = pattern.search(line)
                if found is not None:
                    self.probe_arrivals.setdefault(found[1], time.time_ns())

    def _validate_labels(
        self, source: str | dict[str, str]
    ) -> tuple[dict[str, str], str, str | None]:
        """(labels, canonical key, error or None) for one stream, as the distributor checks."""
        if isinstance(source, str):
            try:
                labels = parse_labels(source)
            except ValueError as exc:
                return {}, source, f"Error parsing labels '{source}' with error: {exc}"
        else:
            labels = source
            for name in labels:
                if not is_valid_label_name(name):
                    text = format_labels(labels)
                    return (
                        {},
                        text,
                        f"Error parsing labels '{text}' with error: invalid label name {name!r}",
                    )
        key = format_labels(labels)
        if not labels:
            return labels, key, "error at least one label pair is required per stream"
        if len(labels) > self.max_label_names_per_series:
            return (
                labels,
                key,
                f"entry for stream '{key}' has {len(labels)} label names; "
                f"limit {self.max_label_names_per_series}",
            )
        for name, value in labels.items():
            if len(name) > self.max_label_name_length:
                return labels, key, f"stream '{key}' has label name too long: '{name}'"
            if len(value.encode()) > self.max_label_value_length:
                return labels, key, f"stream '{key}' has label value too long: '{value}'"
        return labels, key, None

    def _allow(self, tenant: str, n: int) -> bool:
        """Go's ``rate.Limiter.AllowN`` with burst ``burst_limit_bytes``, one per tenant."""
        burst = self.burst_limit_bytes
        if n > burst:
            return False
        rate = self.ingestion_rate_bytes_per_s
        if rate is None:
            return True
        now = time.monotonic()
        tokens, counted_at = self._buckets.get(tenant, (float(burst), now))
        tokens = min(burst, tokens + (now - counted_at) * rate)
        if n > tokens:
            self._buckets[tenant] = (tokens, now)
            return False
        self._buckets[tenant] = (tokens - n, now)
        return True


class _Refused(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status
        self.text = text


def _decode(headers: dict[str, str], body: bytes) -> list[_RawStream]:
    """Loki's ``ParseLokiRequest``: any failure refuses the whole push with 400."""
    encoding = headers.get("content-encoding", "").strip().lower()
    content_type = headers.get("content-type", "").split(";", 1)[0].strip().lower()
    try:
        if encoding in ("", "snappy"):  # snappy here means the protobuf block's own
            data = body
        elif encoding == "gzip":
            data = gzip.decompress(body)
        elif encoding == "deflate":
            data = zlib.decompress(body, -zlib.MAX_WBITS)
        else:
            raise _Refused(400, f'Content-Encoding "{encoding}" not supported\n')
        if content_type == "application/json":
            return [(s.labels, s.entries) for s in decode_json_push(data)]
        raw = decompress_snappy(data)
        usual = decode_usual_push(raw)
        return list(decode_push_request_raw(raw) if usual is None else usual)
    except (ValueError, OSError, EOFError, zlib.error) as exc:
        raise _Refused(400, f"{exc}\n") from None


def _entry_record(tenant: str, labels: dict[str, str], entry: PushEntry) -> dict[str, Any]:
    return {
        "tenant": tenant,
        "labels": labels,
        "timestamp_ns": entry.timestamp_ns,
        "line": entry.line,
        "structured_metadata": entry.structured_metadata,
    }


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or ``None`` if the client went away first."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _respond(
    send: Send, status: int, body: bytes, content_type: bytes = b"text/plain; charset=utf-8"
) -> None:
    if status == 204:
        headers: list[tuple[bytes, bytes]] = []
        body = b""
    else:
        headers = [
            (b"content-type", content_type),
            (b"content-length", str(len(body)).encode()),
        ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _respond_json(send: Send, payload: Any) -> None:
    await _respond(send, 200, _json_encoder.encode(payload), b"application/json")


class ReceiverTransport:
    """The forwarder's transport wired straight to :class:`LokiReceiver` objects, no sockets.

    ``receivers`` maps a base URL (as in ``loki.urls``) to its receiver. A URL in ``down``
    (or with no receiver) refuses connections like a stopped server. Every call passes one
    trio checkpoint, so a test on the autojump clock sees virtual time only.
    """

    def __init__(self, receivers: Mapping[str, LokiReceiver]) -> None:
        self.receivers = dict(receivers)
        self.down: set[str] = set()
        self.requests = 0

    def _find(self, url: str) -> tuple[LokiReceiver, str]:
        for base, receiver in self.receivers.items():
            if url.startswith(base) and base not in self.down:
                return receiver, url[len(base) :]
        raise LokiTransportError(f"ConnectError: connection refused: {url}")

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> LokiAnswer:
        await trio.lowlevel.checkpoint()
        self.requests += 1
        receiver, path = self._find(url)
        if path != PUSH_PATH:
            return LokiAnswer(404, "404 page not found\n")
        status, text = await receiver.handle_push({k.lower(): v for k, v in headers.items()}, body)
        return LokiAnswer(status, text)

    async def get(self, url: str, headers: Mapping[str, str] | None = None) -> LokiAnswer:
        await trio.lowlevel.checkpoint()
        receiver, path = self._find(url)
        if path != "/ready":
            return LokiAnswer(404, "404 page not found\n")
        lowered = {k.lower(): v for k, v in (headers or {}).items()}
        return LokiAnswer(*receiver.handle_ready(lowered))

    async def aclose(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"<ReceiverTransport {sorted(self.receivers)} down={sorted(self.down)}>"


async def serve_loki_receiver(
    receiver: LokiReceiver,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``receiver`` until it is stopped or the task is cancelled (for ``nursery.start``)."""
    await receiver.serve(host, port, task_status=task_status)


@asynccontextmanager
async def open_loki_receiver(
    port: int = 0,
    *,
    host: str = "127.0.0.1",
    receiver: LokiReceiver | None = None,
    **options: Any,
) -> AsyncIterator[LokiReceiver]:
    """Serve a :class:`LokiReceiver` on ``host:port`` for the duration of the block.

    ``port=0`` picks a free port (``rx.url``/``rx.port`` tell which). Pass ``receiver`` to
    serve an existing one again, e.g. on the same port after a simulated outage; otherwise
    ``options`` go to the ``LokiReceiver`` constructor.
    """
    if receiver is not None and options:
        raise TypeError("pass either receiver or LokiReceiver options, not both")
    rx = receiver if receiver is not None else LokiReceiver(**options)
    if rx._shutdown is not None:
        raise RuntimeError(f"{rx!r} is already serving")
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(rx.serve, host, port)
            try:
                yield rx
            finally:
                rx.stop()
    except BaseExceptionGroup as group:
        # The nursery wraps whatever leaves it; a lone error (the body's, or a bind
        # failure) is re-raised as itself so callers can catch what they expect.
        if len(group.exceptions) != 1:
            raise
        exc = group.exceptions[0]
        raise exc from exc.__cause__
