"""The forwarder's HTTP client: keep-alive HTTP/1.1 to Loki, written on h11.

Why not httpx: its transport spent ~0.9 ms of CPU on a 10 KB push and ~0.7 ms on a GET,
against ~0.3 ms for the same push through h11 directly (``docs/performance.md``, the row
"Pushes and /ready probes through h11"; ``docs/forwarding.md``, "The HTTP client"). A
1000-entry push is ~10 KB compressed, so that is ~0.6 µs per entry on the event loop that
also answers ingest requests, and a tenth of a drain's time. The forwarder
needs little of a general client: one request at a time per connection, bodies in memory,
timeouts applied by the caller (``trio.fail_after``). h11, the HTTP/1.1 state machine under
httpcore and Hypercorn, does the protocol: framing, chunked and close-delimited answers, and
whether a connection may be reused.

- Connections are kept per origin (scheme, host, port) and reused; one the server closed
  while idle (it is readable then) is dropped before use, as httpcore does.
- A request that fails on a reused connection before any byte of an answer arrived is sent
  once more on a new connection: the server may have closed the idle connection just as the
  request went out. Re-sending a push is safe: Loki stores an identical entry once.
- ``https`` URLs use httpx's default TLS context (the ``certifi`` CA bundle), as before.
- Failures raise :class:`LokiTransportError` named like httpx's errors (``ConnectError``,
  ``WriteError``, ``ReadError``, ``RemoteProtocolError``), which readiness and logs show.
"""

from __future__ import annotations

import datetime
import email.utils
import select
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

import h11
import httpx
import trio

from ._delivery import USER_AGENT, LokiAnswer, LokiTransportError
from ._media_type import charset_of, codec_name

__all__ = ["Http11Transport"]

MAX_ANSWER_CHARS = 64 * 1024
"""An answer's text is kept up to this many characters (the rest of the body is read and
dropped, so the connection stays usable); Loki's error texts are far shorter."""
MAX_ANSWER_BYTES = 4 * MAX_ANSWER_CHARS  # enough for that many characters of UTF-8
RECEIVE_BYTES = 65536


@dataclass(frozen=True, slots=True)
class _Target:
    """A URL split once: where to connect, what to ask for."""

    scheme: str
    host: str
    port: int
    host_header: bytes
    path: bytes

    @property
    def origin(self) -> tuple[str, str, int]:
        return self.scheme, self.host, self.port


