"""Hypercorn's server with LogStack's connection glue (``logstack._http_server``): each of its
changes, and the behaviour of Hypercorn's kept, through real sockets on loopback."""

from __future__ import annotations

import math
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import h11
import pytest
import trio
import trio.testing
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import wrap_app

from logstack import _http_server
from logstack._http_server import (
    ACCEPT_BATCH,
    DROP_BODY_LIMIT,
    LeanH11Protocol,
    LeanTaskGroup,
    LeanTCPServer,
    Linger,
    _accept_backlog,
    serve,
)
from logstack.testing._http1 import Http1Client as Client

Scope = dict[str, Any]

arrived: dict[str, trio.Event] = {}
"""Events ``echo_app`` sets when a request for their path has reached it."""


async def echo_app(scope: Scope, receive: Any, send: Any) -> None:
    """Answers 202 with the request's body; ``/slow`` waits 0.8 s first, ``/hang`` 30 s;
    ``/empty`` answers 204; ``/stream`` sends its body in two parts. ``/refuse`` answers 403
    without reading the body (a refusal on the headers), ``/refuse-late`` 0.3 s later."""
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["path"] in ("/refuse", "/refuse-late"):
        if scope["path"] == "/refuse-late":
            await trio.sleep(0.3)
        headers = [(b"content-length", b"7")]
        await send({"type": "http.response.start", "status": 403, "headers": headers})
        await send({"type": "http.response.body", "body": b"refused"})
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    path = scope["path"]
    if path in arrived:
        arrived[path].set()
    if path == "/slow":
        await trio.sleep(0.8)
    if path == "/hang":
        await trio.sleep(30)
    if path == "/empty":
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    if path == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"part1", "more_body": True})
        await send({"type": "http.response.body", "body": b"part2"})
        return
    headers = [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 202, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@asynccontextmanager
async def running(
    keep_alive_timeout: float = 5.0,
    graceful_timeout: float = 5.0,
    max_connections: int | None = None,
) -> AsyncIterator[tuple[int, trio.Event]]:
    """``serve`` on 127.0.0.1 with a free port: yields the port and the event that stops it."""
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.keep_alive_timeout = keep_alive_timeout
    config.graceful_timeout = graceful_timeout
    config.accesslog = None
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            partial(
                serve,
                echo_app,
                config,
                shutdown_trigger=stop.wait,
                max_connections=max_connections,
            )
        )
        yield int(binds[0].rsplit(":", 1)[1]), stop
        stop.set()


def watcher_tasks() -> int:
    """How many connection watchers (``LeanTCPServer._watch_idle``) are alive."""
    count = 0
    nurseries = list(trio.lowlevel.current_root_task().child_nurseries)
    while nurseries:
        for task in nurseries.pop().child_tasks:
            count += task.name.endswith("_watch_idle")
            nurseries.extend(task.child_nurseries)
    return count


async def test_answers_many_requests_on_one_connection() -> None:
    async with running() as (port, _):
        client = await Client.connect(port)
        for n in range(5):
            assert await client.post("/", b"entry %d" % n) == (202, b"entry %d" % n)
        assert await client.post("/stream", b"") == (200, b"part1part2")
        assert await client.post("/empty", b"") == (204, b"")
        await client.stream.aclose()


async def test_a_connection_busy_longer_than_the_keep_alive_timeout_stays_open() -> None:
    """The deadline moves with each request: never idle 0.6 s, the connection lives on."""
    async with running(keep_alive_timeout=0.6) as (port, _):
        client = await Client.connect(port)
        for _ in range(4):  # 0.8 s in all, idle 0.2 s at a time
            assert await client.post("/", b"x") == (202, b"x")
            await trio.sleep(0.2)
        assert await client.post("/slow", b"y") == (202, b"y")  # busy 0.8 s: not idle
        assert await client.post("/", b"z") == (202, b"z")
        await client.stream.aclose()


async def test_an_idle_connection_is_closed_after_the_keep_alive_timeout() -> None:
    async with running(keep_alive_timeout=0.3) as (port, _):
        fresh = await Client.connect(port)  # no request at all
        used = await Client.connect(port)
        assert await used.post("/", b"x") == (202, b"x")
        start = trio.current_time()
        assert await used.closed_by_server(within=3)
        assert 0.25 <= trio.current_time() - start < 2
        assert await fresh.closed_by_server(within=3)


