"""Hypercorn's trio server, with fewer event-loop steps per keep-alive request.

The HTTP protocol stays Hypercorn's and h11's (parsing, ASGI events, ``HTTPStream``, h2,
lifespan, graceful shutdown). What changes is the glue around one connection, where
Hypercorn 0.18 spends, per request, scheduler steps that an answer of a few hundred bytes
does not need (the "Hypercorn's connection glue" row of ``docs/performance.md``):

- **The keep-alive timer.** Hypercorn stops its idle task when a request arrives and starts
  a new one (``nursery.start``: a task, its start-up handshake, a lock) when the answer is
  done. Here one watcher task per connection waits in a cancel scope whose deadline moves
  instead: ``inf`` while a request is in progress, ``now + keep_alive_timeout`` when idle.
- **Three writes per answer.** The head, the body, and an empty end-of-message write for a
  ``Content-Length`` answer each took the send lock and made a socket send, each a
  checkpoint. Here a final answer's head waits for its first body bytes (or its end) and
  leaves with them, nothing is sent for empty data, and an uncontended send lock is taken
  without a checkpoint.
- **The app's queue.** Body events and the app's ``receive()`` went through a memory
  channel's awaiting ``send``/``receive``, a checkpoint each even when the message is
  ready. Here they use ``send_nowait``/``receive_nowait`` and wait only when they must
  (a full queue still holds the connection back, as before).

- **An answer sent before the request's body is all in** (a refusal: wrong media type,
  unknown token, too large). Hypercorn then closes the connection, though the answer did
  not say ``Connection: close``; a client that sends its next request on it in the
  meantime sees it dropped unanswered. Here the rest of the body, up to
  ``DROP_BODY_LIMIT`` bytes within the keep-alive timeout, is read and dropped and the
  connection serves the next request. An answer to a body declared longer than that says
  ``Connection: close``. Such a connection, or one whose body passes the limit, is not
  closed at once with the body still coming (the client's TCP stack would get a reset, and
  may drop the answer unread): it is half-closed, what still comes is dropped for up to
  ``LINGER_S``, then it closes (a "lingering close", as nginx and Apache do).
- **A head that takes too long.** Hypercorn counts a connection idle until a whole
  request head is in, so a head sent a byte at a time, or a new connection that sends
  nothing, was cut only by the keep-alive timeout. Here a head has ``HEADER_TIMEOUT_S``
  from its first byte, and a new connection's first one from the accept.
- **A closed request's queue.** Once the request is over, body events no longer wait for
  room in the app's queue: an app that answered without reading a large body left
  Hypercorn's reader and its own last ``send`` waiting on each other, and the connection
  open for good.

Dropping those checkpoints is safe for the same reason it is cheap: each of the calls
either finishes at once or falls back to the awaiting call, and the loops around them end
when the received data does (h11's ``NEED_DATA``, the body's last message). Cancellation
is kept as it was: each of them starts with ``checkpoint_if_cancelled`` (free unless
cancelled), so a request cut after the graceful timeout still writes nothing more, as
before (rather than, say, Hypercorn's 500 for an app that never answered).

``serve`` is ``hypercorn.trio.serve`` with ``LeanTCPServer`` in place of Hypercorn's
``TCPServer``, without the parts LogStack does not use (QUIC, statsd, ``max_requests``).
The classes lean on Hypercorn's internals, so ``pyproject.toml`` pins Hypercorn's minor
version and ``tests/core/test_http_server.py`` checks each change and the behaviour kept.
"""

from __future__ import annotations

import errno
import logging
import math
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Final

import h11
import trio
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol import ProtocolWrapper
from hypercorn.protocol.events import Body, EndBody
from hypercorn.protocol.h11 import STREAM_ID, H11Protocol
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.task_group import TaskGroup, _handle
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ASGIFramework, ConnectionState, LifespanState
from hypercorn.utils import (
    ShutdownError,
    parse_socket_addr,
    raise_shutdown,
    repr_socket_addr,
    wrap_app,
)
from trio.lowlevel import checkpoint_if_cancelled

__all__ = ["DROP_BODY_LIMIT", "HEADER_TIMEOUT_S", "LINGER_S", "LeanTCPServer", "serve"]

log = logging.getLogger("logstack.http")

