"""Instructions per entry of each hot-path step, counted by valgrind (callgrind).

    python benchmarks/hot_path_instructions.py            # every step
    python benchmarks/hot_path_instructions.py delivery   # one step
    python benchmarks/hot_path_instructions.py --time     # µs per entry instead

This machine's speed moves by 20-30% from one minute to the next, so a change of a few
percent cannot be seen in wall-clock time. An instruction count can: it is the same for the
same code and inputs whatever else the machine is doing. Each step runs twice under
callgrind (with a fixed hash seed), with ``--repeat`` rounds and with the warm-up round only;
the difference, divided by the entries processed, is what one entry costs, start-up
excluded.

Steps, on the bench's own 100-line bodies (``logstack.bench``'s ``body_factory``):

- ``mask``: the raw-body screen (``KeyMasker.could_match``), default masking settings;
- ``validate``: the typed decode and per-entry checks (``validate_body``);
- ``wal``: the WAL record: each entry's Loki line rendered, the MessagePack encoding and
  frame (``line_batch``, ``encode_frame``);
- ``read``: the batcher reading a 1000-entry batch from a backlog of such records (page
  cache) in its steps of 200 entries (``KeyLog.read``: ``pread``, frame CRC, record decode);
- ``delivery``: a 1000-entry batch from WAL records to a protobuf+snappy push body (record
  decode, ``PushBatch.add``, ``prepare``);
- ``receiver``: the Loki stand-in's decoding of that push (``decode_push_request_raw``).

The counts leave out the HTTP stack, trio's scheduler and the fsync: see
``python -m logstack.bench`` for the whole.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

STEPS = ("mask", "validate", "wal", "read", "delivery", "receiver")
BACKLOG_BATCHES = 50
"""Delivery batches of records written for ``read``: reads see a backlog, as in a drain."""
READ_STEP = 200  # stages.batch.READ_STEP_ENTRIES
ENTRIES_PER_REQUEST = 100
REQUESTS_PER_BATCH = 10  # a delivery batch: 1000 entries, the SPEC's flush size
ENTRIES_PER_ROUND = REQUESTS_PER_BATCH * ENTRIES_PER_REQUEST


def workload(step: str, repeat: int, timed: bool = False) -> float:
    """Run ``step`` once to warm up, then ``repeat`` rounds of ``ENTRIES_PER_ROUND`` entries.

    With ``timed``, the rounds run five times and the best time per entry (seconds) is
    returned: instruction counts leave out what costs memory bandwidth (a ``memcpy`` is a
    handful of instructions however much it copies)."""
    from logstack._config import LokiSettings, MaskingSettings, SchemaSettings
    from logstack._delivery import PushBatch
    from logstack._loki_line import line_batch
    from logstack._loki_proto import decode_push_request_raw, decompress_snappy
    from logstack._masking import Masker
    from logstack._metrics import Metrics
    from logstack._schema_fast import validate_body
    from logstack._wal import KeyLog
    from logstack._wal_format import FRAME_OVERHEAD, decode_record, frame_bytes
    from logstack.bench._cli import body_factory

    make = body_factory(ENTRIES_PER_REQUEST)
    bodies = [make(i) for i in range(REQUESTS_PER_BATCH)]
    schema = SchemaSettings()
    validated = []
    for body in bodies:
        entries = validate_body(body, schema)
        assert entries is not None, "the bench's bodies must take the fast path"
        validated.append(entries)
    batches = [line_batch("0" * 32, 1, entries) for entries in validated]
    records = [frame_bytes(batch)[FRAME_OVERHEAD:] for batch in batches]
    masker = Masker(MaskingSettings()).for_key("bench")
    loki = LokiSettings()

    def to_push(wal_batches: list[Any]) -> PushBatch:
        push = PushBatch("bench", None, (0, 0), (0, 0), 1)
        for batch in wal_batches:
            push.add(batch)
        push.prepare(loki)
        return push

    def delivery() -> None:
        to_push([decode_record(record) for record in records])

    def read() -> None:
        position, entries, size = keylog.delivered, 0, 0
        while entries < ENTRIES_PER_ROUND:
            result = keylog.read(
                position, ENTRIES_PER_ROUND - entries, (1 << 20) - size, stop_after=READ_STEP
            )
            position = result.end
            entries += sum(len(batch.entries) for batch in result.batches)
            size += result.payload_bytes

    prepared = to_push(batches).prepared
    assert prepared is not None
    push_body = decompress_snappy(prepared[0][0][1])

    runs: dict[str, Callable[[], object]] = {  # each: ENTRIES_PER_ROUND entries
        "mask": lambda: [masker.could_match(b) for b in bodies],
        "validate": lambda: [validate_body(b, schema) for b in bodies],
        "wal": lambda: [frame_bytes(line_batch("0" * 32, 1, e)) for e in validated],
        "read": read,
        "delivery": delivery,
        "receiver": lambda: decode_push_request_raw(push_body),
    }
    run = runs[step]
    backlog = tempfile.mkdtemp(prefix="logstack-hot-path-")
    keylog = KeyLog("bench", Path(backlog), 1 << 30, Metrics())
    if step == "read":  # only this step reads the backlog: the others do not pay for it
        for _ in range(BACKLOG_BATCHES):
            for batch in batches:
                keylog.append([batch])
        keylog.sync_blocking()
    best = math.inf
    try:
        run()
        for _ in range(5 if timed else 1):
            started = time.perf_counter()
            for _ in range(repeat):
                run()
            best = min(best, time.perf_counter() - started)
    finally:
        keylog.close()
        shutil.rmtree(backlog)
    return best / (repeat * ENTRIES_PER_ROUND) if repeat else 0.0


def count(step: str, repeat: int) -> int:
    """Instructions callgrind counts for the whole process running ``workload``."""
    out = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            __file__,
            "--workload",
            step,
            "--repeat",
            str(repeat),
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "0"},  # the same dict layouts every run
    )
    found = re.search(r"Collected : (\d+)", out.stderr)
    if found is None:
        raise RuntimeError(f"callgrind printed no total:\n{out.stderr[-2000:]}")
    return int(found.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("steps", nargs="*", help=f"any of {', '.join(STEPS)} (default: all)")
    parser.add_argument("--repeat", type=int, default=20, help="measured rounds per step")
    parser.add_argument(
        "--time",
        action="store_true",
        help="wall-clock µs per entry (best of five runs) instead of instructions",
    )
    parser.add_argument("--workload", choices=STEPS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.workload:
        workload(args.workload, args.repeat)
        return 0
    unknown = set(args.steps) - set(STEPS)
    if unknown:
        parser.error(f"unknown step(s): {', '.join(sorted(unknown))}; steps: {', '.join(STEPS)}")
    if args.time:
        print(f"{'step':<10} {'µs per entry (best of 5)':>24}")
        for step in args.steps or STEPS:
            print(f"{step:<10} {workload(step, args.repeat, timed=True) * 1e6:>24.3f}", flush=True)
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    print(f"{'step':<10} {'instructions per entry':>24}")
    for step in args.steps or STEPS:
        per_entry = (count(step, args.repeat) - count(step, 0)) / (args.repeat * ENTRIES_PER_ROUND)
        print(f"{step:<10} {per_entry:>24,.0f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
