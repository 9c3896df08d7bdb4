"""A lean HTTP/1.1 load generator: keep-alive connections, pre-built requests, one epoll loop.

On a 2-core machine the load generator shares the cores with the server it measures, so
what it costs per request is taken from the server. httpx costs a few hundred microseconds
per request, as much as the server under test; trio streams (one task per connection, a
scheduler pass and a cancel scope per request) cost ~200-230 µs of CPU per request here.
This loop (non-blocking sockets, one ``select.epoll`` in a thread of its own, the request
bytes pre-encoded, only the status line and ``Content-Length`` of an answer read) costs
~55-80 µs, wrk's way (docs/performance.md, the change table).

Two ways to drive load:

* **closed loop** (no rate): ``connections`` connections, each sending its next request
  when the answer to the last one arrives; latency is from the request's write to its
  answer. A ``429`` or ``503`` makes that connection pause ``BACKOFF_S`` (honest
  backpressure is honoured, not hammered).
* **open loop** (``rate_per_s``): requests are scheduled at that rate whatever the server
  does, handed to an idle connection, or to a new one while fewer than ``max_connections``
  are open (wrk2's and vegeta's way: a slow server must not slow the offered load down).
  Latency counts from the request's *scheduled* time, so time spent waiting for a free
  connection is counted too (no coordinated omission). A request that could not even be
  sent within ``request_timeout_s`` of its time is counted ``unsent``.

Every request has ``request_timeout_s`` to be answered (``timeouts``); a broken connection
is counted (``transport_errors``) and replaced, so one failure does not silently end a
connection's share of the run. No request starts after ``duration_s``.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import itertools
import math
import os
import select
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import trio

BodyFactory = Callable[[int], bytes]
"""Returns the body of request number ``n`` (unique per request, so no dedup anywhere)."""

RECONNECT_PAUSE_S = 0.05
"""Pause before a new connection replaces one that could not be opened (no busy loop on
a dead target)."""

BACKOFF_S = 0.05
"""Closed loop: a connection's pause after a ``429`` or ``503``."""

PROGRESS_EVERY_S = 1.0
MAX_WAIT_S = 0.1
"""Longest the loop sleeps in ``epoll``: how soon it sees a stop request."""

CHECK_EVERY_S = 0.005
"""How often the loop looks for requests past their timeout, and for the end of the run."""

_READ_SIZE = 65536


class TargetUnreachable(Exception):
    """Not one connection could be opened to the target."""


@dataclass
class LoadResult:
    duration_s: float = 0.0
    requests: int = 0
    """Requests answered (any status)."""
    accepted_requests: int = 0
    accepted_lines: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)
    """Latency of every 2xx answer (closed loop: request written → answer read; open
    loop: scheduled → answer read)."""
    transport_errors: int = 0
    """Connections that could not be opened or broke before an answer."""
    timeouts: int = 0
    """Requests not answered within the request timeout."""
    scheduled: int = 0
    """Open loop: requests the schedule called for."""
    unsent: int = 0
    """Open loop: requests that found no connection within the request timeout."""
    connections_opened: int = 0
    ack_ns: dict[int, int] = field(default_factory=dict)
    """Wall-clock time each accepted request (by number) got its answer."""

    def percentile(self, q: float) -> float:
        if not self.latencies_s:
            return math.nan
        ordered = sorted(self.latencies_s)
        index = min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))
        return ordered[index]

    @property
    def count_4xx(self) -> int:
        return sum(n for s, n in self.statuses.items() if 400 <= s < 500)

    @property
    def count_5xx(self) -> int:
        return sum(n for s, n in self.statuses.items() if s >= 500)


def build_request(host: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    head = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def parse_response_head(head: bytes) -> tuple[int, int, bool]:
    """An answer's status, ``Content-Length`` (0 if none) and whether it keeps the
    connection open; ``head`` is everything before the blank line."""
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length = 0
    keep = True
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value.strip())
        elif name == "connection" and value.strip().lower() == "close":
            keep = False
    return status, length, keep


class _Connection:
    """One socket and the request on it: bytes still to write, the answer read so far."""

    __slots__ = (
        "connected",
        "deadline",
        "fd",
        "head",
        "inbox",
        "n",
        "out",
        "sent",
        "since",
        "sock",
        "watching_writes",
    )

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.connected = False
        self.watching_writes = True  # registered for EPOLLOUT until connected
        self.out = memoryview(b"")
        self.sent = 0
        self.inbox = bytearray()
        self.head: tuple[int, int, bool] | None = None
        """The answer's status, its size with the head, and whether it keeps the
        connection, once its head is read."""
        self.n = -1
        """The request in flight (-1: none)."""
        self.since = 0.0
        self.deadline = math.inf


