"""``python -m logstack.bench``: the real server, the real receiver, load over real HTTP.

Each scenario starts ``logstack serve`` (Hypercorn, real WAL with fsync) and the
Loki-compatible receiver from ``logstack.testing`` as child processes on 127.0.0.1, drives
keep-alive connections at it, waits for delivery, and reports throughput, latency, CPU,
memory and whether every accepted line reached the receiver. Ratios against the bare
Hypercorn + Quart-Trio endpoint (``ceiling``) are measured in the same run, alternating.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import trio

from .._config import MAX_WORKERS
from .._workers import bind_socket
from ..testing._process import (
    TEST_TOKEN,
    ChildProcess,
    LogstackProcess,
    LokiReceiverProcess,
    deep_merge,
    make_test_config,
)
from ._load import BodyFactory, LoadResult, TargetUnreachable, run_load
from ._procstat import tree_cpu_seconds, tree_rss_mib

PLACEHOLDER = b"@@@@@@@@@"
PROBE_MARKER = "bench-probe-"
"""The first line of every request carries ``bench-probe-<request number>``: the receiver
records when it arrives, which gives the 202→Loki latency of every accepted request."""
BATCH_WAIT_S = 0.5
"""``loki.batch_max_wait_s`` of the benchmarked server."""
DELIVERY_POLL_S = 0.2
"""How often the bench asks the receiver whether every line arrived."""
SETTLE_S = BATCH_WAIT_S + DELIVERY_POLL_S
"""What the last lines of a run wait for even when delivery keeps up: their batch's cut and
the bench's next look at the receiver."""


def body_factory(lines: int, *, masking_heavy: bool = False) -> BodyFactory:
    """Unique bodies cheaply: one pre-encoded template, the request number patched in."""
    entries = []
    for i in range(lines):
        entry: dict[str, Any] = {
            "timestamp": "2026-11-26T12:00:00.123456789Z",
            "level": "INFO" if i % 10 else "ERROR",
            # No digit runs that look like card numbers: the card detector would mask
            # them, and identical masked lines are stored once by Loki.
            "message": f"GET /api/v1/orders/@@@@@@@@@/items/{i} 200 12ms",
            "service": "bench-api",
            "env": "bench",
            "labels": {"region": "eu-west-1"},
            "metadata": {"order_id": "@@@@@@@@@", "duration_ms": 12, "path": "/api/v1/orders"},
        }
        if masking_heavy:
            entry["message"] = (
                f"payment @@@@@@@@@/{i} by jane.doe@example.com card 4111 1111 1111 1111 "
                "auth Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl"
            )
            entry["metadata"] = {
                "order_id": "@@@@@@@@@",
                "password": "hunter2",
                "user": {"email": "jane.doe@example.com", "apiKey": "ak_live_123456"},
                "cards": [{"card_number": "4111111111111111"}],
                "note": "contact ops@example.org",
            }
        if i == 0:
            entry["message"] = f"{PROBE_MARKER}@@@@@@@@@ " + entry["message"]
        entries.append(entry)
    template = json.dumps({"entries": entries}, separators=(",", ":")).encode()

    def make(n: int) -> bytes:
        return template.replace(PLACEHOLDER, b"%09d" % n)

    return make


