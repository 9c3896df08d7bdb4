"""A Loki-compatible push receiver: a real HTTP server on loopback, for tests and benchmarks.

It answers ``POST /loki/api/v1/push`` the way Loki's distributor and ingester do, so the
forwarder is tested against real behaviour rather than a mock's idea of it:

- ``Content-Type: application/json`` (optionally ``Content-Encoding: gzip``/``deflate``) is
  the JSON format; any other content type is a protobuf ``PushRequest`` in a raw snappy block.
- A body that cannot be decoded is ``400``; a push with no streams is ``422``.
- Each stream is validated on its own (label syntax and names, at least one label, label
  count and lengths), each entry too (``max_line_size``, optionally the age limits). The valid
  entries are stored; if anything was rejected the answer is ``400`` with Loki's messages,
  one per line. A ``400`` is therefore *not* "nothing happened": retrying it re-sends lines
  Loki already has.
- The validated bytes of a push (line + structured metadata) are charged to a token bucket
  whose burst is ``burst_limit_bytes`` (Loki's ``ingestion_burst_size_mb``, 6 MB): a larger
  push can never pass and gets ``429``; nothing of it is stored.
- Per stream, an entry older than the stream's newest entry minus ``out_of_order_window_s``
  (``max_chunk_age / 2`` = 1 h by default) is rejected as "too far behind". An exact duplicate
  (same stream, timestamp and line) is accepted but not stored again; ``duplicates`` counts it.
- Success is ``204`` with an empty body.

Switches change behaviour while serving: ``fail_next``, ``clear_failures``, ``delay_s``,
``ready``, ``rate_limit_lines_per_push``. Inspection: ``streams``, ``entries()``, ``lines()``,
``pushes``, ``status_counts``, ``received_headers``, ``duplicates``, ``wait_for_entries``.

A process running ``python -m logstack.testing.loki`` is driven over HTTP instead:
``GET /_receiver/entries``, ``GET /_receiver/stats`` and ``POST /_receiver/control``.
"""

from __future__ import annotations

import gzip
import socket
import time
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any, cast

import msgspec
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

if TYPE_CHECKING:
    from hypercorn.typing import ASGIFramework

from .._loki_proto import (
    PushEntry,
    decode_json_push,
    decode_push_request_raw,
    decompress_snappy,
    format_labels,
    is_valid_label_name,
    parse_labels,
)

__all__ = ["LokiReceiver", "open_loki_receiver", "serve_loki_receiver"]

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


_control_decoder = msgspec.json.Decoder(_Control)


def _fmt_ts(ns: int) -> str:
    seconds, nanos = divmod(ns, _NS)
    try:
        base = datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    except (OverflowError, OSError, ValueError):
        return f"{ns}ns"
    return f"{base}.{nanos:09d}Z"


