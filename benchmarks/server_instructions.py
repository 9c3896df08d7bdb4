"""Instructions a whole server executes per 100-line request, counted by valgrind (callgrind).

    python benchmarks/server_instructions.py                   # LogStack, delivery included
    python benchmarks/server_instructions.py --connections 1   # requests one at a time
    python benchmarks/server_instructions.py --no-loki         # ingest only (stand-in down)
    python benchmarks/server_instructions.py --target ceiling  # the bench's bare endpoint
    python benchmarks/server_instructions.py --target asgi     # the same, without Quart

``hot_path_instructions.py`` counts LogStack's steps one by one; this counts everything the
server process does for a request (all its threads: Hypercorn, h11, trio, the stages, the
WAL, the fsync's hand-off, delivery and its pushes), so the two together say where a
request's work is. Like any instruction count it is the same whatever else the machine
does, and it leaves out what time adds (cache misses, the disk): compare it with the time
per request (``cpu_per_request.py``) to see how fast the instructions ran.

The server runs under callgrind, ~50 times slower, with the bench's configuration, bodies
and load generator. A warm-up load (``--warmup`` seconds) runs first and is delivered; the
counters are then zeroed, the measured load runs for ``--duration`` seconds with bodies the
warm-up never sent (the stand-in stores an exact duplicate once), every line is delivered,
and the counters are read: instructions divided by the requests answered 202. A run takes
two to four minutes.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

import trio

from logstack.bench._cli import (
    Bench,
    _CeilingProcess,
    _receiver_entries,
    _start,
    _stop,
    body_factory,
    build_parser,
)
from logstack.bench._load import LoadResult, run_load
from logstack.testing._process import ChildProcess, LokiReceiverProcess

TARGETS = ("logstack", "ceiling", "asgi")
LINES = 100
MEASURED_OFFSET = 10**6
"""Request numbers of the measured load start here: bodies the warm-up never sent."""
START_TIMEOUT_S = 600.0
DELIVERY_TIMEOUT_S = 900.0


def valgrind_launcher(out_file: Path) -> list[str]:
    """What the server runs under: callgrind, its dumps to ``out_file`` (``.1`` and on)."""
    return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out_file}"]


def summary_instructions(dump: str) -> int:
    """The instruction total of a callgrind dump (its ``summary:`` line)."""
    for line in dump.splitlines():
        if line.startswith("summary:"):
            return int(line.split()[1])
    raise ValueError("no 'summary:' line in the callgrind dump")


def callgrind_control(process: ChildProcess, flag: str) -> None:
    assert process.proc is not None
    command = ["callgrind_control", flag, str(process.proc.pid)]
    subprocess.run(command, check=True, capture_output=True)


async def _delivered(loki_url: str, lines: int) -> None:
    with trio.fail_after(DELIVERY_TIMEOUT_S):
        while await _receiver_entries(loki_url) < lines:
            await trio.sleep(0.5)


async def count(args: argparse.Namespace) -> str:
    """Run one count as ``args`` say; the line of figures to print."""
    bench = Bench(build_parser().parse_args(["--connections", str(args.connections)]))
    receiver: LokiReceiverProcess | None = None
    server: ChildProcess | None = None
    delivering = args.target == "logstack" and not args.no_loki
    try:
        if args.target == "logstack":
            receiver = LokiReceiverProcess(bench.workdir / "loki")
            loki_url = await _start(receiver)
            if args.no_loki:
                await _stop(receiver)
            server = bench._server(loki_url)
        else:
            ceiling = _CeilingProcess(bench.workdir / "ceiling")
            ceiling.plain_asgi = args.target == "asgi"
            server = ceiling
        out_file = bench.workdir / "callgrind.out"
        server.launcher = valgrind_launcher(out_file)
        server.env["PYTHONHASHSEED"] = "0"
        url = await trio.to_thread.run_sync(partial(server.start, START_TIMEOUT_S))
        make = body_factory(LINES)

        async def load(duration: float, offset: int) -> LoadResult:
            return await run_load(
                url + "/v1/logs:ingest",
                lambda n: make(n + offset),
                lines_per_request=LINES,
                headers=bench.headers,
                connections=args.connections,
                duration_s=duration,
            )

        warmup = await load(args.warmup, 0)
        if delivering:
            await _delivered(loki_url, warmup.accepted_lines)
        await trio.to_thread.run_sync(callgrind_control, server, "-z")
        measured = await load(args.duration, MEASURED_OFFSET)
        if delivering:
            await _delivered(loki_url, warmup.accepted_lines + measured.accepted_lines)
        await trio.to_thread.run_sync(callgrind_control, server, "-d")
        dump = await trio.Path(f"{out_file}.1").read_text()
    finally:
        for process in (server, receiver):
            if process is not None:
                await _stop(process)
        shutil.rmtree(bench.workdir, ignore_errors=True)
    requests = measured.accepted_requests
    if requests == 0:
        raise RuntimeError("no request was accepted during the measured load")
    what = {
        "logstack": "delivery included" if delivering else "ingest only, the stand-in down",
        "ceiling": "bare Hypercorn + Quart-Trio endpoint",
        "asgi": "plain ASGI function under Hypercorn",
    }[args.target]
    per_request = summary_instructions(dump) / requests
    return (
        f"{args.target}: {per_request / 1e6:.2f} M instructions per {LINES}-line request "
        f"({requests:,} requests, {args.connections} connection"
        f"{'' if args.connections == 1 else 's'}; {what})"
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--target", choices=TARGETS, default="logstack", help="what to count")
    p.add_argument("--connections", type=int, default=16, help="keep-alive connections")
    p.add_argument("--duration", type=float, default=25.0, help="seconds of measured load")
    p.add_argument("--warmup", type=float, default=10.0, help="seconds of load before it")
    p.add_argument("--no-loki", action="store_true", help="LogStack with the stand-in down")
    return p


def main(argv: Sequence[str]) -> int:
    cli = parser()
    args = cli.parse_args(argv)
    if args.connections < 1 or args.duration <= 0 or args.warmup <= 0:
        cli.error("--connections must be at least 1, --duration and --warmup above 0")
    if args.no_loki and args.target != "logstack":
        cli.error("--no-loki applies to --target logstack only")
    missing = [tool for tool in ("valgrind", "callgrind_control") if shutil.which(tool) is None]
    if missing:
        cli.error(f"{' and '.join(missing)} not found: install valgrind (Debian: valgrind)")
    print(trio.run(count, args), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