@dataclass
class ScenarioResult:
    name: str
    lines_per_request: int
    load: LoadResult
    cpu_s: float | None = None
    """Server CPU from the start of the load to the last line delivered (None: not measured,
    as for ``--target`` or the outage scenario)."""
    receiver_cpu_s: float | None = None
    """CPU of the Loki stand-in over the same period (load start to last line delivered):
    it shares the machine's cores."""
    workers: int = 1
    peak_rss_mib: float | None = None
    wal_bytes: int | None = None
    delivered: int = 0
    delivered_all: bool | None = None
    delivery_wait_s: float | None = None
    """Seconds from the end of the load until the receiver had every accepted line."""
    delivery_latencies_s: list[float] = field(default_factory=list)
    cores_during_load: dict[str, float] | None = None
    """CPU seconds per second of load (cores busy) of the server, the Loki stand-in and
    the load generator (this process): how the run shared the machine."""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def sustained_lines_per_s(self) -> float | None:
        """Lines accepted *and delivered* per second: the time delivery needed after the
        load, beyond the batching delay every line waits anyway, counts as part of the run.

        At saturation delivery lags ingest (the WAL takes the difference), so the accepted
        rate of a short run overstates what the server can keep up with; this does not.
        """
        load = self.load
        if self.delivery_wait_s is None or not self.delivered_all or not load.duration_s:
            return None
        backlog_s = max(0.0, self.delivery_wait_s - SETTLE_S)
        return load.accepted_lines / (load.duration_s + backlog_s)

    def summary(self) -> dict[str, Any]:
        load = self.load
        lines = load.accepted_lines
        sustained = self.sustained_lines_per_s
        out: dict[str, Any] = {
            "scenario": self.name,
            "lines_per_request": self.lines_per_request,
            "workers": self.workers,
            "duration_s": round(load.duration_s, 2),
            "lines_per_s": round(lines / load.duration_s) if load.duration_s else 0,
            "sustained_lines_per_s": None if sustained is None else round(sustained),
            "requests_per_s": round(load.accepted_requests / load.duration_s)
            if load.duration_s
            else 0,
            "ack_p50_ms": round(load.percentile(0.50) * 1000, 2),
            "ack_p95_ms": round(load.percentile(0.95) * 1000, 2),
            "ack_p99_ms": round(load.percentile(0.99) * 1000, 2),
            "deliver_p50_ms": _ms(_percentile(self.delivery_latencies_s, 0.50)),
            "deliver_p99_ms": _ms(_percentile(self.delivery_latencies_s, 0.99)),
            "cpu_s_per_100k_lines": _per_100k(self.cpu_s, lines),
            "receiver_cpu_s_per_100k_lines": _per_100k(self.receiver_cpu_s, lines),
            "peak_rss_mib": None if self.peak_rss_mib is None else round(self.peak_rss_mib, 1),
            "cores_during_load": None
            if self.cores_during_load is None
            else {k: round(v, 2) for k, v in self.cores_during_load.items()},
            "wal_bytes_per_line": round(self.wal_bytes / lines, 1)
            if lines and self.wal_bytes is not None
            else None,
            "4xx": load.count_4xx,
            "5xx": load.count_5xx,
            "errors": load.transport_errors + load.timeouts + load.unsent,
            "transport_errors": load.transport_errors,
            "timeouts": load.timeouts,
            "unsent_requests": load.unsent,
            "connections_opened": load.connections_opened,
            "statuses": dict(sorted(load.statuses.items())),
            "accepted_lines": lines,
            "delivered_lines": self.delivered,
            "all_delivered": self.delivered_all,
        }
        out.update(self.extra)
        return out


def _cpu_per_line(result: ScenarioResult) -> float:
    """Server CPU seconds per accepted line (load start to last line delivered)."""
    if result.cpu_s is None or not result.load.accepted_lines:
        raise RuntimeError(f"{result.name}: no server CPU or no accepted line to divide by")
    return result.cpu_s / result.load.accepted_lines


def _per_100k(seconds: float | None, lines: int) -> float | None:
    return None if seconds is None or not lines else round(seconds / lines * 1e5, 2)


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.999999) - 1))]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


async def _delivery_latencies(url: str, load: LoadResult) -> list[float]:
    """202→receiver latency of every accepted request whose probe line arrived."""
    async with httpx.AsyncClient(timeout=30) as client:
        arrivals: dict[str, int] = (await client.get(url + "/_receiver/probes")).json()
    out = []
    for n, acked in load.ack_ns.items():
        arrived = arrivals.get(f"{n:09d}")
        if arrived is not None:
            out.append(max(0.0, (arrived - acked) / 1e9))
    return out


def _progress(name: str) -> Callable[[LoadResult, float], None]:
    def show(result: LoadResult, elapsed: float) -> None:
        rate = result.accepted_lines / elapsed if elapsed else 0
        statuses = " ".join(f"{k}:{v}" for k, v in sorted(result.statuses.items()))
        print(
            f"  {name:<16} {elapsed:5.1f}s  {rate:>10,.0f} lines/s  [{statuses}]",
            file=sys.stderr,
            flush=True,
        )

    return show


async def _start(proc: ChildProcess) -> str:
    return await trio.to_thread.run_sync(proc.start)


