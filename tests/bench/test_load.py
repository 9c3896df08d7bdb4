"""The load generator against small HTTP servers of known behaviour, on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio

from logstack.bench._load import LoadResult, TargetUnreachable, run_load

OK = b"HTTP/1.1 202 Accepted\r\nContent-Length: 2\r\n\r\nok"

Handler = Callable[[trio.SocketStream], Awaitable[None]]


@asynccontextmanager
async def serving(handler: Handler) -> AsyncIterator[str]:
    """A loopback server running ``handler`` per connection; yields its URL."""
    async with trio.open_nursery() as nursery:
        [listener] = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
        port = listener.socket.getsockname()[1]
        yield f"http://127.0.0.1:{port}/v1/logs:ingest"
        nursery.cancel_scope.cancel()


def answering(delay_s: float, *, close_after: int | None = None) -> Handler:
    """Answers every request (one per read of a whole request) after ``delay_s``."""

    async def handle(stream: trio.SocketStream) -> None:
        buffer = b""
        answered = 0
        async with stream:
            while True:
                while b"\r\n\r\n" not in buffer or not buffer.endswith(b"x"):
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buffer += data
                buffer = b""
                await trio.sleep(delay_s)
                await stream.send_all(OK)
                answered += 1
                if close_after is not None and answered >= close_after:
                    return  # without a word: the client finds out on its next request

    return handle


async def load(url: str, **kwargs: object) -> LoadResult:
    options: dict[str, object] = {
        "lines_per_request": 1,
        "headers": {},
        "connections": 2,
        "duration_s": 1.0,
    }
    options.update(kwargs)
    return await run_load(url, lambda n: b"x", **options)  # type: ignore[arg-type]


async def test_open_loop_keeps_the_rate_when_the_server_is_slow() -> None:
    """Two connections and 200 ms per answer would cap a closed loop at 10/s; the
    schedule (50/s) opens connections instead, and latency counts from the schedule."""
    async with serving(answering(0.2)) as url:
        result = await load(url, rate_per_s=50.0, duration_s=1.0)
    assert result.scheduled == 50
    assert result.requests == 50 and result.accepted_requests == 50
    assert result.connections_opened >= 8
    assert min(result.latencies_s) >= 0.2
    assert result.transport_errors == result.timeouts == result.unsent == 0


async def test_open_loop_counts_what_it_could_not_send_in_time() -> None:
    async with serving(answering(0.3)) as url:
        result = await load(
            url, rate_per_s=40.0, duration_s=0.5, max_connections=2, request_timeout_s=0.4
        )
    assert result.scheduled == 20
    assert result.unsent > 0
    assert result.requests + result.unsent + result.timeouts == 20


async def test_a_broken_connection_is_counted_and_replaced() -> None:
    async with serving(answering(0.0, close_after=3)) as url:
        result = await load(url, connections=1, duration_s=0.5)
    assert result.transport_errors > 0
    assert result.connections_opened > 1
    assert result.accepted_requests >= 3 * (result.connections_opened - 1)


async def test_a_target_that_never_answers_ends_with_the_timeout() -> None:
    async def silent(stream: trio.SocketStream) -> None:
        async with stream:
            await trio.sleep_forever()

    async with serving(silent) as url:
        with trio.fail_after(5):
            result = await load(url, connections=3, duration_s=0.2, request_timeout_s=0.5)
    assert result.timeouts >= 3 and result.requests == 0
    assert result.duration_s < 2


async def test_nothing_listening_is_one_clear_error() -> None:
    async with serving(answering(0.0)) as url:
        pass  # the port is free again
    with pytest.raises(TargetUnreachable, match="no connection could be opened"):
        await load(url, duration_s=0.3)


async def test_the_query_string_is_kept() -> None:
    seen: list[bytes] = []

    async def record(stream: trio.SocketStream) -> None:
        async with stream:
            seen.append(await stream.receive_some(65536))
            await stream.send_all(OK)

    async with serving(record) as url:
        await load(url + "?tenant=a", connections=1, duration_s=0.05)
    assert seen and seen[0].startswith(b"POST /v1/logs:ingest?tenant=a HTTP/1.1\r\n")


async def test_an_answer_before_the_whole_body_counts_as_that_answer() -> None:
    """A refusal on the headers (a 413 and a close, the rest of the body unread) is the
    server's answer, not a broken connection."""
    refusal = b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"

    async def refuse(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some(1024)
            await stream.send_all(refusal)
            # A lingering close, as LogStack's: closed with the body unread, the socket
            # would answer the client's data with a reset, which can discard the 413
            # before the client reads it.
            await stream.send_eof()
            with trio.move_on_after(5):
                while await stream.receive_some(65536):
                    pass

    async with serving(refuse) as url:
        result = await run_load(
            url,
            lambda n: b"x" * (8 << 20),  # far more than the socket buffers hold
            lines_per_request=1,
            headers={},
            connections=1,
            duration_s=0.3,
        )
    assert result.statuses[413] >= 1
    assert result.requests == result.statuses[413]
    # One connection each (the answer closes it); the last one may have been opened as
    # the run ended, when no request starts any more.
    answered = result.requests + result.transport_errors
    assert answered <= result.connections_opened <= answered + 1


async def test_a_large_body_is_written_whole_to_a_slow_reader() -> None:
    size = 4 << 20
    received: list[int] = []

    async def slow(stream: trio.SocketStream) -> None:
        async with stream:
            buffer = bytearray()
            while True:
                while (end := buffer.find(b"\r\n\r\n")) < 0:
                    buffer += await stream.receive_some(65536)
                while len(buffer) < end + 4 + size:
                    await trio.sleep(0.001)
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    buffer += data
                received.append(len(buffer) - end - 4)
                del buffer[: end + 4 + size]
                await stream.send_all(OK)

    async with serving(slow) as url:
        result = await run_load(
            url,
            lambda n: b"y" * size,
            lines_per_request=1,
            headers={},
            connections=1,
            duration_s=0.2,
        )
    assert result.accepted_requests >= 1 and result.transport_errors == 0
    assert received[: result.accepted_requests] == [size] * result.accepted_requests


async def test_the_closed_loop_backs_off_after_429_and_503() -> None:
    busy = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"

    async def refuse(stream: trio.SocketStream) -> None:
        async with stream:
            while data := await stream.receive_some(65536):
                if data.endswith(b"x"):
                    await stream.send_all(busy)

    async with serving(refuse) as url:
        result = await load(url, connections=1, duration_s=0.5)
    # One connection pausing BACKOFF_S (50 ms) after each: about ten, not thousands.
    assert 5 <= result.statuses[503] <= 11
    assert result.accepted_requests == 0 and result.transport_errors == 0


async def test_an_idle_connection_closed_by_the_server_is_no_error() -> None:
    """A keep-alive connection the server closes between requests loses nothing."""

    async def one_then_close(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some(65536)
            await stream.send_all(OK)
            # and close at once, idle: the next request goes on a new connection

    async with serving(one_then_close) as url:
        result = await load(url, rate_per_s=20.0, duration_s=0.5, connections=1)
    assert result.scheduled == 10 and result.accepted_requests == 10
    assert result.transport_errors == 0 and result.unsent == 0


async def test_a_cancelled_run_stops_and_closes_its_connections() -> None:
    opened: list[trio.Event] = []

    async def answer_until_closed(stream: trio.SocketStream) -> None:
        closed = trio.Event()
        opened.append(closed)
        try:
            async with stream:
                while data := await stream.receive_some(65536):
                    if data.endswith(b"x"):
                        await trio.sleep(0.01)
                        await stream.send_all(OK)
        except trio.BrokenResourceError:
            pass  # closed with an answer unread: a reset, which is a close too
        closed.set()

    async with serving(answer_until_closed) as url:
        with trio.move_on_after(0.3):
            await load(url, duration_s=30.0, connections=3)
        # The thread sees its stop within MAX_WAIT_S and closes every connection.
        with trio.fail_after(2):
            for closed in opened:
                await closed.wait()
    assert len(opened) == 3