async def send_head_slowly(client: Client, every_s: float) -> None:
    """A one-byte POST's head, four bytes at a time (a slowloris client): 18 writes."""
    request = h11.Request(
        method="POST",
        target="/",
        headers=[("host", "t"), ("content-length", "1"), ("x-padding", "0123456789")],
    )
    head = client.h11.send(request)
    assert head is not None
    for start in range(0, len(head), 4):
        await client.stream.send_all(head[start : start + 4])
        await trio.sleep(every_s)


async def test_a_head_that_arrives_too_slowly_is_cut_at_the_header_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before, a head sent a byte at a time held its connection for the keep-alive timeout
    (75 s in the service), however long it took: ~4,100 such clients held every slot."""
    monkeypatch.setattr(_http_server, "HEADER_TIMEOUT_S", 0.4)
    async with running(keep_alive_timeout=30) as (port, _):
        client = await Client.connect(port)
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_head_slowly, client, 0.05)  # ~0.9 s in all
            assert await client.closed_by_server(within=5)
            nursery.cancel_scope.cancel()
        assert 0.35 <= trio.current_time() - start < 0.8


async def test_the_header_timeout_runs_per_request_from_its_first_byte(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An idle connection waits the keep-alive timeout, not the header timeout; a slow head
    within the header timeout is served, and the next request gets the whole timeout
    again."""
    monkeypatch.setattr(_http_server, "HEADER_TIMEOUT_S", 0.6)
    async with running(keep_alive_timeout=30) as (port, _):
        client = await Client.connect(port)
        assert await client.post("/", b"first") == (202, b"first")
        await trio.sleep(0.7)  # idle past the header timeout: no head has begun
        for _ in range(3):
            await send_head_slowly(client, 0.02)  # ~0.4 s each time, ~1.2 s in all
            await client.send_body(b"x")
            assert await client.read_answer() == (202, b"x")
        await client.stream.aclose()


async def test_a_new_connection_that_sends_nothing_gets_the_header_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Silent connections counted as idle and were closed at the keep-alive timeout only:
    ~55 new ones a second per worker held every ``max_connections`` slot (an audit)."""
    monkeypatch.setattr(_http_server, "HEADER_TIMEOUT_S", 0.4)
    async with running(keep_alive_timeout=30) as (port, _):
        silent = await Client.connect(port)
        start = trio.current_time()
        assert await silent.closed_by_server(within=5)
        assert 0.35 <= trio.current_time() - start < 1.5
        prompt = await Client.connect(port)  # one that sends in time is served as before
        assert await prompt.post("/", b"x") == (202, b"x")
        await prompt.stream.aclose()


async def test_a_body_dropped_after_an_early_answer_is_not_cut_by_the_header_timeout(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_http_server, "HEADER_TIMEOUT_S", 0.2)
    async with running(keep_alive_timeout=30) as (port, _):
        client = await Client.connect(port)
        await client.send_head("/refuse", 10)
        assert await client.read_answer() == (403, b"refused")
        for _ in range(5):  # 0.5 s of body, dropped as it comes
            await client.send_body(b"xx", end=False)
            await trio.sleep(0.1)
        await client.send_body(b"", end=True)
        # Then idle, as long as the keep-alive timeout allows: the bytes that ended the
        # dropped body were once taken for the start of a head, and the connection was
        # closed at the header timeout (an audit: at 20 s after every early 429).
        await trio.sleep(0.6)
        assert await client.post("/", b"next") == (202, b"next")
        await client.stream.aclose()


async def test_a_connection_the_client_closes_leaves_no_task_behind() -> None:
    """Hypercorn's idle task outlived such a connection until its keep-alive timeout."""
    async with running(keep_alive_timeout=60) as (port, _):
        client = await Client.connect(port)
        assert await client.post("/", b"x") == (202, b"x")
        assert watcher_tasks() == 1
        await client.stream.aclose()
        with trio.fail_after(2):
            while watcher_tasks():
                await trio.sleep(0.01)