DROP_BODY_LIMIT: Final = 1 << 20
"""The most of a request body the server reads and drops, after answering before it was all
in, to keep the connection for the client's next request. Reconnecting costs less than
reading more (a round trip, a TLS handshake)."""
LINGER_S: Final = 5.0
"""How long a connection closed with a request body still coming keeps reading (and
dropping) it after its answer, so the client reads the answer before the connection ends."""
HEADER_TIMEOUT_S: Final = 20.0
"""Longest a request's head (request line and headers) may take to arrive, from its first
byte. Without it a client sending its headers a byte at a time held its connection until the
keep-alive timeout (75 s), idle as far as the server could tell: an audit held every
``max_connections`` slot that way (slowloris) with ~4,100 connections. Apache's
``RequestReadTimeout`` allows 20-40 s for headers; a body has its own timeout (408)."""
SEND_TIMEOUT_S: Final = 30.0
"""Longest wait for a client to take an answer's bytes. The write is shielded from the
request's cancellation (a half-written answer would break the connection), so without it
a client that stops reading would hold its connection, and a stopping server, for good."""


@dataclass(frozen=True)
class Linger(Event):
    """From the protocol: the answer is out, the connection is to end while the client may
    still be sending. Half-close it and close it after ``LINGER_S`` or the client's end."""


class LeanTaskGroup(TaskGroup):
    """Hypercorn's per-connection task group; the app's queue without needless checkpoints."""

    on_first_receive: Callable[[], Awaitable[None]] | None = None
    """Called (once) when the next app spawned first asks for the request's body."""

    async def spawn_app(self, app: Any, config: Config, scope: Any, send: Any) -> Any:
        put_channel, get_channel = trio.open_memory_channel[Any](config.max_app_queue_size)
        first_receive, self.on_first_receive = self.on_first_receive, None
        put_nowait = put_channel.send_nowait
        put_waiting = put_channel.send
        get_nowait = get_channel.receive_nowait
        get_waiting = get_channel.receive

        async def put(message: Any) -> None:
            await checkpoint_if_cancelled()  # cancelled, it raises as the awaiting call did
            if message["type"] == "http.disconnect":
                # The request is over: the app reads what is queued, then "http.disconnect"
                # for good, and nothing waits for room any more (a body event blocked
                # here is dropped, as Hypercorn drops those that arrive later).
                put_channel.close()
                return
            try:
                try:
                    put_nowait(message)
                except trio.WouldBlock:  # the app is behind by a whole queue: wait for it
                    await put_waiting(message)
            except trio.ClosedResourceError:
                pass  # the request ended meanwhile

        async def receive() -> Any:
            nonlocal first_receive
            if first_receive is not None:
                hook, first_receive = first_receive, None
                await hook()
            await checkpoint_if_cancelled()
            try:
                try:
                    return get_nowait()
                except trio.WouldBlock:
                    return await get_waiting()
            except trio.EndOfChannel:  # the request is over, its queue read
                return {"type": "http.disconnect"}

        assert self._nursery is not None
        self._nursery.start_soon(
            _handle,
            app,
            config,
            scope,
            receive,
            send,
            trio.to_thread.run_sync,
            trio.from_thread.run,
        )
        return put


