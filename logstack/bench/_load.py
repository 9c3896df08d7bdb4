"""A lean HTTP/1.1 load generator for trio: keep-alive connections, pre-built requests.

httpx costs a few hundred microseconds per request, as much as the server under test; on a
2-core machine that would measure the client. Here each connection writes pre-encoded
request bytes and parses only the status line and ``Content-Length`` of the answer.
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


@dataclass
class LoadResult:
    duration_s: float = 0.0
    requests: int = 0
    accepted_requests: int = 0
    accepted_lines: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)
    """Latency of every 2xx answer (request written → answer read)."""
    transport_errors: int = 0
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

    async def read_response(self) -> int:
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            await self._fill()
        head = bytes(self.buffer[:end]).decode("latin-1")
        del self.buffer[: end + 4]
        lines = head.split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length = 0
        for line in lines[1:]:
            name, _, value = line.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        while len(self.buffer) < length:
            await self._fill()
        del self.buffer[:length]
        return status


async def run_load(
    url: str,
    body_for: BodyFactory,
    *,
    lines_per_request: int,
    headers: dict[str, str],
    connections: int,
    duration_s: float,
    rate_per_s: float | None = None,
    on_progress: Callable[[LoadResult, float], None] | None = None,
) -> LoadResult:
    """Drive ``connections`` keep-alive connections for ``duration_s``.

    Closed loop (each connection sends its next request when the answer arrives) unless
    ``rate_per_s`` is set, in which case requests are paced to that total rate.
    """
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = parts.path or "/"
    result = LoadResult()
    counter = 0
    started = trio.current_time()
    deadline = started + duration_s
    interval = connections / rate_per_s if rate_per_s else 0.0

    async def connection_loop(index: int) -> None:
        nonlocal counter
        stream = await trio.open_tcp_stream(host, port)
        conn = _Connection(stream)
        next_send = started + (interval * index / connections if interval else 0.0)
        async with stream:
            while trio.current_time() < deadline:
                if interval:
                    await trio.sleep_until(next_send)
                    next_send += interval
                n = counter
                counter += 1
                request = build_request(host, path, body_for(n), headers)
                t0 = time.perf_counter()
                try:
                    await stream.send_all(request)
                    status = await conn.read_response()
                except (trio.BrokenResourceError, ConnectionError, OSError):
                    result.transport_errors += 1
                    return
                elapsed = time.perf_counter() - t0
                result.requests += 1
                result.statuses[status] += 1
                if 200 <= status < 300:
                    result.ack_ns[n] = time.time_ns()
                    result.accepted_requests += 1
                    result.accepted_lines += lines_per_request
                    result.latencies_s.append(elapsed)
                elif status in (429, 503) and not interval:
                    await trio.sleep(0.05)  # honest backpressure: back off a little

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
            for index in range(connections):
                workers.start_soon(connection_loop, index)
        monitor.cancel()
    result.duration_s = trio.current_time() - started
    return result
