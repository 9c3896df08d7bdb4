"""Server CPU per 100-line request at a fixed offered rate: a steadier A/B measure.

    python benchmarks/cpu_per_request.py                     # this tree, 500 requests/s
    python benchmarks/cpu_per_request.py --rate 300 --duration 10
    python benchmarks/cpu_per_request.py --pairs 5 --code /tmp/base --code .   # A/B

On this shared 2-core VM, lines/s at saturation moves by 10-20% from one run to the next, so
a change of a few percent needs many alternating pairs to show. Paced below saturation, the
server's CPU per request moved by ~2-3% in a calm phase of the machine (2026-11-27: 1.98-2.11
ms over fifteen runs of one tree) and by up to +-10% in a slow one: repeat the sets. It is
the cost a change removes, whatever the throughput does with it.

Each run is the bench's own paced 100-line scenario (``python -m logstack.bench``'s stand-in,
server configuration, bodies and load generator) at ``--rate`` requests/s for
``--duration`` seconds: the server's CPU time (all its processes, from ``/proc``) from the
start of the load until every line reached the stand-in, per request. With several
``--code`` trees, the server runs with each tree first on its ``PYTHONPATH``, in turn,
``--pairs`` times. A run whose server could not keep up with the rate is flagged: its figure
is a saturated one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

import trio

from logstack.bench._cli import Bench, build_parser
from logstack.testing._process import LogstackProcess

LINES = 100
KEPT_UP = 0.97
"""A run that got fewer answers than this share of the requests it offered was saturated."""


class _TreeBench(Bench):
    """The bench, with its server run on a given source tree (``tree`` first on its path)."""

    tree: str | None = None

    def _server(
        self, loki_url: str, *, workers: int | None = None, **sections: Any
    ) -> LogstackProcess:
        server = super()._server(loki_url, workers=workers, **sections)
        if self.tree is not None:
            paths = [self.tree, os.environ.get("PYTHONPATH", "")]
            server.env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        return server


async def measure(bench: _TreeBench, tree: str | None, rate: float) -> tuple[float, str]:
    """One run of the bench's paced 100-line scenario on ``tree``: the server's CPU per
    request (ms) and a line of figures."""
    bench.tree = tree
    result = await bench.scenario("cpu-per-request", LINES, rate_per_s=rate)
    load = result.load
    requests = load.accepted_requests
    kept_up = requests >= KEPT_UP * rate * load.duration_s
    cpu_ms = (result.cpu_s or 0) / max(requests, 1) * 1e3
    return cpu_ms, (
        f"{tree or '.':<24} cpu/request {cpu_ms:6.3f} ms  "
        f"requests {requests:>6,}  ack p50 {load.percentile(0.5) * 1e3:5.1f} "
        f"p99 {load.percentile(0.99) * 1e3:6.1f} ms  non-202 "
        f"{sum(n for s, n in load.statuses.items() if s != 202)}"
        + ("" if result.delivered_all else "  NOT ALL DELIVERED")
        + ("" if kept_up else "  SATURATED: lower --rate")
    )


async def main(args: argparse.Namespace) -> None:
    bench = _TreeBench(
        build_parser().parse_args(
            ["--connections", str(args.connections), "--duration", str(args.duration)]
        )
    )
    trees: list[str | None] = list(args.code) or [None]
    results: list[list[float]] = [[] for _ in trees]  # by position: a tree may come twice
    try:
        for _ in range(args.pairs):
            for tree, figures in zip(trees, results, strict=True):
                cpu_ms, line = await measure(bench, tree, args.rate)
                print(line, flush=True)
                figures.append(cpu_ms)
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