class LeanH11Protocol(H11Protocol):
    """Hypercorn's HTTP/1.1 protocol; a final answer's head leaves with its first bytes, and
    the rest of a body the answer came before is dropped rather than closing on it.

    ``Expect: 100-continue`` is answered ``100 Continue`` when the app first asks for the
    body, not as soon as the head is in (Hypercorn's way): a request refused on its headers
    (a bad token, the rate limit, a body too large or that cannot fit) gets its final
    answer instead, with ``Connection: close``, and the client never sends the body it
    held back (RFC 9110, section 10.1.1).
    """

    _held_head = b""
    _request_headers: Sequence[tuple[bytes, bytes]] = ()
    _dropping = False
    """The answer is sent; the rest of the request's body is read and dropped."""
    _dropped = 0
    _lingering = False
    """The connection is half-closed: whatever still arrives is dropped unread."""

    async def handle(self, event: Event) -> None:
        if self._lingering and type(event) is RawData:
            return
        await super().handle(event)

    async def _create_stream(self, request: h11.Request) -> None:
        self._request_headers = request.headers  # read only if the answer beats the body
        if self.connection.they_are_waiting_for_100_continue and isinstance(
            self.task_group, LeanTaskGroup
        ):
            self.task_group.on_first_receive = self._send_continue
        await super()._create_stream(request)

    async def _send_continue(self) -> None:
        if self.connection.they_are_waiting_for_100_continue:  # no answer, no body yet
            await self._send_h11_event(
                h11.InformationalResponse(
                    status_code=100, headers=self.config.response_headers("h11")
                )
            )

    def _body_too_long_to_drop(self) -> bool:
        for name, value in self._request_headers:
            if name == b"content-length":
                return int(value) > DROP_BODY_LIMIT  # h11 has checked it is digits
        return False  # chunked: dropped until it ends or passes the limit

    async def _send_h11_event(self, event: Any) -> None:
        if type(event) is h11.Response and (
            self.context.terminated.is_set()
            or self.connection.they_are_waiting_for_100_continue
            or (self.connection.their_state is h11.SEND_BODY and self._body_too_long_to_drop())
        ):
            # The server is stopping (the connection ends after this answer: a client that
            # reused it got its next request dropped unanswered), the client holds its body
            # back for a 100 it will not get (it may send it or not: the stream cannot be
            # read on), or the answer came before a body too long to drop: say the
            # connection closes after this answer (h11 then ends it; ``_maybe_recycle``).
            headers = [*event.headers.raw_items(), (b"connection", b"close")]
            event = h11.Response(status_code=event.status_code, headers=headers)
        try:
            data = self.connection.send(event)
        except h11.LocalProtocolError:
            if self.connection.their_state != h11.ERROR:
                raise
            return
        if type(event) is h11.Response:  # a final head (1xx are InformationalResponse)
            self._held_head = data
            return
        if self._held_head:
            data = self._held_head + data
            self._held_head = b""
        if data:
            await self.send(RawData(data=data))
        else:
            await checkpoint_if_cancelled()  # as the empty write's lock and send did

    async def _handle_events(self) -> None:
        """Hypercorn 0.18's loop, less its ``100 Continue`` sent before each event."""
        if self._dropping and not await self._drop_body():
            return
        while True:
            try:
                event = self.connection.next_event()
            except h11.RemoteProtocolError as error:
                if self.connection.our_state in {h11.IDLE, h11.SEND_RESPONSE}:
                    await self._send_error_response(error.error_status_hint)
                await self.send(Closed())
                break
            if isinstance(event, h11.Request):
                await self.send(Updated(idle=False))
                await self._check_protocol(event)
                await self._create_stream(event)
            elif event is h11.PAUSED:
                await self.can_read.clear()
                await self.can_read.wait()
            elif (
                isinstance(event, h11.ConnectionClosed)
                or event is h11.NEED_DATA
                or self.stream is None
            ):
                break
            elif isinstance(event, h11.Data):
                await self.stream.handle(Body(stream_id=STREAM_ID, data=event.data))
            elif isinstance(event, h11.EndOfMessage):
                await self.stream.handle(EndBody(stream_id=STREAM_ID))

    async def _maybe_recycle(self) -> None:
        connection = self.connection
        if connection.their_state is h11.SEND_BODY and not self.context.terminated.is_set():
            if connection.our_state is h11.MUST_CLOSE:  # said "Connection: close"
                await self._close_stream()
                await self._linger()
                return
            if connection.our_state is h11.DONE:
                await self._start_dropping()
                return
        await super()._maybe_recycle()  # next request, or close

    async def _start_dropping(self) -> None:
        # The answer is out, the request's body is not all in: drop the rest of it, within
        # the keep-alive timeout (the connection counts as idle meanwhile), then recycle.
        await self._close_stream()
        self._dropping = True
        self._dropped = 0
        await self.can_read.set()
        await self.send(Updated(idle=True))
        await self._drop_body()

    async def _drop_body(self) -> bool:
        """Drop the body events h11 holds; ``True`` once the body has ended and the
        connection is ready for the next request, ``False`` if more data is needed or the
        connection was closed (malformed, or more than ``DROP_BODY_LIMIT`` bytes)."""
        connection = self.connection
        while connection.their_state is h11.SEND_BODY:
            try:
                event = connection.next_event()
            except h11.RemoteProtocolError:
                event = None
            if event is h11.NEED_DATA:
                return False
            if type(event) is h11.Data:
                self._dropped += len(event.data)
                if self._dropped <= DROP_BODY_LIMIT:
                    continue
                await self._linger()  # past the limit: end it, gently
                return False
            if type(event) is h11.EndOfMessage:
                continue
            self._dropping = False
            await self.send(Closed())  # malformed
            return False
        self._dropping = False
        await super()._maybe_recycle()
        return True

    async def _linger(self) -> None:
        self._dropping = False
        self._lingering = True
        await self.send(Linger())


