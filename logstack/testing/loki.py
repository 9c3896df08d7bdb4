"""Run the Loki-compatible receiver as its own process (crash tests, benchmarks).

    python -m logstack.testing.loki --host 127.0.0.1 --port 0 --port-file PATH [--dump PATH]

Once listening, the bound port is written to ``--port-file`` (atomically: a reader never
sees a partial file). SIGTERM or SIGINT stops it cleanly; ``--dump`` then gets every stored
entry as a JSON line. While it runs, ``GET /_receiver/entries`` answers the same records as
a JSON array, ``GET /_receiver/stats`` the counters, and ``POST /_receiver/control`` flips
the switches (``{"fail_next_status": 503, "fail_next_count": 2}``, ``{"ready": false}``,
``{"allow_structured_metadata": false}``, ...).
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import sys
from pathlib import Path

import trio

from ._loki import LokiReceiver


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m logstack.testing.loki",
        description="A Loki-compatible push receiver for tests and benchmarks.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--port-file", type=Path, help="write the bound port here once listening")
    p.add_argument("--dump", type=Path, help="write stored entries as JSON lines on exit")
    p.add_argument("--max-line-size-bytes", type=int, default=256 * 1024)
    p.add_argument("--burst-limit-bytes", type=int, default=6 * 1024 * 1024)
    p.add_argument("--ingestion-rate-bytes-per-s", type=float, default=None)
    p.add_argument(
        "--out-of-order-window-s",
        type=float,
        default=3600.0,
        help="negative: accept any order",
    )
    p.add_argument("--delay-s", type=float, default=0.0)
    p.add_argument(
        "--disallow-structured-metadata",
        action="store_true",
        help="refuse entries with structured metadata (Loki: allow_structured_metadata: false)",
    )
    p.add_argument(
        "--max-returned-errors",
        type=int,
        default=10,
        help="refused entries an ingester lists per 400 (Loki: max_returned_stream_errors)",
    )
    p.add_argument(
        "--require-tenant",
        action="store_true",
        help="answer 401 'no org id' to a push without X-Scope-OrgID (Loki: auth_enabled)",
    )
    p.add_argument(
        "--reject-old-samples-max-age-s",
        type=float,
        default=None,
        help="refuse entries older than this (Loki: reject_old_samples_max_age, 168 h); "
        "off unless given, since it compares with the wall clock",
    )
    p.add_argument(
        "--creation-grace-period-s",
        type=float,
        default=None,
        help="refuse entries this far in the future (Loki: creation_grace_period, 10 min); "
        "off unless given",
    )
    p.add_argument(
        "--probe-marker",
        help="record the arrival time of lines containing this marker + digits "
        "(GET /_receiver/probes; used by the benchmark)",
    )
    return p


async def _run(args: argparse.Namespace) -> None:
    rx = LokiReceiver(
        max_line_size_bytes=args.max_line_size_bytes,
        burst_limit_bytes=args.burst_limit_bytes,
        ingestion_rate_bytes_per_s=args.ingestion_rate_bytes_per_s,
        out_of_order_window_s=None
        if args.out_of_order_window_s < 0
        else args.out_of_order_window_s,
        allow_structured_metadata=not args.disallow_structured_metadata,
        max_returned_errors=args.max_returned_errors,
        require_tenant=args.require_tenant,
        reject_old_samples_max_age_s=args.reject_old_samples_max_age_s,
        creation_grace_period_s=args.creation_grace_period_s,
        probe_marker=args.probe_marker,
    )
    rx.delay_s = args.delay_s
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(rx.serve, args.host, args.port)
            if args.port_file is not None:
                _write_atomically(args.port_file, f"{rx.port}\n".encode())
            print(f"loki receiver listening on {rx.url}", file=sys.stderr, flush=True)
            async for _ in signals:
                break
            rx.stop()
    if args.dump is not None:
        _write_atomically(args.dump, rx.dump_json_lines())
    print(f"loki receiver stopped: {rx!r}", file=sys.stderr, flush=True)


FULL_COLLECTIONS_AFTER = 1_000_000
"""Collections of the middle generation before a full one (``gc.set_threshold``'s third
value): never, in practice.

A receiver keeps every entry it stored, and each push adds a thousand to the containers its
duplicate check and its store are made of. Python's full collections walk all of them:
at a million entries a pause of 60-100 ms, several per drain of a bench backlog, while the
sender waits for its answer (``docs/performance.md``, "The drain"); Loki's collector (Go's)
runs concurrently. Young garbage is still collected; what becomes cyclic garbage only after
two young collections stays until the process ends (this process serves one test run)."""


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    young, older = gc.get_threshold()[:2]
    gc.set_threshold(young, older, FULL_COLLECTIONS_AFTER)
    trio.run(_run, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
