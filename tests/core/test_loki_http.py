"""The forwarder's h11 client against real servers on loopback: the Loki stand-in, and
scripted raw TCP (and TLS) servers for the answers a stand-in never gives."""

from __future__ import annotations

import datetime
import email.utils
import os
import resource
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio
import trustme

from logstack._delivery import LokiTransportError
from logstack._loki_http import MAX_ANSWER_CHARS, Http11Transport, _retry_after, parse_target
from logstack._loki_proto import PushEntry, PushStream, compress_snappy, encode_push_request
from logstack.testing import LokiReceiver, open_loki_receiver

Handler = Callable[[trio.abc.Stream, int], Awaitable[None]]
"""A scripted server's handling of one connection (its number, from 0)."""


@pytest.fixture
async def rx() -> AsyncIterator[LokiReceiver]:
    async with open_loki_receiver() as receiver:
        yield receiver


@asynccontextmanager
async def scripted_server(
    handler: Handler, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[str]:
    """A TCP (or TLS) server on 127.0.0.1 running ``handler`` per connection; yields its URL."""
    count = 0

    async def serve_one(stream: trio.abc.Stream) -> None:
        nonlocal count
        number, count = count, count + 1
        async with stream:
            try:
                await handler(stream, number)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async with trio.open_nursery() as nursery:
        if ssl_context is None:
            listeners = await nursery.start(partial(trio.serve_tcp, serve_one, 0, host="127.0.0.1"))
            scheme = "http"
        else:
            listeners = await nursery.start(
                partial(trio.serve_ssl_over_tcp, serve_one, 0, ssl_context, host="127.0.0.1")
            )
            scheme = "https"
        port = (
            listeners[0].transport_listener.socket.getsockname()[1]
            if ssl_context
            else (listeners[0].socket.getsockname()[1])
        )
        yield f"{scheme}://localhost:{port}" if ssl_context else f"{scheme}://127.0.0.1:{port}"
        nursery.cancel_scope.cancel()


async def read_request(stream: trio.abc.Stream, buffer: bytearray) -> bytes | None:
    """One request's head and Content-Length body from ``stream`` (``None`` at EOF)."""
    while b"\r\n\r\n" not in buffer:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return None
        buffer += chunk
    end = buffer.index(b"\r\n\r\n") + 4
    head = bytes(buffer[:end])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(buffer) < end + length:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return None
        buffer += chunk
    request = bytes(buffer[: end + length])
    del buffer[: end + length]
    return request


def answer_each_with(*answers: bytes) -> Handler:
    """Answer the requests of every connection with ``answers``, in turn, then wait for EOF."""

    async def handler(stream: trio.abc.Stream, number: int) -> None:
        buffer = bytearray()
        for answer in answers:
            if await read_request(stream, buffer) is None:
                return
            await stream.send_all(answer)
        await read_request(stream, buffer)

    return handler


NO_CONTENT = b"HTTP/1.1 204 No Content\r\n\r\n"


def push_body(*lines: str) -> bytes:
    entries = [PushEntry(1_700_000_000_000_000_000 + i, line) for i, line in enumerate(lines)]
    return compress_snappy(encode_push_request([PushStream({"job": "t"}, entries)]))


PROTOBUF = {"Content-Type": "application/x-protobuf", "User-Agent": "LogStack-test"}


# ----------------------------------------------------------------------------- with the stand-in


async def test_pushes_reuse_one_connection(rx: LokiReceiver) -> None:
    transport = Http11Transport(4)
    try:
        for i in range(5):
            answer = await transport.post(
                f"{rx.url}/loki/api/v1/push", push_body(f"l{i}"), PROTOBUF
            )
            assert answer.status == 204 and answer.text == ""
        ready = await transport.get(f"{rx.url}/ready")
        assert (ready.status, ready.text.strip()) == (200, "ready")
    finally:
        await transport.aclose()
    assert rx.lines() == [f"l{i}" for i in range(5)]
    assert transport.connections_opened == 1
    assert rx.received_headers["content-type"] == "application/x-protobuf"
    assert rx.received_headers["user-agent"] == "LogStack-test"


async def test_refused_push_text_is_loki_s(rx: LokiReceiver) -> None:
    transport = Http11Transport(4)
    try:
        rx.fail_next(503, count=1)
        answer = await transport.post(f"{rx.url}/loki/api/v1/push", push_body("x"), PROTOBUF)
        again = await transport.post(f"{rx.url}/loki/api/v1/push", push_body("x"), PROTOBUF)
    finally:
        await transport.aclose()
    assert (answer.status, answer.text) == (503, "simulated failure: 503\n")
    assert again.status == 204
    assert transport.connections_opened == 1


# ----------------------------------------------------------------------------- scripted answers


async def test_retry_after_and_text() -> None:
    answer_bytes = (
        b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 3\r\nContent-Length: 5\r\n\r\nslow!"
    )
    async with scripted_server(answer_each_with(answer_bytes)) as url:
        transport = Http11Transport(2)
        answer = await transport.post(url + "/loki/api/v1/push", b"body", PROTOBUF)
        await transport.aclose()
    assert (answer.status, answer.text, answer.retry_after_s) == (429, "slow!", 3.0)


async def test_http_date_retry_after_is_honoured() -> None:
    """RFC 9110 allows an HTTP-date; it used to be ignored (the backoff applied)."""
    later = email.utils.formatdate(time.time() + 30, usegmt=True).encode()
    answer_bytes = (
        b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: %s\r\nContent-Length: 0\r\n\r\n" % later
    )
    async with scripted_server(answer_each_with(answer_bytes)) as url:
        transport = Http11Transport(2)
        answer = await transport.post(url + "/p", b"x", PROTOBUF)
        await transport.aclose()
    assert answer.status == 503
    assert answer.retry_after_s is not None and 25 <= answer.retry_after_s <= 31


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("120", 120.0),
        ("Fri, 27 Nov 2026 12:00:30 GMT", 30.0),
        ("Fri, 27 Nov 2026 11:00:00 GMT", 0.0),  # in the past: now
        ("soon", None),
        ("", None),
    ],
)
def test_retry_after_values(value: str, seconds: float | None) -> None:
    now = datetime.datetime(2026, 11, 27, 12, 0, tzinfo=datetime.UTC).timestamp()
    assert _retry_after(value, now=now) == seconds