async def test_stopping_closes_idle_connections_and_answers_the_request_in_progress() -> None:
    async with running(graceful_timeout=10) as (port, stop):
        idle = await Client.connect(port)
        assert await idle.post("/", b"x") == (202, b"x")
        busy = await Client.connect(port)
        reached = arrived["/slow"] = trio.Event()
        await busy.send_request("/slow", b"in progress")
        with trio.fail_after(5):
            await reached.wait()  # the request has reached the app
        del arrived["/slow"]
        start = trio.current_time()
        stop.set()
        assert await idle.closed_by_server(within=2)
        status, body, headers = await busy.read_answer_with_head()
        assert (status, body) == (202, b"in progress")
        # It says so: a client that reused the connection had its next request dropped.
        assert headers[b"connection"] == b"close"
        assert await busy.closed_by_server(within=2)
        assert trio.current_time() - start < 2  # not the graceful timeout


async def test_a_request_cut_by_the_graceful_timeout_gets_no_answer() -> None:
    """As with Hypercorn: the connection closes unanswered (no 500 written while cancelled)."""
    async with running(graceful_timeout=0.2) as (port, stop):
        client = await Client.connect(port)
        await client.send_request("/hang", b"x")
        await trio.sleep(0.1)
        stop.set()
        with trio.fail_after(3):
            assert await client.stream.receive_some(65536) == b""


async def test_an_answer_before_the_body_leaves_the_connection_to_the_next_request() -> None:
    """The answer to a refusal on the headers comes before the body. Hypercorn closed the
    connection then, though its answer had not said so: the client's next request was
    dropped unanswered. The rest of the body is now read and dropped."""
    async with running() as (port, _):
        client = await Client.connect(port)
        for path in ("/refuse", "/refuse-late"):
            await client.send_head(path, 5000)
            if path == "/refuse-late":
                await client.send_body(b"x" * 1000, end=False)  # part of it before the answer
            status, body, headers = await client.read_answer_with_head()
            assert (status, body) == (403, b"refused")
            assert b"connection" not in headers
            await client.send_body(b"x" * (5000 if path == "/refuse" else 4000))
            assert await client.post("/", b"next") == (202, b"next")
        await client.send_head("/refuse", None)  # chunked: its end is known when it comes
        assert await client.read_answer() == (403, b"refused")
        await client.send_body(b"y" * 3000)
        assert await client.post("/", b"next") == (202, b"next")
        await client.stream.aclose()


async def test_an_answer_before_a_body_too_long_to_drop_says_the_connection_closes() -> None:
    """And the body still coming is read and dropped after the answer, not met with a reset:
    the client, still sending, reads the whole answer and then the connection's end."""
    async with running() as (port, _):
        client = await Client.connect(port)
        await client.send_head("/refuse", 20_000_000)
        with trio.fail_after(10):
            await client.send_body(b"x" * 5_000_000, end=False)  # past the socket buffers
            status, body, headers = await client.read_answer_with_head()
            assert (status, body, headers[b"connection"]) == (403, b"refused", b"close")
            assert await client.closed_by_server(within=2)


