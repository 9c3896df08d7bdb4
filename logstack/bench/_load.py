"""A lean HTTP/1.1 load generator for trio: keep-alive connections, pre-built requests.

httpx costs a few hundred microseconds per request, as much as the server under test; on a
2-core machine that would measure the client. Here each connection writes pre-encoded
request bytes and parses only the status line and ``Content-Length`` of the answer.

Two ways to drive load:

* **closed loop** (no rate): ``connections`` connections, each sending its next request
  when the answer to the last one arrives; latency is from the request's write to its
  answer.
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

import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import trio

BodyFactory = Callable[[int], bytes]
"""Returns the body of request number ``n`` (unique per request, so no dedup anywhere)."""

RECONNECT_PAUSE_S = 0.05
"""Pause before a new connection replaces a broken one (no busy loop on a dead target)."""


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


class _Connection:
    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def _fill(self) -> None:
        chunk = await self.stream.receive_some(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.buffer += chunk

    async def read_response(self) -> tuple[int, bool]:
        """The answer's status, and whether the server keeps the connection open."""
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            await self._fill()
        head = bytes(self.buffer[:end]).decode("latin-1")
        del self.buffer[: end + 4]
        lines = head.split("\r\n")
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
        while len(self.buffer) < length:
            await self._fill()
        del self.buffer[:length]
        return status, keep


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

    Raises ``TargetUnreachable`` if no connection could be opened at all.
    """
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    result = LoadResult()
    counter = 0
    started = trio.current_time()
    deadline = started + duration_s
    last_error: list[BaseException] = []

    async def connect() -> _Connection | None:
        try:
            stream = await trio.open_tcp_stream(host, port)
        except OSError as exc:
            result.transport_errors += 1
            last_error[:] = [exc]
            return None
        result.connections_opened += 1
        return _Connection(stream)

    async def exchange(conn: _Connection, n: int, since: float) -> tuple[int | None, bool]:
        """Send request ``n`` and read its answer: its status (``None`` if there was
        none) and whether ``conn`` is still usable."""
        request = build_request(host, path, body_for(n), headers)
        with trio.move_on_after(request_timeout_s) as scope:
            try:
                await conn.stream.send_all(request)
                status, keep = await conn.read_response()
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                result.transport_errors += 1
                last_error[:] = [exc]
                return None, False
        if scope.cancelled_caught:
            result.timeouts += 1
            return None, False
        result.requests += 1
        result.statuses[status] += 1
        if 200 <= status < 300:
            result.ack_ns[n] = time.time_ns()
            result.accepted_requests += 1
            result.accepted_lines += lines_per_request
            result.latencies_s.append(trio.current_time() - since)
        return status, keep

    async def closed_loop() -> None:
        nonlocal counter
        conn: _Connection | None = None
        while trio.current_time() < deadline:
            if conn is None and (conn := await connect()) is None:
                await trio.sleep(RECONNECT_PAUSE_S)
                continue
            n = counter
            counter += 1
            status, keep = await exchange(conn, n, trio.current_time())
            if not keep:
                await conn.stream.aclose()
                conn = None
            if status in (429, 503):
                await trio.sleep(0.05)  # honest backpressure: back off a little
        if conn is not None:
            await conn.stream.aclose()

    async def open_loop(nursery: trio.Nursery) -> None:
        assert rate_per_s
        tickets_in, tickets = trio.open_memory_channel[tuple[int, float]](math.inf)
        idle = 0
        open_workers = 0

        async def worker() -> None:
            nonlocal idle, open_workers
            conn: _Connection | None = None
            try:
                while True:
                    idle += 1
                    try:
                        n, when = await tickets.receive()
                    except trio.EndOfChannel:
                        return
                    finally:
                        idle -= 1
                    if trio.current_time() - when > request_timeout_s:
                        result.unsent += 1
                        continue
                    if conn is None and (conn := await connect()) is None:
                        result.unsent += 1
                        await trio.sleep(RECONNECT_PAUSE_S)
                        continue
                    _, keep = await exchange(conn, n, when)
                    if not keep:
                        await conn.stream.aclose()
                        conn = None
            finally:
                open_workers -= 1
                if conn is not None:
                    with trio.CancelScope(shield=True):
                        await conn.stream.aclose()

        def add_worker() -> None:
            nonlocal open_workers
            open_workers += 1
            nursery.start_soon(worker)

        for _ in range(min(connections, max_connections)):
            add_worker()
        async with tickets_in:
            k = 0
            while (when := started + k / rate_per_s) < deadline:
                await trio.sleep_until(when)
                if idle == 0 and open_workers < max_connections:
                    add_worker()  # every connection is busy: the schedule does not wait
                tickets_in.send_nowait((k, when))
                result.scheduled += 1
                k += 1

    async def progress() -> None:
        while True:
            await trio.sleep(1.0)
            if on_progress is not None:
                on_progress(result, trio.current_time() - started)

    async with trio.open_nursery() as nursery:
        monitor = trio.CancelScope()

        async def run_progress() -> None:
            with monitor:
                await progress()

        nursery.start_soon(run_progress)
        async with trio.open_nursery() as workers:
            if rate_per_s:
                workers.start_soon(open_loop, workers)
            else:
                for _ in range(connections):
                    workers.start_soon(closed_loop)
        monitor.cancel()
    result.duration_s = trio.current_time() - started
    if not result.connections_opened:
        reason = f": {last_error[0]}" if last_error else ""
        raise TargetUnreachable(f"no connection could be opened to {host}:{port}{reason}")
    return result