async def _stop(proc: ChildProcess) -> None:
    """Stop ``proc`` even while the bench itself is being cancelled (Ctrl-C, SIGTERM)."""
    with trio.CancelScope(shield=True):
        await trio.to_thread.run_sync(proc.stop)


@asynccontextmanager
async def _running(proc: ChildProcess) -> AsyncIterator[str]:
    """``proc`` started for the block (its URL), and stopped whatever happens in it,
    including a failed start."""
    try:
        yield await _start(proc)
    finally:
        await _stop(proc)


async def _receiver_stats(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=10) as client:
        stats: dict[str, Any] = (await client.get(url + "/_receiver/stats")).json()
    return stats


async def _receiver_entries(url: str) -> int:
    return int((await _receiver_stats(url))["entries"])


def drain_figures(
    stats: dict[str, Any], up_ns: int, drain_s: float, load: LoadResult
) -> dict[str, Any]:
    """How a backlog drained once the receiver was back (``up_ns``, wall clock).

    ``recovery_s``: until the first push stored entries (the forwarder notices Loki is back
    at its next retry, up to ``loki.backoff_max_s`` later). ``drain_lines_per_s``: the
    entries stored after that first push over the time to the last one, so neither the
    retry's wait nor the bench's polling counts against the rate. ``drain_s``: receiver up
    until the bench saw every line (both included)."""
    ingest_rate = load.accepted_lines / load.duration_s if load.duration_s else 0.0
    first, last = stats.get("first_stored_ns"), stats.get("last_stored_ns")
    out: dict[str, Any] = {"drain_s": round(drain_s, 2)}
    if first is None or last is None or last <= first:
        return out | {"recovery_s": None, "drain_lines_per_s": None, "drain_over_ingest": None}
    drain_rate = (int(stats["entries"]) - int(stats["first_stored_entries"])) / (
        (last - first) / 1e9
    )
    return out | {
        "recovery_s": round((first - up_ns) / 1e9, 2),
        "drain_window_s": round((last - first) / 1e9, 2),
        "drain_lines_per_s": round(drain_rate),
        "drain_over_ingest": round(drain_rate / ingest_rate, 2) if ingest_rate else None,
    }


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.workdir = Path(tempfile.mkdtemp(prefix="logstack-bench-"))
        self.runs = 0
        self.headers = {"Authorization": f"Bearer {TEST_TOKEN}", "Content-Type": "application/json"}

    def _server(
        self, loki_url: str, *, workers: int | None = None, **sections: Any
    ) -> LogstackProcess:
        self.runs += 1
        workdir = self.workdir / f"run-{self.runs}"
        config = make_test_config(
            workdir,
            loki_url,
            **deep_merge(
                {
                    "server": {
                        "log_level": "WARNING",
                        "workers": workers or self.args.workers,
                    },
                    "security": {"rate_limit_rps": 1e9, "rate_limit_burst": 1e9},
                    "wal": {"segment_max_bytes": 1 << 30, "quota_bytes": 64 << 30},
                    "loki": {"push_format": "protobuf", "batch_max_wait_s": BATCH_WAIT_S},
                },
                sections,
            ),
        )
        return LogstackProcess(workdir, config)

    async def ceiling(self, lines: int, processes: int = 1) -> float:
        """Lines/s of the bare Hypercorn + Quart-Trio endpoint (decode only).

        With ``processes`` > 1 that many bare endpoints share one port with
        ``SO_REUSEPORT``, as ``logstack serve --workers N`` does, under the same load.
        """
        workdir = self.workdir / f"ceiling-{self.runs}"
        self.runs += 1
        procs = [_CeilingProcess(workdir / str(i)) for i in range(processes)]
        # Held bound (not listening) while they run, so the port stays ours; only
        # listening sockets of the group receive connections.
        reserved = bind_socket("127.0.0.1", 0, reuse_port=True) if processes > 1 else None
        try:
            urls = []
            for proc in procs:
                proc.reuse_port = None if reserved is None else reserved.getsockname()[1]
                urls.append(await _start(proc))
            load = await run_load(
                urls[0] + "/v1/logs:ingest",
                body_factory(lines),
                lines_per_request=lines,
                headers=self.headers,
                connections=self.args.connections,
                duration_s=self.args.duration,
                on_progress=_progress(f"ceiling-{lines}" + (f"-{processes}" if reserved else "")),
            )
        finally:
            for proc in procs:
                await _stop(proc)
            if reserved is not None:
                reserved.close()
        return load.accepted_lines / load.duration_s

    async def scenario(
        self,
        name: str,
        lines: int,
        *,
        masking_heavy: bool = False,
        rate_per_s: float | None = None,
        connections: int | None = None,
        workers: int | None = None,
        server_sections: dict[str, Any] | None = None,
    ) -> ScenarioResult:
        receiver = LokiReceiverProcess(
            self.workdir / f"loki-{self.runs}", extra_args=["--probe-marker", PROBE_MARKER]
        )
        async with _running(receiver) as loki_url:
            server = self._server(loki_url, workers=workers, **(server_sections or {}))
            async with _running(server) as url:
                assert server.proc is not None and receiver.proc is not None
                return await self._measure(
                    name,
                    lines,
                    server,
                    url,
                    receiver.proc.pid,
                    loki_url,
                    masking_heavy=masking_heavy,
                    rate_per_s=rate_per_s,
                    connections=connections,
                    workers=workers,
                )

    async def _measure(
        self,
        name: str,
        lines: int,
        server: LogstackProcess,
        url: str,
        receiver_pid: int,
        loki_url: str,
        *,
        masking_heavy: bool,
        rate_per_s: float | None,
        connections: int | None,
        workers: int | None,
    ) -> ScenarioResult:
        assert server.proc is not None
        pid = server.proc.pid
        cpu0 = tree_cpu_seconds(pid)
        receiver_cpu0 = tree_cpu_seconds(receiver_pid)
        load_cpu0 = time.process_time()
        load = await run_load(
            url + "/v1/logs:ingest",
            body_factory(lines, masking_heavy=masking_heavy),
            lines_per_request=lines,
            headers=self.headers,
            connections=connections or self.args.connections,
            duration_s=self.args.duration,
            rate_per_s=rate_per_s,
            on_progress=_progress(name),
        )
        result = ScenarioResult(name, lines, load, workers=workers or self.args.workers)
        result.cores_during_load = {
            "server": (tree_cpu_seconds(pid) - cpu0) / load.duration_s,
            "receiver": (tree_cpu_seconds(receiver_pid) - receiver_cpu0) / load.duration_s,
            "load": (time.process_time() - load_cpu0) / load.duration_s,
        }
        result.wal_bytes = sum(p.stat().st_size for p in server.wal_root.rglob("*.seg"))
        print(f"  {name:<16} waiting for delivery", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        with trio.move_on_after(self.args.delivery_timeout):
            while await _receiver_entries(loki_url) < load.accepted_lines:
                await trio.sleep(DELIVERY_POLL_S)
        result.delivery_wait_s = round(time.perf_counter() - t0, 2)
        # CPU until every line is delivered: at saturation delivery lags the load, and
        # its work belongs to the lines as much as their ingest does.
        result.cpu_s = tree_cpu_seconds(pid) - cpu0
        result.receiver_cpu_s = tree_cpu_seconds(receiver_pid) - receiver_cpu0
        result.delivered = await _receiver_entries(loki_url)
        result.delivered_all = result.delivered >= load.accepted_lines
        result.delivery_latencies_s = await _delivery_latencies(loki_url, load)
        result.peak_rss_mib = tree_rss_mib(pid)
        return result

    async def outage(self) -> ScenarioResult:
        """Loki down while load runs; then up: how fast does the backlog drain?"""
        receiver = LokiReceiverProcess(self.workdir / f"loki-{self.runs}")
        async with _running(receiver) as loki_url:
            pass  # started once to learn a free port, down from the start of the load
        server = self._server(loki_url, loki={"backoff_max_s": 1.0})
        try:
            async with _running(server) as url:
                assert server.proc is not None
                load = await run_load(
                    url + "/v1/logs:ingest",
                    body_factory(100),
                    lines_per_request=100,
                    headers=self.headers,
                    connections=self.args.connections,
                    duration_s=self.args.duration,
                    on_progress=_progress("outage (down)"),
                )
                result = ScenarioResult("outage-recovery", 100, load)
                result.wal_bytes = sum(p.stat().st_size for p in server.wal_root.rglob("*.seg"))
                await _start(receiver)
                up_ns = time.time_ns()
                print("  outage (up)      draining", file=sys.stderr, flush=True)
                t0 = time.perf_counter()
                with trio.move_on_after(self.args.delivery_timeout * 4):
                    while await _receiver_entries(loki_url) < load.accepted_lines:
                        await trio.sleep(0.2)
                drain_s = time.perf_counter() - t0
                stats = await _receiver_stats(loki_url)
                result.delivered = int(stats["entries"])
                result.delivered_all = result.delivered >= load.accepted_lines
                result.peak_rss_mib = tree_rss_mib(server.proc.pid)
                # The receiver's own start, not ours: ours is taken after the port file is
                # seen, and a forwarder probing every few ms can have stored its first push
                # by then.
                result.extra = drain_figures(
                    stats, stats.get("serving_since_ns") or up_ns, drain_s, load
                )
        finally:
            await _stop(receiver)
        return result


def outage_summary(runs: list[ScenarioResult]) -> dict[str, Any]:
    """The last outage run's row, with the drain against the ingest of every run and their
    median: both rates come from one short run each, so one run's ratio moves with the
    machine (``--pairs`` runs). ``all_delivered`` holds only if it held in every run."""
    row = runs[-1].summary()
    ratios = [r.extra["drain_over_ingest"] for r in runs if r.extra.get("drain_over_ingest")]
    row["all_delivered"] = all(r.delivered_all for r in runs)
    row["drain_over_ingest_median"] = round(statistics.median(ratios), 2) if ratios else None
    row["drain_over_ingest_runs"] = ratios
    row["outage_runs"] = [
        {
            "ingest_lines_per_s": round(r.load.accepted_lines / r.load.duration_s)
            if r.load.duration_s
            else 0,
            "drain_lines_per_s": r.extra.get("drain_lines_per_s"),
            "recovery_s": r.extra.get("recovery_s"),
            "5xx": r.load.count_5xx,
            "all_delivered": r.delivered_all,
        }
        for r in runs
    ]
    return row


class _CeilingProcess(ChildProcess):
    name = "ceiling"
    plain_asgi = False
    """Serve the route as a plain ASGI function, without Quart (``_ceiling --asgi``)."""
    reuse_port: int | None = None
    """Join the processes listening on this port with ``SO_REUSEPORT``."""

    def command(self) -> list[str]:
        command = [sys.executable, "-m", "logstack.bench._ceiling", "--port-file"]
        command += [str(self.port_file)] + (["--asgi"] if self.plain_asgi else [])
        if self.reuse_port is not None:
            command += ["--reuse-port", str(self.reuse_port)]
        return command


SCENARIOS = (
    "lines-1",
    "batch-100",
    "batch-500",
    "masking-heavy",
    "half-load",
    "overload",
    "outage",
    "workers-2",
)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    bench = Bench(args)
    report: dict[str, Any] = {
        "machine": {"cores": os.cpu_count(), "python": sys.version.split()[0]},
        "date": time.strftime("%Y-%m-%d"),
        "command": "python -m logstack.bench " + " ".join(sys.argv[1:]),
        "scenarios": [],
    }
    try:
        if args.target:
            load = await run_load(
                args.target,
                body_factory(args.lines),
                lines_per_request=args.lines,
                headers=with_headers(bench.headers, args.header),
                connections=args.connections,
                duration_s=args.duration,
                on_progress=_progress("target"),
            )
            row = ScenarioResult("target", args.lines, load).summary()
            row["not_measured"] = (
                "delivery, server CPU and memory, WAL bytes: the target is not a process "
                "this bench started"
            )
            report["scenarios"].append(row)
            return report
        wanted = args.scenario or list(SCENARIOS)
        ratios: dict[str, list[float]] = {}
        for name in wanted:
            print(f"scenario {name}", file=sys.stderr, flush=True)
            if name in ("lines-1", "batch-100"):
                lines = 1 if name == "lines-1" else 100
                results = []
                for _ in range(args.pairs):
                    ceiling = await bench.ceiling(lines)
                    result = await bench.scenario(name, lines)
                    results.append(result)
                    ratios.setdefault(name, []).append(
                        result.load.accepted_lines / result.load.duration_s / ceiling
                    )
                last = results[-1]  # the row shows the last run; the ratios are every pair's
                last.extra = {
                    "ceiling_ratio_median": round(statistics.median(ratios[name]), 3),
                    "ceiling_ratios": [round(r, 3) for r in ratios[name]],
                }
                report["scenarios"].append(last.summary())
            elif name == "batch-500":
                report["scenarios"].append((await bench.scenario(name, 500)).summary())
            elif name == "masking-heavy":
                result = await bench.scenario(name, 100, masking_heavy=True)
                report["scenarios"].append(result.summary())
            elif name == "half-load":
                # Latency where it matters: paced at half of the capacity the server can
                # sustain (accept and deliver), probed at saturation first.
                probe = await bench.scenario("capacity-probe", 100)
                accepted_rps = probe.load.accepted_requests / probe.load.duration_s
                sustained = probe.sustained_lines_per_s
                sustained_rps = sustained / probe.lines_per_request if sustained else accepted_rps
                # A tail percentile of one short run moves a lot on a shared machine: the
                # paced run is repeated --pairs times, and the median p99 reported with all.
                p99s: list[float] = []
                for _ in range(args.pairs):
                    result = await bench.scenario(name, 100, rate_per_s=sustained_rps / 2)
                    p99s.append(result.load.percentile(0.99) * 1000)
                result.extra = {
                    "offered_requests_per_s": round(sustained_rps / 2),
                    "probe_accepted_requests_per_s": round(accepted_rps),
                    "probe_sustained_requests_per_s": round(sustained_rps),
                    "ack_p99_ms_median": round(statistics.median(p99s), 2),
                    "ack_p99_ms_runs": [round(p, 2) for p in p99s],
                }
                report["scenarios"].append(result.summary())
            elif name == "overload":
                # Capacity first, then twice that rate at a key limited to the capacity:
                # the excess must be refused cheaply (429), memory must stay bounded.
                probe = await bench.scenario("capacity-probe", 100)
                capacity_rps = probe.load.accepted_requests / probe.load.duration_s
                result = await bench.scenario(
                    name,
                    100,
                    rate_per_s=2 * capacity_rps,
                    connections=max(64, args.connections * 4),
                    server_sections={
                        "security": {
                            "rate_limit_rps": capacity_rps,
                            "rate_limit_burst": capacity_rps,
                        }
                    },
                )
                load = result.load
                result.extra = {
                    "offered_requests_per_s": round(2 * capacity_rps),
                    # What the open-loop generator really sent (answered or not).
                    "sent_requests_per_s": round(
                        (load.requests + load.timeouts + load.transport_errors) / load.duration_s
                    ),
                }
                report["scenarios"].append(result.summary())
            elif name == "outage":
                report["scenarios"].append(
                    outage_summary([await bench.outage() for _ in range(args.pairs)])
                )
            elif name == "workers-2":
                # Multi-core scaling: 100-line batches with 1 and 2 workers, alternating,
                # and the bare endpoint with 1 and 2 processes under the same load: how
                # far the stack itself scales on this machine, beside the load generator.
                scaling: list[float] = []
                cpu_scaling: list[float] = []
                sustained_scaling: list[float] = []
                bare_scaling: list[float] = []
                for _ in range(args.pairs):
                    one = await bench.scenario("workers-1", 100, workers=1)
                    two = await bench.scenario(name, 100, workers=2)
                    scaling.append(
                        (two.load.accepted_lines / two.load.duration_s)
                        / (one.load.accepted_lines / one.load.duration_s)
                    )
                    cpu_scaling.append(_cpu_per_line(two) / _cpu_per_line(one))
                    if one.sustained_lines_per_s and two.sustained_lines_per_s:
                        sustained_scaling.append(
                            two.sustained_lines_per_s / one.sustained_lines_per_s
                        )
                    bare_one = await bench.ceiling(100)
                    bare_scaling.append(await bench.ceiling(100, processes=2) / bare_one)
                # Both rows of the last pair: what one worker did beside two (CPU per line).
                report["scenarios"].append(one.summary())
                two.extra = {
                    "over_one_worker_median": round(statistics.median(scaling), 3),
                    "over_one_worker": [round(r, 3) for r in scaling],
                    # Server CPU per line, two workers over one: 1 if a second worker
                    # costs nothing per line (lines/s then follow the cores they get).
                    "cpu_per_line_over_one_worker_median": round(statistics.median(cpu_scaling), 3),
                    "cpu_per_line_over_one_worker": [round(r, 3) for r in cpu_scaling],
                    # Lines accepted *and delivered* per second: one worker at saturation
                    # accepts faster than it delivers (the WAL takes the difference), so
                    # its accepted rate holds work done after the load; this ratio does not.
                    "sustained_over_one_worker_median": round(
                        statistics.median(sustained_scaling), 3
                    )
                    if sustained_scaling
                    else None,
                    "sustained_over_one_worker": [round(r, 3) for r in sustained_scaling],
                    "ceiling_two_over_one_median": round(statistics.median(bare_scaling), 3),
                    "ceiling_two_over_one": [round(r, 3) for r in bare_scaling],
                }
                report["scenarios"].append(two.summary())
            else:
                raise SystemExit(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
    finally:
        if not args.keep:
            shutil.rmtree(bench.workdir, ignore_errors=True)
    return report


COLUMNS = (
    ("scenario", "scenario", 16),
    ("lines/s", "lines_per_s", 10),
    ("sustained", "sustained_lines_per_s", 10),
    ("req/s", "requests_per_s", 8),
    ("ack p50", "ack_p50_ms", 8),
    ("p95", "ack_p95_ms", 7),
    ("p99 ms", "ack_p99_ms", 8),
    ("→Loki p50", "deliver_p50_ms", 10),
    ("p99 ms", "deliver_p99_ms", 8),
    ("CPU s/100k", "cpu_s_per_100k_lines", 10),
    ("Loki CPU", "receiver_cpu_s_per_100k_lines", 9),
    ("RSS MiB", "peak_rss_mib", 8),
    ("WAL B/line", "wal_bytes_per_line", 10),
    ("4xx", "4xx", 7),
    ("5xx", "5xx", 6),
    ("errors", "errors", 6),
    ("delivered", "all_delivered", 9),
)


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"  # not measured here
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def render(report: dict[str, Any]) -> str:
    lines = [" ".join(f"{title:>{width}}" for title, _, width in COLUMNS)]
    for row in report["scenarios"]:
        lines.append(" ".join(f"{_cell(row.get(key)):>{width}}" for _, key, width in COLUMNS))
    for row in report["scenarios"]:
        for key in (
            "ceiling_ratio_median",
            "ack_p99_ms_median",
            "recovery_s",
            "drain_lines_per_s",
            "drain_over_ingest",
            "drain_over_ingest_median",
            "offered_requests_per_s",
            "sent_requests_per_s",
            "over_one_worker_median",
            "sustained_over_one_worker_median",
            "cpu_per_line_over_one_worker_median",
            "ceiling_two_over_one_median",
            "not_measured",
        ):
            if key in row:
                lines.append(f"  {row['scenario']}: {key} = {row[key]}")
    lines.append(
        "  (ms: milliseconds; -: not measured in that scenario; a row is the scenario's last "
        "run, the ratios are medians over --pairs)"
    )
    lines.append(f"  ({report['machine']['cores']} cores, {report['date']}: {report['command']})")
    return "\n".join(lines)


def _positive(kind: type[int] | type[float]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0 or (isinstance(value, float) and math.isinf(value)):
            raise argparse.ArgumentTypeError(f"must be greater than 0: {text!r}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def _workers(text: str) -> int:
    value = _positive(int)(text)
    if value > MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"at most {MAX_WORKERS}: {text!r}")
    return int(value)


def _target(text: str) -> str:
    """An ``http://`` URL with a host (the load generator speaks plain HTTP/1.1)."""
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a usable URL: {text!r} ({exc})") from None
    if parts.scheme == "https":
        raise argparse.ArgumentTypeError(
            f"{text!r}: the load generator speaks plain HTTP; point it at an http:// address "
            "(behind the TLS terminator)"
        )
    if parts.scheme != "http" or not parts.hostname:
        raise argparse.ArgumentTypeError(f"not an http:// URL with a host: {text!r}")
    return text


def _header(text: str) -> tuple[str, str]:
    name, colon, value = text.partition(":")
    if not colon or not name.strip() or name != name.strip():
        raise argparse.ArgumentTypeError(f"expected 'Name: value', got {text!r}")
    return name, value.strip()


def with_headers(defaults: dict[str, str], extra: list[tuple[str, str]]) -> dict[str, str]:
    """``defaults`` with ``extra`` on top; a name given in ``extra`` replaces a default of
    any letter case (one ``Authorization``, never two)."""
    replaced = {name.lower() for name, _ in extra}
    merged = {k: v for k, v in defaults.items() if k.lower() not in replaced}
    merged.update(extra)
    return merged


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m logstack.bench",
        description=__doc__.replace("``", "`"),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--scenario",
        action="append",
        choices=SCENARIOS,
        help="run only this scenario (repeatable); default: all",
    )
    parser.add_argument(
        "--duration", type=_positive(float), default=10.0, help="seconds of load per run"
    )
    parser.add_argument(
        "--connections", type=_positive(int), default=16, help="keep-alive connections"
    )
    parser.add_argument("--workers", type=_workers, default=1, help="server worker processes")
    parser.add_argument(
        "--pairs",
        type=_positive(int),
        default=2,
        help="alternating ceiling/logstack (and one/two-worker) pairs for the ratios, "
        "paced half-load runs for the p99, and outage runs for the drain (medians)",
    )
    parser.add_argument(
        "--delivery-timeout",
        type=_positive(float),
        default=60.0,
        help="seconds to wait after a run for every accepted line to reach the receiver "
        "(the outage drain waits four times as long)",
    )
    parser.add_argument(
        "--target",
        type=_target,
        help="drive load at this http:// ingest URL instead of starting LogStack (only "
        "--lines, --header, --duration and --connections apply)",
    )
    parser.add_argument(
        "--lines", type=_positive(int), default=100, help="lines per request (--target)"
    )
    parser.add_argument(
        "--header",
        type=_header,
        action="append",
        default=[],
        help="'Name: value' sent with every request (--target; repeatable); replaces the "
        "default Authorization (the test key's) or Content-Type of the same name",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    return parser


class _Terminated(Exception):
    """SIGTERM arrived: stop like Ctrl-C, child processes included."""


async def _run_until_signalled(args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {}

    async def bench(cancel: trio.CancelScope) -> None:
        result.update(await run(args))
        cancel.cancel()

    async with trio.open_nursery() as nursery:
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            nursery.start_soon(bench, nursery.cancel_scope)
            async for _ in signals:
                raise _Terminated
    return result


def _finite(value: Any) -> Any:
    """NaN (no latency when nothing was accepted) as null: NaN is not JSON."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.target and (args.scenario or args.workers != 1):
        print("--scenario and --workers do not apply to --target", file=sys.stderr)
        return 2
    stopped: tuple[int, str] | None = None
    try:
        report = trio.run(_run_until_signalled, args)
    except* TargetUnreachable as group:
        stopped = 1, str(group.exceptions[0])
    except* KeyboardInterrupt:
        stopped = 130, "interrupted; its processes are stopped"
    except* _Terminated:
        stopped = 143, "terminated; its processes are stopped"
    if stopped is not None:
        print(f"python -m logstack.bench: {stopped[1]}", file=sys.stderr)
        return stopped[0]
    print(json.dumps(_finite(report), indent=2, allow_nan=False) if args.json else render(report))
    return _exit_status(report)


def _exit_status(report: dict[str, Any]) -> int:
    """1 if a line went missing, a request failed without an answer, or (``--target``)
    nothing was accepted: a run that says so must not look like a success to a script."""
    problems = []
    for row in report["scenarios"]:
        if row.get("all_delivered") is False:
            problems.append(f"{row['scenario']}: not every accepted line reached the receiver")
        if row.get("errors"):
            problems.append(f"{row['scenario']}: {row['errors']} requests got no answer")
        if not row.get("accepted_lines") and row["scenario"] != "outage-recovery":
            problems.append(f"{row['scenario']}: no request was accepted {row.get('statuses')}")
    for problem in problems:
        print(f"python -m logstack.bench: {problem}", file=sys.stderr)
    return 1 if problems else 0