class _Slot:
    """A connection's place in the run. At any time it is *ready* (in ``_Generator.ready``:
    no request, no ticket), *busy* (connecting, or a request in flight) or *paused*
    (in ``_Generator.paused`` until its time)."""

    __slots__ = ("conn", "ticket")

    def __init__(self) -> None:
        self.conn: _Connection | None = None
        self.ticket: tuple[int, float] | None = None
        """Open loop: the request (number, scheduled time) waiting for the connection."""

    @property
    def busy(self) -> bool:
        conn = self.conn
        return self.ticket is not None or (conn is not None and (not conn.connected or conn.n >= 0))


class _Generator:
    def __init__(
        self,
        host: str,
        port: int,
        path: str,
        body_for: BodyFactory,
        *,
        lines_per_request: int,
        headers: dict[str, str],
        connections: int,
        duration_s: float,
        rate_per_s: float | None,
        max_connections: int,
        request_timeout_s: float,
        on_progress: Callable[[LoadResult, float], None] | None,
    ) -> None:
        self.host, self.port, self.path = host, port, path
        self.body_for = body_for
        self.lines = lines_per_request
        self.headers = headers
        self.rate = rate_per_s
        self.max_connections = max_connections
        self.timeout_s = request_timeout_s
        self.on_progress = on_progress
        self.duration_s = duration_s
        self.result = LoadResult()
        self.last_error: BaseException | None = None
        self.stop = threading.Event()
        self.epoll = select.epoll()
        self.by_fd: dict[int, tuple[_Slot, _Connection]] = {}
        count = min(connections, max_connections) if rate_per_s else connections
        self.slots = [_Slot() for _ in range(count)]
        self.ready: deque[_Slot] = deque(self.slots)
        self.paused: list[tuple[float, int, _Slot]] = []
        """A heap: (until, tie-breaker, slot)."""
        self.pauses = itertools.count()
        self.tickets: deque[tuple[int, float]] = deque()
        self.counter = 0
        self.addresses: list[tuple[int, Any]] = []
        self.started = self.deadline = 0.0

    # -- the run ---------------------------------------------------------------------

    def run(self) -> LoadResult:
        result = self.result
        self.started = started = time.monotonic()
        self.deadline = started + self.duration_s
        next_progress = started + PROGRESS_EVERY_S
        next_check = started
        try:
            self.addresses = self._resolve()
            while not self.stop.is_set():
                now = time.monotonic()
                if self.rate:
                    self._schedule(now)
                while self.paused and self.paused[0][0] <= now:
                    self.ready.append(heapq.heappop(self.paused)[2])
                self._dispatch(now)
                if now >= next_check:
                    # Timeouts and the end are looked for every CHECK_EVERY_S, not at
                    # every answer: a pass over every slot.
                    next_check = now + CHECK_EVERY_S
                    self._expire(now)
                    if now >= self.deadline and self._finished():
                        break
                if now >= next_progress:
                    next_progress += PROGRESS_EVERY_S
                    if self.on_progress is not None:
                        self.on_progress(result, now - started)
                wait = min(self._next_timer(now), next_check, next_progress) - now
                for fd, events in self.epoll.poll(max(0.0, min(wait, MAX_WAIT_S))):
                    entry = self.by_fd.get(fd)
                    if entry is not None:
                        self._on_event(*entry, events, time.monotonic())
        finally:
            for slot in self.slots:
                self._close(slot)
            self.epoll.close()
        result.duration_s = time.monotonic() - started
        return result

    def _resolve(self) -> list[tuple[int, Any]]:
        try:
            infos = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
        except OSError as exc:
            self.last_error = exc
            return []
        return [(family, address) for family, _, _, _, address in infos]

    def _finished(self) -> bool:
        return not self.tickets and not any(slot.busy for slot in self.slots)

    def _next_timer(self, now: float) -> float:
        soonest = self.deadline if now < self.deadline else math.inf
        if self.rate:
            soonest = min(soonest, self.started + self.result.scheduled / self.rate)
        if self.paused:
            soonest = min(soonest, self.paused[0][0])
        return soonest

    # -- handing out work ------------------------------------------------------------

    def _schedule(self, now: float) -> None:
        """Open loop: issue every request whose time has come."""
        assert self.rate
        result = self.result
        while (when := self.started + result.scheduled / self.rate) <= now and (
            when < self.deadline
        ):
            self.tickets.append((result.scheduled, when))
            result.scheduled += 1

    def _dispatch(self, now: float) -> None:
        """Give the ready slots work; in the open loop, open more while requests wait and
        every slot is busy (the schedule does not wait for the server)."""
        ready = self.ready
        if self.rate:
            while self.tickets and ready:
                self._take_work(ready.popleft(), now)
            while self.tickets and len(self.slots) < self.max_connections:
                slot = _Slot()
                self.slots.append(slot)
                self._take_work(slot, now)
        else:
            while ready and now < self.deadline:
                self._take_work(ready.popleft(), now)

    def _take_work(self, slot: _Slot, now: float) -> None:
        """Give a ready slot its next request: a ticket (open loop) or the next number;
        with none left it stays ready."""
        if self.rate:
            while True:
                if not self.tickets:
                    self.ready.append(slot)
                    return
                n, when = self.tickets.popleft()
                if now - when <= self.timeout_s:
                    slot.ticket = (n, when)
                    break
                self.result.unsent += 1
        elif now >= self.deadline:
            self.ready.append(slot)
            return
        if slot.conn is not None:
            self._send_next(slot, now)
        else:
            self._connect(slot, now)

    def _pause(self, slot: _Slot, until: float) -> None:
        heapq.heappush(self.paused, (until, next(self.pauses), slot))

    def _send_next(self, slot: _Slot, now: float) -> None:
        conn = slot.conn
        assert conn is not None
        if slot.ticket is not None:
            (n, since), slot.ticket = slot.ticket, None
        else:
            n, since = self.counter, now
            self.counter += 1
        request = build_request(self.host, self.path, self.body_for(n), self.headers)
        conn.out, conn.sent = memoryview(request), 0
        conn.n, conn.since, conn.deadline = n, since, now + self.timeout_s
        self._write(slot, conn)

    # -- sockets ---------------------------------------------------------------------

    def _connect(self, slot: _Slot, now: float) -> None:
        """Start opening a connection (only from the loop itself, never while a poll's
        events are handled: a new socket could take the number of one closed in that
        batch and get its events)."""
        if not self.addresses:
            self._connect_failed(slot, now, self.last_error or OSError("no address"))
            return
        family, address = self.addresses[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        code = sock.connect_ex(address)
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            self._connect_failed(slot, now, OSError(code, os.strerror(code)))
            return
        conn = _Connection(sock)
        conn.deadline = now + self.timeout_s
        slot.conn = conn
        self.by_fd[conn.fd] = (slot, conn)
        self.epoll.register(conn.fd, select.EPOLLOUT | select.EPOLLIN)

    def _connect_failed(self, slot: _Slot, now: float, error: BaseException) -> None:
        self.result.transport_errors += 1
        self.last_error = error
        if slot.ticket is not None:
            slot.ticket = None
            self.result.unsent += 1
        if len(self.addresses) > 1:
            self.addresses.append(self.addresses.pop(0))  # the next address next time
        self._pause(slot, now + RECONNECT_PAUSE_S)

    def _on_event(self, slot: _Slot, conn: _Connection, events: int, now: float) -> None:
        if not conn.connected:
            if not events & (select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP):
                return
            code = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                self._close(slot)
                self._connect_failed(slot, now, OSError(code, os.strerror(code)))
                return
            conn.connected = True
            conn.deadline = math.inf
            self.result.connections_opened += 1
            self._watch_writes(conn, False)
            if slot.ticket is not None or now < self.deadline:
                self._send_next(slot, now)
            else:
                self.ready.append(slot)
            return
        # Read first: an answer that came before the body was all written (a refusal on
        # the headers) is counted even if the server then closes.
        if events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
            self._read(slot, conn, now)
        if slot.conn is conn and events & select.EPOLLOUT and conn.sent < len(conn.out):
            self._write(slot, conn)

    def _watch_writes(self, conn: _Connection, on: bool) -> None:
        if conn.watching_writes != on:
            conn.watching_writes = on
            self.epoll.modify(conn.fd, select.EPOLLIN | (select.EPOLLOUT if on else 0))

    def _write(self, slot: _Slot, conn: _Connection) -> None:
        try:
            while conn.sent < len(conn.out):
                conn.sent += conn.sock.send(conn.out[conn.sent :])
        except BlockingIOError:
            self._watch_writes(conn, True)
            return
        except OSError as exc:
            self._broken(slot, exc)
            return
        conn.out = memoryview(b"")
        self._watch_writes(conn, False)

    def _read(self, slot: _Slot, conn: _Connection, now: float) -> None:
        try:
            chunk = conn.sock.recv(_READ_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            chunk, error = b"", exc
        else:
            error = ConnectionError("server closed the connection")
        if not chunk:
            if conn.n < 0:
                self._close(slot)  # an idle keep-alive connection closed: no request lost
            else:
                self._broken(slot, error)
            return
        conn.inbox += chunk
        if conn.n < 0:
            return
        if conn.head is None:
            end = conn.inbox.find(b"\r\n\r\n")
            if end < 0:
                return
            status, length, keep = parse_response_head(bytes(conn.inbox[:end]))
            conn.head = (status, end + 4 + length, keep)
        status, size, keep = conn.head
        if len(conn.inbox) < size:
            return
        del conn.inbox[:size]
        conn.head = None
        self._answered(slot, conn, status, keep, now)

    def _answered(
        self, slot: _Slot, conn: _Connection, status: int, keep: bool, now: float
    ) -> None:
        result = self.result
        result.requests += 1
        result.statuses[status] += 1
        if 200 <= status < 300:
            result.ack_ns[conn.n] = time.time_ns()
            result.accepted_requests += 1
            result.accepted_lines += self.lines
            result.latencies_s.append(now - conn.since)
        conn.n, conn.deadline = -1, math.inf
        if conn.sent < len(conn.out):
            keep = False  # answered before the body was all sent: the stream is out of step
        if not keep:
            self._close(slot)
        if not self.rate and status in (429, 503):
            self._pause(slot, now + BACKOFF_S)  # honest backpressure: back off a little
        elif slot.conn is None:
            self.ready.append(slot)  # connected again by the loop (see _connect)
        else:
            self._take_work(slot, now)  # on the same connection, at once

    def _expire(self, now: float) -> None:
        for slot in self.slots:
            conn = slot.conn
            if conn is None or conn.deadline > now:
                continue
            self._close(slot)
            if conn.connected:
                self.result.timeouts += 1
                self.ready.append(slot)
            else:
                self._connect_failed(slot, now, TimeoutError("connect timed out"))

    def _broken(self, slot: _Slot, error: BaseException) -> None:
        self.result.transport_errors += 1
        self.last_error = error
        self._close(slot)
        self.ready.append(slot)

    def _close(self, slot: _Slot) -> None:
        conn = slot.conn
        if conn is None:
            return
        slot.conn = None
        self.by_fd.pop(conn.fd, None)
        with contextlib.suppress(OSError, ValueError):
            self.epoll.unregister(conn.fd)
        conn.sock.close()


async def run_load(
    url: str,
    body_for: BodyFactory,
    *,
    lines_per_request: int,
    headers: dict[str, str],
    connections: int,
    duration_s: float,
    rate_per_s: float | None = None,
    max_connections: int = 1024,
    request_timeout_s: float = 30.0,
    on_progress: Callable[[LoadResult, float], None] | None = None,
) -> LoadResult:
    """Drive load at ``url`` for ``duration_s`` (see the module's docstring).

    The loop runs in a thread of its own (``on_progress`` is called from it); the trio
    run waits. Raises ``TargetUnreachable`` if no connection could be opened at all.
    """
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    generator = _Generator(
        host,
        port,
        path,
        body_for,
        lines_per_request=lines_per_request,
        headers=headers,
        connections=connections,
        duration_s=duration_s,
        rate_per_s=rate_per_s,
        max_connections=max_connections,
        request_timeout_s=request_timeout_s,
        on_progress=on_progress,
    )
    try:
        result = await trio.to_thread.run_sync(generator.run, abandon_on_cancel=True)
    except trio.Cancelled:
        generator.stop.set()  # the abandoned thread ends within MAX_WAIT_S
        raise
    if not result.connections_opened:
        reason = f": {generator.last_error}" if generator.last_error else ""
        raise TargetUnreachable(f"no connection could be opened to {host}:{port}{reason}")
    return result
