"""Server CPU per 100-line request at a fixed offered rate: a steadier A/B measure.

    python benchmarks/cpu_per_request.py                     # this tree, 500 requests/s
    python benchmarks/cpu_per_request.py --rate 300 --duration 10
    python benchmarks/cpu_per_request.py --pairs 5 --code /tmp/base --code .   # A/B

On this shared 2-core VM, lines/s at saturation moves by 10-20% from one run to the next, so
a change of a few percent needs many alternating pairs to show. Paced below saturation, the
server's CPU per request moves by ~2-3% (2026-11-27: 1.98-2.11 ms over fifteen runs of one
tree, drifting with the machine). It is the cost a change removes, whatever the throughput
does with it.

Each run starts the bench's Loki stand-in and a LogStack server (the same configuration as
``python -m logstack.bench``), drives ``--rate`` requests/s of the bench's 100-line bodies
for ``--duration`` seconds, and reads the server's CPU time (all its processes) from
``/proc``. With several ``--code`` trees, the server runs with each tree first on its
``PYTHONPATH``, in turn, ``--pairs`` times. A run whose server could not keep up with the
rate is flagged: its figure is a saturated one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
from pathlib import Path

import trio

from logstack.bench._cli import Bench, _start, _stop, body_factory, build_parser
from logstack.bench._load import run_load
from logstack.bench._procstat import tree_cpu_seconds
from logstack.testing._process import LokiReceiverProcess

LINES = 100
KEPT_UP = 0.97
"""A run that got fewer answers than this share of the requests it offered was saturated."""


async def measure(bench: Bench, code: str | None, rate: float, duration: float) -> str:
    """One run: the server with ``code`` (a source tree) first on its path, paced at
    ``rate``. Returns a line of figures."""
    receiver = LokiReceiverProcess(bench.workdir / f"loki-{bench.runs}")
    loki_url = await _start(receiver)
    server = bench._server(loki_url)
    if code is not None:
        paths = [code, os.environ.get("PYTHONPATH", "")]
        server.env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    try:
        url = await _start(server)
        assert server.proc is not None
        before = tree_cpu_seconds(server.proc.pid)
        load = await run_load(
            url + "/v1/logs:ingest",
            body_factory(LINES),
            lines_per_request=LINES,
            headers=bench.headers,
            connections=bench.args.connections,
            duration_s=duration,
            rate_per_s=rate,
        )
        cpu = tree_cpu_seconds(server.proc.pid) - before
    finally:
        await _stop(server)
        await _stop(receiver)
    requests = load.accepted_requests
    kept_up = requests >= KEPT_UP * rate * load.duration_s
    return (
        f"{code or '.':<24} cpu/request {cpu / max(requests, 1) * 1e3:6.3f} ms  "
        f"requests {requests:>6,}  ack p50 {load.percentile(0.5) * 1e3:5.1f} "
        f"p99 {load.percentile(0.99) * 1e3:6.1f} ms  non-202 "
        f"{sum(n for s, n in load.statuses.items() if s != 202)}"
        + ("" if kept_up else "  SATURATED: lower --rate")
    )


def cpu_of(line: str) -> float:
    return float(line.split("cpu/request")[1].split()[0])


async def main(args: argparse.Namespace) -> None:
    bench = Bench(build_parser().parse_args(["--connections", str(args.connections)]))
    trees: list[str | None] = list(args.code) or [None]
    results: list[list[float]] = [[] for _ in trees]  # by position: a tree may come twice
    try:
        for _ in range(args.pairs):
            for tree, figures in zip(trees, results, strict=True):
                line = await measure(bench, tree, args.rate, args.duration)
                print(line, flush=True)
                figures.append(cpu_of(line))
    finally:
        shutil.rmtree(bench.workdir, ignore_errors=True)
    for tree, figures in zip(trees, results, strict=True):
        print(f"{tree or '.':<24} median cpu/request {statistics.median(figures):.3f} ms")
    if len(trees) == 2:
        first, second = results
        ratios = sorted(b / a for a, b in zip(first, second, strict=True))
        lower = sum(r < 1 for r in ratios)
        print(
            f"second/first per pair: {', '.join(f'{r:.3f}' for r in ratios)} "
            f"(median {statistics.median(ratios):.3f}; lower in {lower} of {len(ratios)})"
        )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rate", type=float, default=500.0, help="requests/s offered (default 500)")
    p.add_argument("--duration", type=float, default=8.0, help="seconds per run (default 8)")
    p.add_argument("--connections", type=int, default=16, help="keep-alive connections")
    p.add_argument("--pairs", type=int, default=1, help="rounds over the --code trees")
    p.add_argument(
        "--code",
        action="append",
        default=[],
        help="a source tree to put first on the server's PYTHONPATH (repeat for an A/B)",
    )
    return p


if __name__ == "__main__":
    cli = parser()
    arguments = cli.parse_args(sys.argv[1:])
    if arguments.pairs < 1 or arguments.rate <= 0 or arguments.duration <= 0:
        cli.error("--pairs must be at least 1, --rate and --duration above 0")
    arguments.code = [str(Path(tree).resolve()) for tree in arguments.code]
    trio.run(main, arguments)
