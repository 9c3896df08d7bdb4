"""A key flooding the service beside a modest key: what the flood costs the others.

    python benchmarks/rate_limit_flood.py --connections 128 --lines 500

The flooding key (rate limit 20 requests/s) sends on ``--connections`` keep-alive
connections and sends its next request as soon as an answer comes back, a `429` included
(a client that ignores ``Retry-After``). Meanwhile the modest key sends 50 requests/s
(open loop, 100 lines each). Reports the answers each key got, the modest key's ack latency,
and the server's CPU per answer. Runs the real server (``logstack serve``, real WAL with
fsync) and the Loki-compatible receiver from ``logstack.testing`` as child processes on
127.0.0.1; ``--json`` prints the report alone.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import trio

from logstack.bench._load import build_request, parse_response_head, run_load
from logstack.bench._procstat import tree_cpu_seconds
from logstack.testing import make_entry
from logstack.testing._process import (
    TEST_TOKEN,
    TEST_TOKEN_2,
    LogstackProcess,
    LokiReceiverProcess,
    make_test_config,
)

PATH = "/v1/logs:ingest"
FLOOD_RATE = 20
MODEST_RATE = 50
BODIES = 8


def bodies(lines: int) -> list[bytes]:
    return [
        json.dumps(
            {"entries": [make_entry(message=f"req {n} line {i} " + "x" * 80) for i in range(lines)]}
        ).encode()
        for n in range(BODIES)
    ]


class _Connection:
    """A keep-alive connection that reads whole answers (status and keep-alive only)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def read_response(self) -> tuple[int, bool]:
        while (end := self.buffer.find(b"\r\n\r\n")) < 0:
            await self._fill()
        status, length, keep = parse_response_head(bytes(self.buffer[:end]))
        del self.buffer[: end + 4]
        while len(self.buffer) < length:
            await self._fill()
        del self.buffer[:length]
        return status, keep

    async def _fill(self) -> None:
        chunk = await self.stream.receive_some(65536)
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.buffer += chunk


async def flood(
    port: int, requests: list[bytes], connections: int, duration_s: float
) -> Counter[int]:
    statuses: Counter[int] = Counter()
    deadline = trio.current_time() + duration_s

    async def one(start: int) -> None:
        conn = _Connection(await trio.open_tcp_stream("127.0.0.1", port))
        n = start
        try:
            while trio.current_time() < deadline:
                await conn.stream.send_all(requests[n % len(requests)])
                n += 1
                status, keep = await conn.read_response()
                statuses[status] += 1
                if not keep:
                    await conn.stream.aclose()
                    conn = _Connection(await trio.open_tcp_stream("127.0.0.1", port))
        finally:
            await conn.stream.aclose()

    async with trio.open_nursery() as nursery:
        for start in range(connections):
            nursery.start_soon(one, start)
    return statuses


async def run(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="logstack-flood-"))
    try:
        return await measure(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)  # WALs and logs: tens of MB a run


async def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    flood_bodies = bodies(args.lines)
    modest_bodies = bodies(100)
    with LokiReceiverProcess(workdir / "loki") as loki:
        config = make_test_config(
            workdir,
            loki.url,
            security={
                "api_keys": {
                    TEST_TOKEN: {
                        "name": "flood",
                        "rate_limit_rps": FLOOD_RATE,
                        "rate_limit_burst": FLOOD_RATE,
                    },
                    TEST_TOKEN_2: {"name": "modest"},
                }
            },
        )
        with LogstackProcess(workdir / "server", config) as server:
            assert server.proc is not None
            port = int(server.url.rsplit(":", 1)[1])
            headers = {"Authorization": f"Bearer {TEST_TOKEN}", "Content-Type": "application/json"}
            requests = [build_request("127.0.0.1", PATH, body, headers) for body in flood_bodies]
            print(f"flooding for {args.duration:g} s ...", file=sys.stderr)
            found: dict[str, Any] = {}
            cpu_before = tree_cpu_seconds(server.proc.pid)

            async def flooding() -> None:
                found["flood"] = await flood(port, requests, args.connections, args.duration)

            async def modest() -> None:
                found["modest"] = await run_load(
                    server.url + PATH,
                    lambda n: modest_bodies[n % BODIES],
                    lines_per_request=100,
                    headers={
                        "Authorization": f"Bearer {TEST_TOKEN_2}",
                        "Content-Type": "application/json",
                    },
                    connections=4,
                    duration_s=args.duration,
                    rate_per_s=MODEST_RATE,
                )

            async with trio.open_nursery() as nursery:
                nursery.start_soon(flooding)
                nursery.start_soon(modest)
            cpu = tree_cpu_seconds(server.proc.pid) - cpu_before
    flood_statuses: Counter[int] = found["flood"]
    modest_result = found["modest"]
    answers = sum(flood_statuses.values()) + modest_result.requests
    return {
        "connections": args.connections,
        "lines_per_flood_request": args.lines,
        "duration_s": args.duration,
        "flood_statuses": {str(k): v for k, v in sorted(flood_statuses.items())},
        "modest_statuses": {str(k): v for k, v in sorted(modest_result.statuses.items())},
        "modest_unanswered": modest_result.transport_errors + modest_result.timeouts,
        "modest_ack_p50_ms": round(modest_result.percentile(0.5) * 1000, 1),
        "modest_ack_p99_ms": round(modest_result.percentile(0.99) * 1000, 1),
        "server_cpu_s": round(cpu, 2),
        "server_cpu_us_per_answer": round(cpu / answers * 1e6) if answers else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=128, help="flooding connections")
    parser.add_argument("--lines", type=int, default=500, help="lines per flooding request")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args()
    report = trio.run(run, args)
    if args.json:
        print(json.dumps(report))
        return
    for name, value in report.items():
        print(f"{name:>26}  {value}")


if __name__ == "__main__":
    main()