async def test_a_chunked_body_past_the_drop_limit_ends_the_connection_without_a_reset() -> None:
    async with running() as (port, _):
        client = await Client.connect(port)
        await client.send_head("/refuse", None)
        assert await client.read_answer() == (403, b"refused")
        with trio.fail_after(10):
            for _ in range(2 * DROP_BODY_LIMIT // 65536):  # the limit, passed
                await client.send_body(b"z" * 65536, end=False)
            assert await client.closed_by_server(within=2)


async def test_a_lingering_connection_closes_after_the_linger_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client that neither ends its body nor closes is not waited for past ``LINGER_S``."""
    monkeypatch.setattr("logstack._http_server.LINGER_S", 0.3)
    async with running(keep_alive_timeout=60) as (port, _):
        client = await Client.connect(port)
        await client.send_head("/refuse", DROP_BODY_LIMIT + 1)
        assert await client.read_answer() == (403, b"refused")
        assert watcher_tasks() == 1
        start = trio.current_time()
        with trio.fail_after(3):
            while watcher_tasks():
                await trio.sleep(0.01)
        assert trio.current_time() - start >= 0.2
        await client.stream.aclose()


async def test_a_body_that_stops_coming_is_waited_for_the_keep_alive_timeout() -> None:
    async with running(keep_alive_timeout=0.3) as (port, _):
        client = await Client.connect(port)
        await client.send_head("/refuse", 5000)
        assert await client.read_answer() == (403, b"refused")
        await client.send_body(b"x" * 100, end=False)
        start = trio.current_time()
        assert await client.closed_by_server(within=3)
        assert 0.25 <= trio.current_time() - start < 2


async def test_an_app_that_answers_without_reading_a_large_body_leaves_nothing_behind() -> None:
    """The body fills the app's queue before the answer. Hypercorn's reader then waited for
    room that never came, and the app's last ``send`` for the reader: the connection stayed
    open, unread, after the client had gone."""
    async with running(keep_alive_timeout=60) as (port, _):
        client = await Client.connect(port)
        with trio.fail_after(5):
            await client.send_head("/refuse-late", 900_000)
            await client.send_body(b"x" * 900_000)  # in the app's queue and socket buffers
            assert await client.read_answer() == (403, b"refused")
            assert await client.post("/", b"next") == (202, b"next")
        await client.stream.aclose()
        with trio.fail_after(2):
            while watcher_tasks():
                await trio.sleep(0.01)


def echo_protocol(task_group: LeanTaskGroup, send: Any) -> LeanH11Protocol:
    """A ``LeanH11Protocol`` serving ``echo_app`` that hands what it sends to ``send``."""
    config = Config()
    return LeanH11Protocol(
        wrap_app(echo_app, config.wsgi_max_body_size, "asgi"),
        config,
        WorkerContext(None),
        task_group,
        ConnectionState({}),
        False,
        ("127.0.0.1", 1),
        ("127.0.0.1", 2),
        send,
    )


async def run_protocol(requests: bytes) -> list[Event]:
    """``requests`` fed to a ``LeanH11Protocol`` serving ``echo_app``: what it sent, until the
    connection is idle again (or closed)."""
    sent: list[Event] = []
    done = trio.Event()

    async def record(event: Event) -> None:
        sent.append(event)
        if not isinstance(event, RawData):
            done.set()

    async with LeanTaskGroup() as task_group:
        protocol = echo_protocol(task_group, record)
        with trio.fail_after(5):
            await protocol.handle(RawData(data=requests))
            while not any(isinstance(e, Updated) and e.idle for e in sent):
                await done.wait()
                done = trio.Event()
    return sent


def writes(sent: list[Event]) -> list[bytes]:
    return [event.data for event in sent if isinstance(event, RawData)]


async def test_an_answer_with_a_length_leaves_in_one_write() -> None:
    """Hypercorn wrote the head, the body and an empty end of message apart."""
    request = b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\n\r\nhello"
    [answer] = writes(await run_protocol(request))
    assert answer.startswith(b"HTTP/1.1 202 ")
    assert answer.endswith(b"\r\n\r\nhello")


async def test_an_answer_without_a_body_leaves_in_one_write() -> None:
    request = b"POST /empty HTTP/1.1\r\nhost: t\r\ncontent-length: 0\r\n\r\n"
    [answer] = writes(await run_protocol(request))
    assert answer.startswith(b"HTTP/1.1 204 ")
    assert answer.endswith(b"\r\n\r\n")


async def test_a_streamed_answer_sends_its_head_with_the_first_part() -> None:
    request = b"POST /stream HTTP/1.1\r\nhost: t\r\ncontent-length: 0\r\n\r\n"
    first, second, end = writes(await run_protocol(request))
    assert first.startswith(b"HTTP/1.1 200 ")
    assert b"transfer-encoding: chunked" in first.lower()
    assert first.endswith(b"\r\n\r\n5\r\npart1\r\n")
    assert (second, end) == (b"5\r\npart2\r\n", b"0\r\n\r\n")


@asynccontextmanager
async def echo_connection() -> AsyncIterator[tuple[LeanH11Protocol, list[Event]]]:
    """A ``LeanH11Protocol`` serving ``echo_app``, and the list of what it has sent."""
    sent: list[Event] = []

    async def record(event: Event) -> None:
        sent.append(event)

    async with LeanTaskGroup() as task_group:
        yield echo_protocol(task_group, record), sent


async def until(condition: Any) -> None:
    with trio.fail_after(5):
        while not condition():
            await trio.sleep(0.01)


async def test_100_continue_is_sent_when_the_app_reads_the_body() -> None:
    """The client waits for the interim answer before it sends the body; it comes when the
    app first asks for the body (here at once), not before."""
    head = b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\nexpect: 100-continue\r\n\r\n"
    async with echo_connection() as (protocol, sent):
        await protocol.handle(RawData(data=head))
        await until(lambda: writes(sent))
        assert writes(sent)[0].startswith(b"HTTP/1.1 100 ")
        await protocol.handle(RawData(data=b"ok"))
        await until(lambda: len(writes(sent)) >= 2)
    assert writes(sent)[1].endswith(b"\r\n\r\nok")
    assert len(writes(sent)) == 2


async def test_a_refusal_on_the_headers_is_the_answer_to_100_continue() -> None:
    """An app that answers without reading the body: no 100, the final answer says the
    connection closes (the client may or may not send the body it held back), and it
    ends without waiting for a body that is not coming."""
    head = (
        b"POST /refuse HTTP/1.1\r\nhost: t\r\ncontent-length: 5000000\r\n"
        b"expect: 100-continue\r\n\r\n"
    )
    async with echo_connection() as (protocol, sent):
        await protocol.handle(RawData(data=head))
        await until(lambda: any(isinstance(e, Linger | Closed) for e in sent))
    [answer] = writes(sent)
    assert answer.startswith(b"HTTP/1.1 403 ")
    assert b"connection: close\r\n" in answer.lower()
    assert b" 100 " not in answer


async def test_a_client_that_sends_its_body_without_waiting_gets_no_100() -> None:
    """curl stops waiting after a second; a body already arriving needs no 100."""
    request = b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 2\r\nexpect: 100-continue\r\n\r\nok"
    [answer] = writes(await run_protocol(request))
    assert answer.startswith(b"HTTP/1.1 202 ")
    assert b"connection: close" not in answer.lower()
    assert answer.endswith(b"\r\n\r\nok")


async def test_a_full_app_queue_holds_the_connection_back() -> None:
    """Body events go in without a checkpoint while the app's queue has room; once it is
    full, the connection waits for the app, as with Hypercorn's awaiting send."""
    config = Config()
    config.max_app_queue_size = 2
    received: list[Any] = []
    reading = trio.Event()

    async def slow_reader(scope: Scope, receive: Any, send: Any) -> None:
        await reading.wait()
        while len(received) < 5:
            received.append(await receive())

    async def discard(message: Any) -> None:
        pass

    async with LeanTaskGroup() as task_group:
        put = await task_group.spawn_app(
            wrap_app(slow_reader, config.wsgi_max_body_size, "asgi"), config, {}, discard
        )
        put_done = 0
        async with trio.open_nursery() as nursery:

            async def put_five() -> None:
                nonlocal put_done
                for n in range(5):
                    await put({"type": "http.request", "body": b"%d" % n, "more_body": n < 4})
                    put_done += 1

            nursery.start_soon(put_five)
            await trio.testing.wait_all_tasks_blocked()
            assert put_done == 2  # the queue's size: the third put waits for the app
            reading.set()
    assert [m["body"] for m in received] == [b"0", b"1", b"2", b"3", b"4"]


async def test_writes_from_two_tasks_do_not_interleave() -> None:
    """The send lock, when another write holds it, is waited for (HTTP/2's streams write
    from several tasks)."""
    left, right = trio.socket.socketpair()
    payloads = [b"a" * 3_000_000, b"b" * 3_000_000]
    server = LeanTCPServer(
        wrap_app(echo_app, 1, "asgi"), Config(), WorkerContext(None), {}, trio.SocketStream(left)
    )
    received = bytearray()

    async def read_all() -> None:
        while len(received) < 6_000_000:
            received.extend(await right.recv(1 << 20))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all)
        for payload in payloads:
            nursery.start_soon(server.protocol_send, RawData(data=payload))
    assert received in (
        bytearray(b"a" * 3_000_000 + b"b" * 3_000_000),
        bytearray(b"b" * 3_000_000 + b"a" * 3_000_000),
    )
    left.close()
    right.close()


