"""Where the server's event loop spends a request: time and steps per request, task by task.

    python benchmarks/event_loop_tasks.py                     # 100-line requests, 16 connections
    python benchmarks/event_loop_tasks.py --connections 32 --lines 500
    python benchmarks/event_loop_tasks.py --rate 350          # paced, as half-load is
    python benchmarks/event_loop_tasks.py --target ceiling    # the bench's bare endpoint
    python benchmarks/event_loop_tasks.py --target asgi       # the same, without Quart
    python benchmarks/event_loop_tasks.py --drain              # a backlog's drain, per push

LogStack runs on one event loop per process, and at saturation that loop is the bottleneck
(one core, busy ~99% of the time). py-spy samples it, but it under-samples some code (the
HTTP stack, in earlier profiles). This times every step trio runs instead: the server runs
with a ``trio.abc.Instrument`` that reads the clock before and after each task step and adds
the time to the task's name. The loop's own calls to epoll are timed too: those that could
wait (a timeout above zero: no task was runnable) under ``<I/O wait>``, the loop's idle time;
those that only polled (timeout zero, between two batches of runnable tasks) under
``<I/O poll>``, which is the loop's work and counts in the shares. A task's time is wall
time on the loop's thread, so it includes what running cold costs (cache misses) and any
wait for the GIL while an fsync thread held it.

The bench's configuration, bodies and load generator. A warm-up load runs first and is
delivered; the counters are then zeroed (SIGUSR1 to the server), the measured load runs and
is delivered, and the server writes its counters (SIGUSR2). Figures are per request answered
202 during the measured load, delivery included (a push carries ten 100-line requests).
Timing each step costs ~2 µs, ~5% of a 100-line request; the shares are what to read.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import runpy
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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

SCRIPT = Path(__file__).resolve()
CHILD_FLAG = "--serve-with-step-timer"
"""First argument of this script when it runs the server itself (the bench's launcher)."""
OUT_ENV = "EVENT_LOOP_TASKS_OUT"
"""Where the server writes its counters (not LOGSTACK_*: those are config overrides)."""
IO_WAIT = "<I/O wait>"
"""epoll calls that could wait: no task was runnable (the loop idle)."""
IO_POLL = "<I/O poll>"
"""epoll calls with a zero timeout, between batches of runnable tasks (the loop's work)."""
TARGETS = ("logstack", "ceiling", "asgi")
PUSH_ENTRIES = 1000
"""``loki.batch_max_entries`` of the bench's server: a drain's pushes carry this many."""
MEASURED_OFFSET = 10**6
"""Request numbers of the measured load start here: bodies the warm-up never sent."""
DELIVERY_TIMEOUT_S = 300.0


def task_label(name: str) -> str:
    """A task's name without its module path: ``TCPServer._read_data``, ``stage:validate``."""
    parts = [part for part in name.split(".") if part != "<locals>"]
    return ".".join(parts[-2:])


class StepTimer(trio.abc.Instrument):
    """Steps and nanoseconds per task; zeroed and written on request, between two steps
    (the signal handlers only set a flag, so no count is ever half-updated)."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.steps: Counter[str] = Counter()
        self.ns: Counter[str] = Counter()
        self.zero_requested = False
        self.write_requested = False
        self._started = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.zero_requested:
            self.zero_requested = False
            self.steps.clear()
            self.ns.clear()
        self._started = time.perf_counter_ns()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        label = task_label(task.name)
        self.steps[label] += 1
        self.ns[label] += time.perf_counter_ns() - self._started
        if self.write_requested:
            self.write_requested = False
            self.write()

    def before_io_wait(self, timeout: float) -> None:
        self._started = time.perf_counter_ns()

    def after_io_wait(self, timeout: float) -> None:
        label = IO_WAIT if timeout > 0 else IO_POLL
        self.steps[label] += 1
        self.ns[label] += time.perf_counter_ns() - self._started

    def write(self) -> None:
        partial = self.out.with_name(self.out.name + ".partial")
        partial.write_text(json.dumps({"steps": self.steps, "ns": self.ns}))
        partial.replace(self.out)


def serve_with_step_timer(server_command: Sequence[str]) -> None:
    """Run ``<python> -m <module> ...`` (the server's command) in this process, its trio
    run timed."""
    if len(server_command) < 3 or server_command[1] != "-m":
        raise SystemExit(f"not a '<python> -m <module>' command: {server_command}")
    module = server_command[2]
    timer = StepTimer(Path(os.environ[OUT_ENV]))
    run = trio.run

    def timed_run(*args: Any, **kwargs: Any) -> Any:
        kwargs["instruments"] = [*kwargs.get("instruments", ()), timer]
        return run(*args, **kwargs)

    def zero(signum: int, frame: object) -> None:
        timer.zero_requested = True

    def write(signum: int, frame: object) -> None:
        timer.write_requested = True

    trio.run = timed_run
    signal.signal(signal.SIGUSR1, zero)
    signal.signal(signal.SIGUSR2, write)
    atexit.register(timer.write)
    sys.argv = [module, *server_command[3:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def table(counts: dict[str, dict[str, int]], units: float, top: int, unit: str = "req") -> str:
    """The tasks by time per ``unit`` (a request, or a push), then all tasks' total. Shares
    are of the time the loop was not idle: the tasks' and the polls' (``IO_POLL``), not
    ``IO_WAIT``."""
    steps, ns = counts["steps"], counts["ns"]
    busy = sum(value for label, value in ns.items() if label != IO_WAIT)
    per = f"/{unit}"
    rows = [f"{'task':<48} {'steps' + per:>10} {'µs' + per:>9} {'µs/step':>8} {'share':>6}"]
    ranked = sorted(ns.items(), key=lambda item: -item[1])
    for label, value in ranked[:top]:
        share = "" if label == IO_WAIT else f"{100 * value / busy:5.1f}%"
        rows.append(
            f"{label:<48} {steps[label] / units:10.2f} {value / units / 1000:9.1f} "
            f"{value / steps[label] / 1000:8.1f} {share:>6}"
        )
    loop = (IO_WAIT, IO_POLL)
    task_steps = sum(value for label, value in steps.items() if label not in loop)
    task_ns = sum(value for label, value in ns.items() if label not in loop)
    rows.append(f"{'all tasks':<48} {task_steps / units:10.2f} {task_ns / units / 1000:9.1f}")
    return "\n".join(rows)


def timed(server: ChildProcess, out: Path) -> ChildProcess:
    """``server``, set to run under the step timer, its counters written to ``out``."""
    server.launcher = [sys.executable, str(SCRIPT), CHILD_FLAG]
    server.env[OUT_ENV] = str(out)
    return server


async def written_counts(server: ChildProcess, out: Path) -> dict[str, dict[str, int]]:
    """Ask the server for its counters (SIGUSR2) and read them."""
    server.signal(signal.SIGUSR2)
    written = trio.Path(out)
    with trio.fail_after(30):
        while not await written.exists():
            await trio.sleep(0.05)
    counts: dict[str, dict[str, int]] = json.loads(await written.read_text())
    return counts


async def measure(args: argparse.Namespace) -> str:
    bench = Bench(build_parser().parse_args(["--connections", str(args.connections)]))
    out = bench.workdir / "steps.json"
    receiver = LokiReceiverProcess(bench.workdir / "loki")
    server: ChildProcess | None = None
    delivering = args.target == "logstack"
    try:
        loki_url = await _start(receiver)
        if delivering:
            server = bench._server(loki_url)
        else:
            ceiling = _CeilingProcess(bench.workdir / "ceiling")
            ceiling.plain_asgi = args.target == "asgi"
            server = ceiling
        url = await _start(timed(server, out))
        make = body_factory(args.lines)

        async def load(duration: float, offset: int, delivered: int) -> LoadResult:
            """Run a load and wait until its lines are delivered too."""
            result = await run_load(
                url + "/v1/logs:ingest",
                lambda n: make(n + offset),
                lines_per_request=args.lines,
                headers=bench.headers,
                connections=args.connections,
                duration_s=duration,
                rate_per_s=args.rate,
            )
            with trio.fail_after(DELIVERY_TIMEOUT_S):
                while delivering and (
                    await _receiver_entries(loki_url) < delivered + result.accepted_lines
                ):
                    await trio.sleep(0.2)
            return result

        warmup = await load(args.warmup, 0, 0)
        server.signal(signal.SIGUSR1)
        measured = await load(args.duration, MEASURED_OFFSET, warmup.accepted_lines)
        counts = await written_counts(server, out)
    finally:
        if server is not None:
            await _stop(server)
        await _stop(receiver)
        shutil.rmtree(bench.workdir, ignore_errors=True)
    requests = measured.accepted_requests
    if requests == 0:
        raise RuntimeError("no request was accepted during the measured load")
    rate = requests / measured.duration_s
    what = {
        "logstack": "LogStack, delivery included",
        "ceiling": "the bare Hypercorn + Quart-Trio endpoint",
        "asgi": "a plain ASGI function under Hypercorn",
    }[args.target]
    head = (
        f"{what}: {requests:,} requests of {args.lines} lines, {args.connections} "
        f"connections, {rate:,.0f} requests/s"
        + (f" (paced at {args.rate:,.0f})" if args.rate else "")
        + "; per request answered 202:"
    )
    return head + "\n" + table(counts, requests, args.top)


async def measure_drain(args: argparse.Namespace) -> str:
    """The bench's ``outage`` scenario, timed while the backlog drains: the load runs with
    the stand-in down, then the stand-in starts, and the counters run from its first stored
    push until it holds every line."""
    bench = Bench(build_parser().parse_args(["--connections", str(args.connections)]))
    out = bench.workdir / "steps.json"
    receiver = LokiReceiverProcess(bench.workdir / "loki")
    server: ChildProcess | None = None
    try:
        loki_url = await _start(receiver)
        await _stop(receiver)  # down from the start, on a known port
        server = timed(bench._server(loki_url, loki={"backoff_max_s": 1.0}), out)
        url = await _start(server)
        load = await run_load(
            url + "/v1/logs:ingest",
            body_factory(args.lines),
            lines_per_request=args.lines,
            headers=bench.headers,
            connections=args.connections,
            duration_s=args.duration,
        )
        await _start(receiver)
        with trio.fail_after(DELIVERY_TIMEOUT_S):
            while (first := await _receiver_entries(loki_url)) == 0:
                await trio.sleep(0.01)
            server.signal(signal.SIGUSR1)
            started = trio.current_time()
            while (delivered := await _receiver_entries(loki_url)) < load.accepted_lines:
                await trio.sleep(0.05)
        elapsed = trio.current_time() - started
        counts = await written_counts(server, out)
    finally:
        if server is not None:
            await _stop(server)
        await _stop(receiver)
        shutil.rmtree(bench.workdir, ignore_errors=True)
    drained = delivered - first
    if drained <= 0 or load.duration_s <= 0:
        raise RuntimeError("nothing was left to drain once the first push was stored")
    head = (
        f"LogStack draining {drained:,} lines in {elapsed:.2f} s ({drained / elapsed:,.0f} "
        f"lines/s; ingest with Loki down: {load.accepted_lines / load.duration_s:,.0f} "
        f"lines/s); per {PUSH_ENTRIES}-entry push:"
    )
    return head + "\n" + table(counts, drained / PUSH_ENTRIES, args.top, unit="push")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--target", choices=TARGETS, default="logstack", help="what to time")
    p.add_argument("--drain", action="store_true", help="time the drain after an outage (per push)")
    p.add_argument("--lines", type=int, default=100, help="lines per request")
    p.add_argument("--connections", type=int, default=16, help="keep-alive connections")
    p.add_argument(
        "--rate",
        type=float,
        help="pace the requests at this many per second (default: each connection sends "
        "its next request when the answer arrives)",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=8.0,
        help="seconds of measured load (with --drain: of load while Loki is down)",
    )
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before it")
    p.add_argument("--top", type=int, default=15, help="tasks shown")
    return p


def main(argv: Sequence[str]) -> int:
    if argv and argv[0] == CHILD_FLAG:
        serve_with_step_timer(argv[1:])
        return 0
    cli = parser()
    args = cli.parse_args(argv)
    if args.lines < 1 or args.connections < 1 or args.duration <= 0 or args.warmup <= 0:
        cli.error("--lines and --connections must be at least 1, --duration and --warmup above 0")
    if args.drain and args.target != "logstack":
        cli.error("--drain applies to --target logstack only")
    if args.rate is not None and (args.rate <= 0 or args.drain):
        cli.error("--rate must be above 0, and a drain is not paced (--drain)")
    print(trio.run(measure_drain if args.drain else measure, args), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