@pytest.mark.parametrize("charset", ["undefined", "base64", "zlib", "rot13", "idna"])
async def test_an_answer_in_a_charset_that_gives_no_text_is_read_as_utf8(charset: str) -> None:
    """``LookupError``/``UnicodeError`` escaped the transport: the forwarder took the
    answer for a local failure and sent the push again, forever (32 times in 15 s)."""
    body = "refusé".encode()
    answer_bytes = (
        b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=%s\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (charset.encode(), len(body), body)
    )
    async with scripted_server(answer_each_with(answer_bytes)) as url:
        transport = Http11Transport(2)
        answer = await transport.post(url + "/loki/api/v1/push", b"x", PROTOBUF)
        await transport.aclose()
    assert (answer.status, answer.text) == (400, "refusé")


@pytest.mark.parametrize("close", ["reset", "fin"])
async def test_an_answer_sent_before_the_body_was_read_is_the_answer(close: str) -> None:
    """A proxy answers 413 to a body over its limit without reading it, then closes: the
    failed write was retried as a network error for good; the 413 is the answer."""

    async def refuse_unread(stream: trio.abc.Stream, number: int) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            head += await stream.receive_some(65536)
        await stream.send_all(
            b"HTTP/1.1 413 Payload Too Large\r\nConnection: close\r\n"
            b"Content-Length: 8\r\n\r\ntoo big!"
        )
        if close == "fin":
            assert isinstance(stream, trio.SocketStream)
            await stream.send_eof()
            await trio.sleep(0.2)
        # Closed with the body unread: the kernel resets the connection.

    async with scripted_server(refuse_unread) as url:
        transport = Http11Transport(2)
        answer = await transport.post(url + "/loki/api/v1/push", b"x" * (16 << 20), PROTOBUF)
        await transport.aclose()
    assert (answer.status, answer.text) == (413, "too big!")


async def test_chunked_answer_is_joined_and_connection_kept() -> None:
    chunked = (
        b"HTTP/1.1 400 Bad Request\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n\r\n"
        b"6\r\nentry \r\n9\r\nrefused\xc3\xa9\r\n0\r\n\r\n"
    )
    async with scripted_server(answer_each_with(chunked, NO_CONTENT)) as url:
        transport = Http11Transport(2)
        first = await transport.post(url + "/p", b"x", PROTOBUF)
        second = await transport.post(url + "/p", b"y", PROTOBUF)
        await transport.aclose()
    assert (first.status, first.text) == (400, "entry refusedé")
    assert second.status == 204
    assert transport.connections_opened == 1


async def test_close_delimited_answer_is_read_to_the_end() -> None:
    async def handler(stream: trio.abc.Stream, number: int) -> None:
        await read_request(stream, bytearray())
        await stream.send_all(
            b"HTTP/1.1 500 Internal Server Error\r\nConnection: close\r\n\r\noops"
        )

    async with scripted_server(handler) as url:
        transport = Http11Transport(2)
        first = await transport.post(url + "/p", b"x", PROTOBUF)
        second = await transport.post(url + "/p", b"x", PROTOBUF)
        await transport.aclose()
    assert (first.status, first.text) == (500, "oops")
    assert second.status == 500
    assert transport.connections_opened == 2  # the server closed the first: not reused