class LeanTCPServer(TCPServer):
    """One connection: Hypercorn's ``TCPServer`` with a moving keep-alive deadline and
    fewer checkpoints per write."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._busy = False
        self._head_arriving = False
        """A request's head has begun to arrive on the idle connection (``HEADER_TIMEOUT_S``
        is running)."""
        self._ended = False
        self._became_idle: trio.Event | None = None
        self._idle_scope = trio.CancelScope(deadline=math.inf)

    async def run(self) -> None:
        # Hypercorn's TCPServer.run, with the watcher for its idle task and the lean
        # protocol and task group.
        try:
            try:
                with trio.fail_after(self.config.ssl_handshake_timeout):
                    await self.stream.do_handshake()
            except (trio.BrokenResourceError, trio.TooSlowError):
                return  # the handshake failed
            alpn_protocol = self.stream.selected_alpn_protocol()
            socket = self.stream.transport_stream.socket
            ssl = True
        except AttributeError:  # not TLS
            alpn_protocol = "http/1.1"
            socket = self.stream.socket
            ssl = False

        try:
            client = parse_socket_addr(socket.family, socket.getpeername())
            server = parse_socket_addr(socket.family, socket.getsockname())
            async with LeanTaskGroup() as task_group:
                self._task_group = task_group
                # What Hypercorn's protocols are made with; ProtocolWrapper also takes ALPN.
                parts = (
                    self.app,
                    self.config,
                    self.context,
                    task_group,
                    ConnectionState(self.state),
                    ssl,
                    client,
                    server,
                    self.protocol_send,
                )
                self.protocol = ProtocolWrapper(*parts, alpn_protocol)
                if type(self.protocol.protocol) is H11Protocol:
                    self.protocol.protocol = LeanH11Protocol(*parts)
                await self.protocol.initiate()
                # A new connection's first request has HEADER_TIMEOUT_S too, from the accept
                # (nginx's client_header_timeout): silent connections held their slots for the
                # whole keep-alive timeout, and ~55 new ones a second filled max_connections.
                self._head_arriving = True
                self._idle_scope.deadline = trio.current_time() + min(
                    HEADER_TIMEOUT_S, self.config.keep_alive_timeout
                )
                assert task_group._nursery is not None
                task_group._nursery.start_soon(self._watch_idle)
                try:
                    await self._read_requests()
                finally:
                    self._ended = True  # the connection is over: so is its watcher
                    self._idle_scope.cancel()
        except OSError:
            pass
        finally:
            await self._close()

    async def _read_requests(self) -> None:
        """Hypercorn's ``_read_data``, starting ``HEADER_TIMEOUT_S`` when an idle HTTP/1.1
        connection holds part of a request's head: bytes that did not make a whole request
        (h11 would have begun one, making the connection busy) and wait in h11's buffer."""
        read_timeout = self.config.read_timeout or math.inf
        handle = self.protocol.handle
        while True:
            try:
                with trio.fail_after(read_timeout):
                    data = await self.stream.receive_some(MAX_RECV)
            except (trio.ClosedResourceError, trio.BrokenResourceError, trio.TooSlowError):
                break
            await handle(RawData(bytes(data)))
            if data == b"":
                break
            if not self._busy and not self._head_arriving:
                protocol = self.protocol.protocol
                if (
                    type(protocol) is LeanH11Protocol
                    and not protocol._lingering
                    and protocol.connection.their_state is h11.IDLE
                    and protocol.connection.trailing_data[0]
                ):
                    # h11 holds part of the next request: its head has begun. (Bytes that
                    # ended a body dropped after an early answer leave nothing: the
                    # connection is idle and keeps its keep-alive timeout.)
                    self._head_arriving = True
                    head_deadline = trio.current_time() + HEADER_TIMEOUT_S
                    self._idle_scope.deadline = min(self._idle_scope.deadline, head_deadline)
        await handle(Closed())

    async def protocol_send(self, event: Event) -> None:
        if not isinstance(event, Closed):
            # Cancelled (a request cut after the graceful timeout), nothing more is written
            # or changed, as when Hypercorn's locks here were checkpoints.
            await checkpoint_if_cancelled()
        if isinstance(event, RawData):
            lock = self.send_lock
            if lock.locked():
                await lock.acquire()
            else:
                lock.acquire_nowait()  # uncontended (the usual case): no checkpoint
            try:
                try:
                    with trio.CancelScope(shield=True) as sending:
                        sending.deadline = trio.current_time() + SEND_TIMEOUT_S
                        await self.stream.send_all(event.data)
                    gone = sending.cancelled_caught  # the client stopped reading
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    gone = True
                if gone:
                    # Close the socket too: the kernel still holds what the client sent,
                    # and requests pipelined there would otherwise be read and served
                    # (written to the WAL) for minutes, answered to nobody.
                    await self._close()
                    await self.protocol.handle(Closed())
            finally:
                lock.release()
        elif isinstance(event, Closed):
            await self._close()
            await self.protocol.handle(Closed())
        elif isinstance(event, Linger):
            await self._half_close()
        elif isinstance(event, Updated):
            self._busy = not event.idle
            self._head_arriving = False
            if event.idle:
                self._idle_scope.deadline = trio.current_time() + self.config.keep_alive_timeout
                if self._became_idle is not None:
                    self._became_idle.set()
            else:
                self._idle_scope.deadline = math.inf

    async def _half_close(self) -> None:
        """Stop sending (the client sees the answer, then the end), keep reading until the
        client ends too or ``LINGER_S`` pass; the protocol drops what is read meanwhile."""
        try:
            async with self.send_lock:
                with trio.CancelScope(shield=True):
                    await self.stream.send_eof()
        except (AttributeError, trio.BrokenResourceError, trio.ClosedResourceError):
            # TLS has no half-close (``SSLStream``), or the client is gone: close now.
            await self._close()
            await self.protocol.handle(Closed())
            return
        self._busy = False
        self._idle_scope.deadline = trio.current_time() + LINGER_S
        if self._became_idle is not None:
            self._became_idle.set()

    async def _watch_idle(self) -> None:
        """Close the connection once idle past the keep-alive timeout, or idle while the
        server stops (a request in progress is answered first, as in Hypercorn)."""
        with self._idle_scope:
            await self.context.terminated.wait()
            while self._busy:
                self._became_idle = trio.Event()
                await self._became_idle.wait()
        if self._ended:
            return
        with trio.CancelScope(shield=True):
            await self._initiate_server_close()