@pytest.mark.parametrize("idle", [True, False])
async def test_updated_moves_the_keep_alive_deadline(idle: bool) -> None:
    left, right = trio.socket.socketpair()
    config = Config()
    config.keep_alive_timeout = 30
    server = LeanTCPServer(
        wrap_app(echo_app, 1, "asgi"), config, WorkerContext(None), {}, trio.SocketStream(left)
    )
    await server.protocol_send(Updated(idle=idle))
    deadline = server._idle_scope.deadline
    if idle:
        assert 29 < deadline - trio.current_time() <= 30
    else:
        assert deadline == math.inf
    left.close()
    right.close()


async def test_a_client_that_stops_reading_loses_its_connection(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The answer's write is shielded (a half-written answer breaks the connection); with
    no deadline, a client that stopped reading held it, and a stopping server, for good."""
    monkeypatch.setattr("logstack._http_server.SEND_TIMEOUT_S", 0.5)
    body = b"x" * (16 << 20)  # echoed back: far more than the socket buffers hold
    async with running() as (port, _):
        client = await Client.connect(port)
        with trio.fail_after(20):
            await client.send_head("/echo", len(body))
            await client.send_body(body)
            await trio.sleep(1.5)  # the server's write waits for us, then gives up
            received = 0
            try:
                while chunk := await client.stream.receive_some(1 << 20):
                    received += len(chunk)
            except trio.BrokenResourceError:
                pass  # a reset: the server closed with our unread data
        assert received < len(body)  # the connection ended before the answer did
        await client.stream.aclose()


async def test_past_max_connections_a_connection_waits_in_the_backlog() -> None:
    """Nothing bounded how many connections were served at once (10,000 idle ones held
    ~150 MiB); past the bound they now wait, unaccepted, until one ends."""
    async with running(max_connections=2) as (port, _):
        first, second = await Client.connect(port), await Client.connect(port)
        for client in (first, second):
            assert await client.post("/x", b"a") == (202, b"a")
        third = await Client.connect(port)  # the kernel completes it; we do not accept
        await third.send_request("/x", b"c")
        with trio.move_on_after(0.5) as waited:
            await third.read_answer()
        assert waited.cancelled_caught  # not served while two connections are open
        await first.stream.aclose()
        with trio.fail_after(5):
            assert await third.read_answer() == (202, b"c")
        for client in (second, third):
            await client.stream.aclose()


async def test_the_backlog_is_taken_at_once_up_to_the_free_slots() -> None:
    """One connection per pass of a busy event loop was accepted (~94/s in a reconnect
    storm, a new connection's /healthz waiting seconds): after each accept, the rest of the
    kernel's backlog is taken in the same step, as long as slots are free."""
    listening = socket.socket()
    listening.bind(("127.0.0.1", 0))
    listening.listen(128)
    listening.setblocking(False)
    clients = [socket.create_connection(listening.getsockname()) for _ in range(5)]
    handled: list[Any] = []

    async def handler(stream: Any) -> None:
        handled.append(stream)
        await trio.sleep_forever()

    try:
        slots = trio.Semaphore(3)
        async with trio.open_nursery() as nursery:
            _accept_backlog(listening, handler, nursery, slots)
            await trio.testing.wait_all_tasks_blocked()
            assert len(handled) == 3 and slots.value == 0  # no more than the free slots
            slots.release()
            slots.release()
            slots.release()
            _accept_backlog(listening, handler, nursery, slots)
            await trio.testing.wait_all_tasks_blocked()
            assert len(handled) == 5 and slots.value == 1  # and then what is left
            _accept_backlog(listening, handler, nursery, slots)  # an empty backlog
            assert slots.value == 1
            nursery.cancel_scope.cancel()
    finally:
        for client in clients:
            client.close()
        listening.close()
    assert ACCEPT_BATCH >= 16