async def test_long_answer_is_cut_and_connection_stays_usable() -> None:
    text = b"e" * (MAX_ANSWER_CHARS * 5)
    long_answer = b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\n\r\n%b" % (len(text), text)
    async with scripted_server(answer_each_with(long_answer, NO_CONTENT)) as url:
        transport = Http11Transport(2)
        first = await transport.post(url + "/p", b"x", PROTOBUF)
        second = await transport.post(url + "/p", b"x", PROTOBUF)
        await transport.aclose()
    assert first.status == 400 and first.text == "e" * MAX_ANSWER_CHARS
    assert second.status == 204 and transport.connections_opened == 1


async def test_request_line_host_and_body() -> None:
    seen: list[bytes] = []

    async def handler(stream: trio.abc.Stream, number: int) -> None:
        request = await read_request(stream, bytearray())
        assert request is not None
        seen.append(request)
        await stream.send_all(NO_CONTENT)

    async with scripted_server(handler) as url:
        transport = Http11Transport(2)
        await transport.post(url + "/gateway/loki/api/v1/push?tenant=a", b"\x00body", PROTOBUF)
        await transport.aclose()
    port = url.rsplit(":", 1)[1]
    head, _, body = seen[0].partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /gateway/loki/api/v1/push?tenant=a HTTP/1.1"
    assert f"host: 127.0.0.1:{port}".encode() in [line.lower() for line in lines]
    assert b"content-length: 5" in [line.lower() for line in lines]
    assert body == b"\x00body"


def test_targets() -> None:
    assert parse_target("http://loki:3100/loki/api/v1/push").host_header == b"loki:3100"
    assert parse_target("http://loki/ready").host_header == b"loki"
    assert parse_target("https://loki:443/ready").host_header == b"loki"
    six = parse_target("http://[::1]:3100/ready")
    assert (six.host, six.port, six.host_header) == ("::1", 3100, b"[::1]:3100")
    assert parse_target("http://loki:3100").path == b"/"
    for bad in ("ftp://loki/x", "loki:3100/x", "http:///x"):
        with pytest.raises(ValueError, match="not an http"):
            parse_target(bad)


# ----------------------------------------------------------------------------- failures


async def test_idle_connection_closed_by_the_server_is_replaced() -> None:
    async def handler(stream: trio.abc.Stream, number: int) -> None:
        await read_request(stream, bytearray())
        await stream.send_all(NO_CONTENT)  # then close: an idle timeout, as Loki's has

    async with scripted_server(handler) as url:
        transport = Http11Transport(2)
        assert (await transport.post(url + "/p", b"x", PROTOBUF)).status == 204
        await trio.sleep(0.05)  # the close reaches the client while the connection is idle
        assert (await transport.post(url + "/p", b"x", PROTOBUF)).status == 204
        await transport.aclose()
    assert transport.connections_opened == 2