async def serve(
    app: ASGIFramework,
    config: Config,
    *,
    shutdown_trigger: Callable[[], Awaitable[Any]],
    max_connections: int | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """``hypercorn.trio.serve`` for an ASGI app, its connections served by ``LeanTCPServer``.

    Hands the URLs it listens on to ``task_status``; returns after ``shutdown_trigger``
    returns and the requests in progress are answered (within ``config.graceful_timeout``).
    """
    wrapped = wrap_app(app, config.wsgi_max_body_size, "asgi")
    lifespan_state: LifespanState = {}
    lifespan = Lifespan(wrapped, config, lifespan_state)
    context = WorkerContext(None)

    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()

        async with trio.open_nursery() as server_nursery:
            sockets = config.create_sockets()
            ssl_context = config.create_ssl_context()
            listeners: list[trio.SSLListener[trio.SocketStream] | trio.SocketListener] = []
            binds = []
            for sock in sockets.secure_sockets:
                assert ssl_context is not None  # secure sockets exist only with TLS settings
                sock.listen(config.backlog)
                listeners.append(
                    trio.SSLListener(
                        trio.SocketListener(trio.socket.from_stdlib_socket(sock)),
                        ssl_context,
                        https_compatible=True,
                    )
                )
                binds.append(f"https://{repr_socket_addr(sock.family, sock.getsockname())}")
            plain_sockets: dict[int, socket.socket] = {}
            for sock in sockets.insecure_sockets:
                sock.listen(config.backlog)
                listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
                plain_sockets[id(listeners[-1])] = sock
                binds.append(f"http://{repr_socket_addr(sock.family, sock.getsockname())}")
            for bind in binds:
                await config.log.info(f"Running on {bind} (CTRL + C to quit)")

            task_status.started(binds)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(raise_shutdown, shutdown_trigger)
                    nursery.start_soon(raise_shutdown, context.terminate.wait)
                    handler = partial(
                        LeanTCPServer,
                        wrapped,
                        config,
                        context,
                        ConnectionState(lifespan_state.copy()),
                    )
                    if max_connections is None:
                        nursery.start_soon(
                            partial(
                                trio.serve_listeners,
                                handler,
                                listeners,
                                handler_nursery=server_nursery,
                            )
                        )
                    else:
                        slots = trio.Semaphore(max_connections)
                        for listener in listeners:
                            nursery.start_soon(
                                _serve_listener,
                                listener,
                                handler,
                                server_nursery,
                                slots,
                                plain_sockets.get(id(listener)),
                            )
                    await trio.sleep_forever()
            except BaseExceptionGroup as error:
                _, other_errors = error.split((ShutdownError, KeyboardInterrupt))
                if other_errors is not None:
                    raise other_errors from None  # the rest, as Hypercorn raises it
            finally:
                await context.terminated.set()
                server_nursery.cancel_scope.deadline = trio.current_time() + config.graceful_timeout

        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()


_ACCEPT_CAPACITY_ERRNOS: Final = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
)
"""``accept`` errors that say the system is out of something: wait and try again, as
``trio.serve_listeners`` does."""