def parse_target(url: str) -> _Target:
    """``ValueError`` for anything but an absolute ``http``/``https`` URL with a host."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    default = 443 if parts.scheme == "https" else 80
    port = parts.port or default
    host = parts.hostname
    shown = f"[{host}]" if ":" in host else host
    host_header = shown if port == default else f"{shown}:{port}"
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return _Target(parts.scheme, host, port, host_header.encode("idna"), path.encode())


EARLY_ANSWER_WAIT_S: Final = 1.0
"""How long a request whose body could not be sent waits for an answer already on its way."""


class _Failure(Exception):
    """A request failed; ``answered`` says whether any byte of an answer had arrived."""

    def __init__(self, kind: str, detail: str, *, answered: bool) -> None:
        super().__init__(f"{kind}: {detail}")
        self.answered = answered


class _Connection:
    """One TCP (or TLS) connection and its h11 state; used by one request at a time."""

    def __init__(self, stream: trio.abc.Stream, sock: trio.socket.SocketType) -> None:
        self.stream = stream
        self.sock = sock
        self.h11 = h11.Connection(h11.CLIENT)
        self.reused = False

    def close(self) -> None:
        """Drop the connection at once (no TLS close_notify: it is broken or surplus)."""
        self.sock.close()

    def expired(self) -> bool:
        """An idle connection the server closed (or wrote to) is readable: not reusable.
        (``poll``, not ``select``: a busy server's descriptors pass 1024.)"""
        poller = select.poll()
        try:
            poller.register(self.sock.fileno(), select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):
            return True

    async def exchange(
        self, method: bytes, target: _Target, headers: Mapping[str, str], body: bytes
    ) -> tuple[LokiAnswer, bool]:
        """Send one request and read its answer: (answer, connection reusable)."""
        conn = self.h11
        fields = [(b"host", target.host_header)]
        if body or method == b"POST":
            fields.append((b"content-length", str(len(body)).encode()))
        try:
            fields += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        except UnicodeEncodeError as exc:  # nothing sent, and sending again would not help
            raise LokiTransportError(f"LocalProtocolError: header not latin-1: {exc}") from None
        try:
            head = conn.send(h11.Request(method=method, target=target.path, headers=fields))
            data = conn.send(h11.Data(data=body)) if body else b""
            tail = conn.send(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:
            raise LokiTransportError(f"LocalProtocolError: {exc}") from None
        try:
            await self.stream.send_all(b"".join((head or b"", data or b"", tail or b"")))
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            early = await self._early_answer()
            if early is not None:
                return early, False
            raise _Failure("WriteError", _describe(exc), answered=False) from None
        return await self._read_answer()

    async def _early_answer(self) -> LokiAnswer | None:
        """The answer a server sent before it stopped reading the request, if it can still
        be read: a proxy's ``413`` for a body over its limit, then a close. That is the
        server's verdict (dead-lettered as the SPEC says), where a write error alone would
        be retried for good."""
        with trio.move_on_after(EARLY_ANSWER_WAIT_S):
            try:
                answer, _ = await self._read_answer()
            except _Failure:
                return None
            return answer
        return None

    async def _read_answer(self) -> tuple[LokiAnswer, bool]:
        conn = self.h11
        status = 0
        retry_after: str | None = None
        charset = "utf-8"
        chunks: list[bytes] = []
        kept = 0
        answered = False
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise _Failure("RemoteProtocolError", str(exc), answered=answered) from None
            if event is h11.NEED_DATA:
                try:
                    received = await self.stream.receive_some(RECEIVE_BYTES)
                except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    raise _Failure("ReadError", _describe(exc), answered=answered) from None
                if not received and not answered:
                    raise _Failure(
                        "RemoteProtocolError",
                        "server disconnected without sending a response",
                        answered=False,
                    )
                answered = True
                conn.receive_data(bytes(received))
            elif isinstance(event, h11.InformationalResponse):
                continue  # 100 Continue and the like: the final answer follows
            elif isinstance(event, h11.Response):
                status = event.status_code
                for name, value in event.headers:
                    if name == b"retry-after":
                        retry_after = value.decode("latin-1")
                    elif name == b"content-type":
                        charset = _charset(value) or charset
            elif isinstance(event, h11.Data):
                if kept < MAX_ANSWER_BYTES:
                    piece = event.data[: MAX_ANSWER_BYTES - kept]
                    chunks.append(bytes(piece))
                    kept += len(piece)
            elif isinstance(event, h11.EndOfMessage):
                break
            else:  # ConnectionClosed before the answer ended
                raise _Failure(
                    "RemoteProtocolError", "connection closed mid-answer", answered=answered
                )
        reusable = conn.our_state is h11.DONE and conn.their_state is h11.DONE
        if reusable:
            conn.start_next_cycle()
        return LokiAnswer(
            status, _text(b"".join(chunks), charset), _retry_after(retry_after)
        ), reusable


def _charset(content_type: bytes) -> str | None:
    """The answer's charset if Python has a text codec for it (else the default applies):
    ``base64``, ``zlib``, ``rot13`` and the like are codecs, but not of bytes to text."""
    charset = charset_of(content_type.decode("latin-1"))
    name = None if charset is None else codec_name(charset)
    if name is None:
        return None
    try:
        b"a".decode(name)  # (an empty input is decoded without asking the codec)
    except LookupError:  # not a text encoding
        return None
    except UnicodeError:
        pass  # ``undefined`` and the like: ``_text`` falls back
    return name


def _text(body: bytes, charset: str) -> str:
    """The answer's text, whatever its bytes: an answer that cannot be read in its charset
    (``idna`` and non-ASCII bytes, say) is still Loki's answer, not a local failure, which
    sent the push again and again."""
    try:
        text = body.decode(charset, errors="replace")
    except (LookupError, UnicodeError):
        text = body.decode("utf-8", errors="replace")
    return text[:MAX_ANSWER_CHARS]


def _retry_after(value: str | None, now: float | None = None) -> float | None:
    """``Retry-After`` in seconds: delay-seconds, or an HTTP-date (RFC 9110 §10.2.3, what
    some proxies send) counted from ``now``; ``None`` if it is neither."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _describe(exc: BaseException) -> str:
    """What went wrong, down to the cause trio wraps: a TLS error under a broken stream, the
    refused attempts under "all attempts to connect ... failed"."""
    cause = exc.__cause__
    while isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        cause = cause.exceptions[0]
    if cause is None:
        return str(exc) or type(exc).__name__
    detail = f"{type(cause).__name__}: {cause}"
    return f"{exc}: {detail}" if str(exc) else detail


class Http11Transport:
    """:class:`~logstack._delivery.LokiTransport` over kept-alive h11 connections.

    ``max_idle`` connections are kept per origin between requests (more may be open while
    requests run: callers bound how many run at once)."""

    def __init__(self, max_idle: int, ssl_context: ssl.SSLContext | None = None) -> None:
        self.max_idle = max_idle
        self._ssl_context = ssl_context
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._targets: dict[str, _Target] = {}
        self._closed = False
        self.connections_opened = 0
        """Connections opened so far (tests and ``repr``: keep-alive at work)."""

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> LokiAnswer:
        return await self._request(b"POST", url, headers, body)

    async def get(self, url: str, headers: Mapping[str, str] | None = None) -> LokiAnswer:
        return await self._request(b"GET", url, {"User-Agent": USER_AGENT, **(headers or {})}, b"")

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, {}
        for connections in idle.values():
            for connection in connections:
                connection.close()
        await trio.lowlevel.checkpoint()

    def _target(self, url: str) -> _Target:
        target = self._targets.get(url)
        if target is None:
            try:
                target = parse_target(url)
            except ValueError as exc:
                raise LokiTransportError(f"UnsupportedProtocol: {exc}") from None
            if len(self._targets) >= 64:  # a few endpoints, two paths each, normally
                self._targets.clear()
            self._targets[url] = target
        return target

    async def _request(
        self, method: bytes, url: str, headers: Mapping[str, str], body: bytes
    ) -> LokiAnswer:
        if self._closed:
            raise LokiTransportError("ConnectError: transport closed")
        target = self._target(url)
        connection = self._take(target)
        while True:
            if connection is None:
                connection = await self._connect(target)
            try:
                answer, reusable = await connection.exchange(method, target, headers, body)
            except _Failure as failure:
                connection.close()
                if connection.reused and not failure.answered:
                    connection = None  # the server dropped an idle connection: once more
                    continue
                raise LokiTransportError(str(failure)) from None
            except BaseException:  # cancelled (a timeout) mid-request: the state is unknown
                connection.close()
                raise
            if reusable:
                self._put_back(target, connection)
            else:
                connection.close()
            return answer

    def _take(self, target: _Target) -> _Connection | None:
        idle = self._idle.get(target.origin)
        while idle:
            connection = idle.pop()
            if not connection.expired():
                connection.reused = True
                return connection
            connection.close()
        return None

    def _put_back(self, target: _Target, connection: _Connection) -> None:
        idle = self._idle.setdefault(target.origin, [])
        if self._closed or len(idle) >= self.max_idle:
            connection.close()
            return
        idle.append(connection)

    async def _connect(self, target: _Target) -> _Connection:
        try:
            tcp = await trio.open_tcp_stream(target.host, target.port)
        except OSError as exc:
            raise LokiTransportError(f"ConnectError: {_describe(exc)}") from None
        stream: trio.abc.Stream = tcp
        if target.scheme == "https":
            if self._ssl_context is None:
                self._ssl_context = httpx.create_ssl_context()
            tls = trio.SSLStream(
                tcp, self._ssl_context, server_hostname=target.host, https_compatible=True
            )
            try:
                await tls.do_handshake()
            except (OSError, trio.BrokenResourceError) as exc:
                tcp.socket.close()
                raise LokiTransportError(f"ConnectError: {_describe(exc)}") from None
            except BaseException:
                tcp.socket.close()
                raise
            stream = tls
        self.connections_opened += 1
        return _Connection(stream, tcp.socket)

    def __repr__(self) -> str:
        idle = sum(len(c) for c in self._idle.values())
        return f"<Http11Transport opened={self.connections_opened} idle={idle}>"