async def test_connections_past_descriptor_1024_are_reused(rx: LokiReceiver) -> None:
    """The idle check must not depend on ``select``'s 1024-descriptor limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1400:
        if hard != resource.RLIM_INFINITY and hard < 1400:
            pytest.skip(f"needs 1400 open files; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (1400, hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        transport = Http11Transport(2)
        for i in range(3):
            answer = await transport.post(
                f"{rx.url}/loki/api/v1/push", push_body(f"l{i}"), PROTOBUF
            )
            assert answer.status == 204
        await transport.aclose()
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert transport.connections_opened == 1


async def test_reused_connection_dropped_unanswered_is_retried_once() -> None:
    async def handler(stream: trio.abc.Stream, number: int) -> None:
        buffer = bytearray()
        await read_request(stream, buffer)
        await stream.send_all(NO_CONTENT)
        if number == 0:  # the second request on it is read, then the connection dropped
            await read_request(stream, buffer)
            return
        while await read_request(stream, buffer) is not None:
            await stream.send_all(NO_CONTENT)

    async with scripted_server(handler) as url:
        transport = Http11Transport(2)
        assert (await transport.post(url + "/p", b"1", PROTOBUF)).status == 204
        assert (await transport.post(url + "/p", b"2", PROTOBUF)).status == 204
        await transport.aclose()
    assert transport.connections_opened == 2


async def test_new_connection_dropped_unanswered_is_an_error() -> None:
    async def handler(stream: trio.abc.Stream, number: int) -> None:
        await read_request(stream, bytearray())

    async with scripted_server(handler) as url:
        transport = Http11Transport(2)
        with pytest.raises(LokiTransportError, match=r"^RemoteProtocolError: server disconnected"):
            await transport.post(url + "/p", b"x", PROTOBUF)
        await transport.aclose()
    assert transport.connections_opened == 1  # not retried: it was not an idle connection


async def test_answer_cut_short_is_an_error() -> None:
    async def handler(stream: trio.abc.Stream, number: int) -> None:
        await read_request(stream, bytearray())
        await stream.send_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 100\r\n\r\nonly")

    async with scripted_server(handler) as url:
        transport = Http11Transport(2)
        with pytest.raises(LokiTransportError, match=r"^RemoteProtocolError"):
            await transport.post(url + "/p", b"x", PROTOBUF)
        await transport.aclose()


async def test_not_http_is_an_error() -> None:
    async with scripted_server(answer_each_with(b"HELLO THERE\r\n\r\n")) as url:
        transport = Http11Transport(2)
        with pytest.raises(LokiTransportError, match=r"^RemoteProtocolError"):
            await transport.post(url + "/p", b"x", PROTOBUF)
        await transport.aclose()


async def test_connection_refused_is_a_connect_error() -> None:
    with trio.socket.socket() as sock:  # a port nobody listens on
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    transport = Http11Transport(2)
    with pytest.raises(LokiTransportError, match=r"^ConnectError: ") as refused:
        await transport.get(f"http://127.0.0.1:{port}/ready")
    await transport.aclose()
    assert "ConnectionRefusedError" in str(refused.value)
    assert "ExceptionGroup" not in str(refused.value)


async def test_timeout_mid_request_drops_the_connection() -> None:
    async def handler(stream: trio.abc.Stream, number: int) -> None:
        buffer = bytearray()
        if number == 0:
            await read_request(stream, buffer)
            await trio.sleep_forever()  # never answers
        while await read_request(stream, buffer) is not None:
            await stream.send_all(NO_CONTENT)

    async with scripted_server(handler) as url:
        transport = Http11Transport(2)
        with pytest.raises(trio.TooSlowError):
            with trio.fail_after(0.2):
                await transport.post(url + "/p", b"x", PROTOBUF)
        assert (await transport.post(url + "/p", b"x", PROTOBUF)).status == 204
        await transport.aclose()
    assert transport.connections_opened == 2


async def test_unsupported_url_and_closed_transport() -> None:
    transport = Http11Transport(2)
    with pytest.raises(LokiTransportError, match=r"^UnsupportedProtocol: "):
        await transport.get("ftp://loki/ready")
    await transport.aclose()
    with pytest.raises(LokiTransportError, match="transport closed"):
        await transport.get("http://127.0.0.1:1/ready")


async def test_header_that_http_cannot_carry_is_refused_before_sending(rx: LokiReceiver) -> None:
    transport = Http11Transport(2)
    url = f"{rx.url}/loki/api/v1/push"
    for tenant in ("caf\u00e9\u2603", "a\r\nX-Evil: 1"):
        with pytest.raises(LokiTransportError, match=r"^LocalProtocolError: "):
            await transport.post(url, push_body("x"), {**PROTOBUF, "X-Scope-OrgID": tenant})
    assert (await transport.post(url, push_body("x"), PROTOBUF)).status == 204
    await transport.aclose()
    assert rx.pushes == 1


async def test_idle_connections_are_bounded() -> None:
    async with scripted_server(answer_each_with(*[NO_CONTENT] * 10)) as url:
        transport = Http11Transport(1)
        answers: list[int] = []

        async def post() -> None:
            answers.append((await transport.post(url + "/p", b"x", PROTOBUF)).status)

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(post)
        assert answers == [204, 204, 204] and transport.connections_opened == 3
        assert "idle=1" in repr(transport)
        await transport.aclose()
        assert "idle=0" in repr(transport)


# ----------------------------------------------------------------------------- TLS


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


async def test_https_with_a_trusted_certificate(ca: trustme.CA) -> None:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    async with scripted_server(answer_each_with(NO_CONTENT, NO_CONTENT), server_context) as url:
        assert url.startswith("https://localhost:")
        transport = Http11Transport(2, ssl_context=client_context)
        assert (await transport.post(url + "/p", b"x", PROTOBUF)).status == 204
        assert (await transport.post(url + "/p", b"y", PROTOBUF)).status == 204
        await transport.aclose()
    assert transport.connections_opened == 1


async def test_https_with_an_unknown_certificate_is_refused(ca: trustme.CA) -> None:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)
    async with scripted_server(answer_each_with(NO_CONTENT), server_context) as url:
        transport = Http11Transport(2)  # the default trust store: it does not know this CA
        with pytest.raises(LokiTransportError, match=r"^ConnectError: .*CERTIFICATE_VERIFY_FAILED"):
            await transport.post(url + "/p", b"x", PROTOBUF)
        await transport.aclose()