ACCEPT_BATCH: Final = 64
"""Connections taken from the kernel's backlog per turn of the accept loop."""


async def _serve_listener(
    listener: trio.SocketListener | trio.SSLListener[trio.SocketStream],
    handler: Callable[[Any], Awaitable[Any]],
    handler_nursery: trio.Nursery,
    slots: trio.Semaphore,
    plain_socket: socket.socket | None = None,
) -> None:
    """``trio.serve_listeners`` for one listener, with a connection accepted only while a
    slot is free: past ``server.max_connections`` new connections wait in the kernel's
    backlog, costing no memory here, until one ends.

    Each ``accept`` of trio's listener is a scheduling point, so a busy server took one new
    connection per pass of its event loop over every other task: ~94 a second during a
    reconnect storm of 800 clients, a ``/healthz`` on a new connection waiting up to 8 s.
    After each one, the rest of the backlog (``plain_socket``, the listener's own socket,
    non-blocking) is taken at once, up to ``ACCEPT_BATCH``."""
    async with listener:
        while True:
            await slots.acquire()
            try:
                stream = await listener.accept()
            except OSError as exc:
                slots.release()
                if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                    raise
                log.error("accept failed (%s); retrying in 0.1 s", errno.errorcode[exc.errno])
                await trio.sleep(0.1)
                continue
            except BaseException:
                slots.release()
                raise
            handler_nursery.start_soon(_run_connection, stream, handler, slots)
            if plain_socket is not None:
                _accept_backlog(plain_socket, handler, handler_nursery, slots)


def _accept_backlog(
    sock: socket.socket,
    handler: Callable[[Any], Awaitable[Any]],
    handler_nursery: trio.Nursery,
    slots: trio.Semaphore,
) -> None:
    """Take what waits in ``sock``'s backlog without yielding (see ``_serve_listener``);
    any error is left to the next ``accept`` of trio's listener, which knows them all."""
    for _ in range(ACCEPT_BATCH):
        try:
            slots.acquire_nowait()
        except trio.WouldBlock:
            return
        try:
            conn, _ = sock.accept()
        except OSError:  # BlockingIOError: the backlog is empty
            slots.release()
            return
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(conn))
        handler_nursery.start_soon(_run_connection, stream, handler, slots)


async def _run_connection(
    stream: Any, handler: Callable[[Any], Awaitable[Any]], slots: trio.Semaphore
) -> None:
    try:
        await handler(stream)
    finally:
        slots.release()
        await trio.aclose_forcefully(stream)