class _StreamState:
    __slots__ = ("labels", "newest", "seen")

    def __init__(self, labels: dict[str, str]) -> None:
        self.labels = labels
        self.newest: int | None = None
        self.seen: set[tuple[int, str]] = set()


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
    ) -> None:
        """Limits default to Loki's defaults, with two deliberate exceptions.

        ``reject_old_samples_max_age_s`` (Loki: 168 h) and ``creation_grace_period_s``
        (Loki: 10 min) compare timestamps with the wall clock, which would make tests with
        fixed timestamps fail by date; they are off unless given. ``out_of_order_window_s``
        is ``max_chunk_age / 2`` (2 h / 2); ``0`` behaves like ``unordered_writes: false``
        and ``None`` accepts any order. ``ingestion_rate_bytes_per_s=None`` refills the
        bucket instantly, so only a single push over ``burst_limit_bytes`` is limited.
        """
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
        self._tokens = float(burst_limit_bytes)
        self._tokens_at = time.monotonic()
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
        self.streams: dict[str, list[PushEntry]] = {}
        """Stored entries per canonical label string, in arrival order."""
        self._state: dict[str, _StreamState] = {}
        self.pushes = 0
        """Push requests received (answered or not yet)."""
        self.status_counts: Counter[int] = Counter()
        """Answered pushes by HTTP status."""
        self.duplicates = 0
        """Entries accepted but not stored because the stream already had them."""
        self.received_headers: dict[str, str] = {}
        """Headers of the last push (lower-case names)."""
        self.last_error: str | None = None
        """Body of the last non-2xx push answer."""
        self.entry_count = 0
        self._notify()

    # ------------------------------------------------------------------ inspection

    def entries(self) -> list[tuple[dict[str, str], PushEntry]]:
        """Every stored entry with its stream's labels, stream by stream."""
        return [
            (self._state[key].labels, entry)
            for key, entries in self.streams.items()
            for entry in entries
        ]

    def lines(self) -> list[str]:
        return [entry.line for entries in self.streams.values() for entry in entries]

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
            "streams": len(self.streams),
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
            f"<LokiReceiver {state}: {self.entry_count} entries in {len(self.streams)} "
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
        try:
            async with trio.open_nursery() as nursery:
                binds: list[str] = await nursery.start(
                    partial(
                        hypercorn_serve,
                        cast("ASGIFramework", self._asgi),
                        config,
                        shutdown_trigger=shutdown.wait,
                        mode="asgi",
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
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
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
            status, text = await self._push(headers, body)
            await _respond(send, status, text.encode())
        elif path == "/ready" and method in ("GET", "HEAD"):
            if self.ready:
                await _respond(send, 200, b"ready\n")
            else:
                await _respond(send, 503, b"Ingester not ready: receiver switched to not ready\n")
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

    def dump_json(self) -> bytes:
        """All stored entries as a JSON array of ``{labels, timestamp_ns, line,
        structured_metadata}`` objects (what ``GET /_receiver/entries`` answers)."""
        return _json_encoder.encode([_entry_record(labels, e) for labels, e in self.entries()])

    def dump_json_lines(self) -> bytes:
        """The same records, one JSON object per line."""
        return b"".join(
            _json_encoder.encode(_entry_record(labels, e)) + b"\n" for labels, e in self.entries()
        )

    # ------------------------------------------------------------------ the push path

    async def _push(self, headers: dict[str, str], body: bytes) -> tuple[int, str]:
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
        if failure is not None:
            status, text = failure, f"simulated failure: {failure}\n"
        else:
            status, text = self._process(headers, body)
        self.status_counts[status] += 1
        if status >= 300:
            self.last_error = text
        self._notify()
        return status, text

    def _process(self, headers: dict[str, str], body: bytes) -> tuple[int, str]:
        """Decode, validate and store one push. Synchronous, so a push is atomic."""
        tenant = headers.get("x-scope-orgid", "")
        if self.require_tenant and not tenant:
            return 401, "no org id\n"
        tenant = tenant or _FAKE_TENANT
        try:
            raw_streams = _decode(headers, body)
        except _Refused as refused:
            return refused.status, refused.text
        if not raw_streams:
            return 422, "error at least one valid stream is required for ingestion\n"

        errors: list[str] = []
        accepted, validated_bytes = self._distribute(raw_streams, errors)
        if not accepted:
            return (400, "\n".join(errors) + "\n") if errors else (204, "")
        # The tenant's rate limiter: a push over the burst can never pass.
        if not self._allow(validated_bytes):
            lines = sum(len(good) for _, _, good in accepted)
            return 429, (
                f"Ingestion rate limit exceeded for user {tenant} (limit: "
                f"{self.ingestion_rate_bytes_per_s or self.burst_limit_bytes:.0f} bytes/sec) "
                f"while attempting to ingest '{lines}' lines totaling '{validated_bytes}' bytes, "
                "reduce log volume or contact your Loki administrator to see if the limit "
                "can be increased\n"
            )
        rate_limited = self._ingest(accepted, tenant, errors)
        if not errors:
            return 204, ""
        return (429 if rate_limited else 400), "\n".join(errors) + "\n"

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
                        f"entry for stream '{key}' has timestamp too old: {_fmt_ts(ts)}, "
                        f"oldest acceptable timestamp is: {_fmt_ts(oldest_ok)}"
                    )
                    continue
                if newest_ok is not None and ts > newest_ok:
                    errors.append(f"entry for stream '{key}' has timestamp too new: {_fmt_ts(ts)}")
                    continue
                line = entry.line
                size = len(line) if line.isascii() else len(line.encode())  # isascii is O(1)
                if max_line and size > max_line:
                    errors.append(
                        f"Max entry size '{max_line}' bytes exceeded for stream '{key}' while "
                        f"adding an entry with length '{size}' bytes"
                    )
                    continue
                if entry.structured_metadata:
                    size += sum(
                        len(k.encode()) + len(v.encode())
                        for k, v in entry.structured_metadata.items()
                    )
                validated_bytes += size
                good.append(entry)
            if good:
                accepted.append((key, labels, good))
        return accepted, validated_bytes

    def _ingest(self, accepted: list[_Accepted], tenant: str, errors: list[str]) -> bool:
        """The ingester: drop duplicates, apply the per-stream rate limit and the
        out-of-order window, store the rest. Returns whether anything was rate limited."""
        rate_limited = False
        window = self.out_of_order_window_s
        window_ns = int(window * _NS) if window is not None else None
        per_push_limit = self.rate_limit_lines_per_push
        for key, labels, good in accepted:
            state = self._state.get(key)
            if state is None:
                state = self._state[key] = _StreamState(labels)
                self.streams[key] = []
            stored = self.streams[key]
            seen = state.seen
            newest = state.newest
            taken = 0
            failed: list[str] = []
            for entry in good:
                ts = entry.timestamp_ns
                ident = (ts, entry.line)
                if ident in seen:
                    self.duplicates += 1
                    continue
                if per_push_limit is not None and taken >= per_push_limit:
                    rate_limited = True
                    failed.append(
                        f"entry with timestamp {_fmt_ts(ts)} ignored, reason: 'Per stream rate "
                        f"limit exceeded (limit: {per_push_limit} lines/push) while attempting "
                        f"to ingest for stream '{key}'',"
                    )
                    continue
                taken += 1
                if window_ns is not None and newest is not None and ts < newest - window_ns:
                    failed.append(
                        f"entry with timestamp {_fmt_ts(ts)} ignored, reason: 'entry too far "
                        f"behind, entry timestamp is: {_fmt_ts(ts)}, oldest acceptable "
                        f"timestamp is: {_fmt_ts(newest - window_ns)}',"
                    )
                    continue
                seen.add(ident)
                stored.append(entry)
                self.entry_count += 1
                if newest is None or ts > newest:
                    newest = ts
            state.newest = newest
            if failed:
                errors.append(
                    "\n".join(failed)
                    + f"\nuser '{tenant}', total ignored: {len(failed)} out of {len(good)} "
                    f"for stream: {key}"
                )
        return rate_limited

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

    def _allow(self, n: int) -> bool:
        """Go's ``rate.Limiter.AllowN`` with burst ``burst_limit_bytes``."""
        burst = self.burst_limit_bytes
        if n > burst:
            return False
        rate = self.ingestion_rate_bytes_per_s
        if rate is None:
            return True
        now = time.monotonic()
        self._tokens = min(burst, self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now
        if n > self._tokens:
            return False
        self._tokens -= n
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
        return list(decode_push_request_raw(decompress_snappy(data)))
    except (ValueError, OSError, EOFError, zlib.error) as exc:
        raise _Refused(400, f"{exc}\n") from None


def _entry_record(labels: dict[str, str], entry: PushEntry) -> dict[str, Any]:
    return {
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
