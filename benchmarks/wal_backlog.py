"""Build a WAL backlog with Loki down, restart, then drain it: RSS, time-to-ready, drain rate.

    python benchmarks/wal_backlog.py --target-gib 1.0

Runs the real server (``logstack serve`` child process, real fsync) and the Loki-compatible
receiver from ``logstack.testing`` as its own process. Prints progress while it runs and a
summary (also as JSON with ``--json``) at the end. Everything stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import trio

from logstack.bench._procstat import rss_mib
from logstack.testing._process import (
    TEST_TOKEN,
    LogstackProcess,
    LokiReceiverProcess,
    make_test_config,
)

ENTRIES_PER_REQUEST = 500


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dir_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*.seg") if p.is_file())


def body_template(worker: int) -> bytes:
    entries = [
        {
            "timestamp": "2026-11-26T12:00:00.000000000Z",
            "level": "INFO",
            "message": f"backlog w{worker} r@@@@@@@@@ e{i:03d} " + "lorem ipsum " * 8,
            "service": "backlog-bench",
            "env": "bench",
            "metadata": {"request": "@@@@@@@@@", "entry": i, "payload": "x" * 900},
        }
        for i in range(ENTRIES_PER_REQUEST)
    ]
    return json.dumps({"entries": entries}).encode()


async def fill(url: str, server: LogstackProcess, target: int, workers: int) -> dict[str, Any]:
    """Post until the WAL holds ``target`` bytes; sample RSS on the way."""
    sent = accepted = 0
    rss: list[float] = []
    done = trio.Event()
    started = time.perf_counter()

    async def worker(w: int) -> None:
        nonlocal sent, accepted
        template = body_template(w)
        headers = {"Authorization": f"Bearer {TEST_TOKEN}", "Content-Type": "application/json"}
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            n = 0
            while not done.is_set():
                body = template.replace(b"@@@@@@@@@", f"{n:09d}".encode())
                n += 1
                response = await client.post("/v1/logs:ingest", headers=headers, content=body)
                sent += 1
                if response.status_code == 202:
                    accepted += ENTRIES_PER_REQUEST
                elif response.status_code in (429, 503):
                    await trio.sleep(float(response.headers.get("Retry-After", "1")))

    async def monitor() -> None:
        assert server.proc is not None
        while True:
            await trio.sleep(2)
            size = dir_bytes(server.wal_root)
            rss.append(rss_mib(server.proc.pid))
            elapsed = time.perf_counter() - started
            print(
                f"  fill {elapsed:6.1f}s  WAL {size / 2**30:6.3f} GiB  "
                f"accepted {accepted:>9,} lines ({accepted / elapsed:,.0f}/s)  "
                f"server RSS {rss[-1]:.0f} MiB",
                flush=True,
            )
            if size >= target:
                done.set()
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(monitor)
        for w in range(workers):
            nursery.start_soon(worker, w)
    elapsed = time.perf_counter() - started
    return {
        "fill_s": round(elapsed, 1),
        "lines_accepted": accepted,
        "ingest_lines_per_s": round(accepted / elapsed),
        "wal_bytes": dir_bytes(server.wal_root),
        "rss_mib_min": round(min(rss), 1),
        "rss_mib_max": round(max(rss), 1),
        "rss_mib_first_last": [round(rss[0], 1), round(rss[-1], 1)],
    }


async def forwarded(client: httpx.AsyncClient) -> float:
    text = (await client.get("/metrics")).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("loki_entries_forwarded_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def main(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="logstack-backlog-"))
    loki_port = free_port()
    config = make_test_config(
        workdir,
        f"http://127.0.0.1:{loki_port}",
        security={"rate_limit_rps": 1e6, "rate_limit_burst": 1e6},
        wal={"quota_bytes": 8 * 2**30},
        loki={"backoff_max_s": 2.0, "push_format": "protobuf"},
        server={"log_level": "WARNING"},
    )
    server = LogstackProcess(workdir / "server", config)
    receiver = LokiReceiverProcess(workdir / "loki", port=loki_port)
    result: dict[str, Any] = {"target_bytes": int(args.target_gib * 2**30)}
    try:
        await trio.to_thread.run_sync(server.start)
        print(f"filling the WAL to {args.target_gib} GiB with Loki down ...", flush=True)
        result |= await fill(server.url, server, result["target_bytes"], args.workers)

        print("restarting the server (SIGKILL, then start) ...", flush=True)
        server.kill()
        t0 = time.perf_counter()
        await trio.to_thread.run_sync(server.start)
        result["restart_to_listening_s"] = round(time.perf_counter() - t0, 2)
        assert server.proc is not None
        result["rss_mib_after_restart"] = round(rss_mib(server.proc.pid), 1)
        print(f"  listening again after {result['restart_to_listening_s']} s", flush=True)

        print("starting the receiver; draining ...", flush=True)
        await trio.to_thread.run_sync(receiver.start)
        t0 = time.perf_counter()
        drain_rss: list[float] = []
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            total = result["lines_accepted"]
            while True:
                await trio.sleep(2)
                done = await forwarded(client)
                drain_rss.append(rss_mib(server.proc.pid))
                elapsed = time.perf_counter() - t0
                print(
                    f"  drain {elapsed:6.1f}s  forwarded {done:>11,.0f} / {total:,} "
                    f"({done / elapsed:,.0f}/s)  server RSS {drain_rss[-1]:.0f} MiB",
                    flush=True,
                )
                if done >= total:
                    break
        elapsed = time.perf_counter() - t0
        result["drain_s"] = round(elapsed, 1)
        result["drain_lines_per_s"] = round(total / elapsed)
        result["drain_rss_mib_max"] = round(max(drain_rss), 1)
        result["wal_bytes_after_drain"] = dir_bytes(server.wal_root)
    finally:
        await trio.to_thread.run_sync(server.stop)
        await trio.to_thread.run_sync(receiver.stop)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return result


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target-gib", type=float, default=1.0)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    result = trio.run(main, args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print()
        for key, value in result.items():
            print(f"  {key:<28} {value}")
    print(f"(machine: {os.cpu_count()} cores; {time.strftime('%Y-%m-%d')})")


if __name__ == "__main__":
    cli()
