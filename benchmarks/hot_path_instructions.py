"""Instructions per entry of each hot-path step, counted by valgrind (callgrind).

    python benchmarks/hot_path_instructions.py            # every step
    python benchmarks/hot_path_instructions.py delivery   # one step

This machine's speed moves by 20-30% from one minute to the next, so a change of a few
percent cannot be seen in wall-clock time. An instruction count can: it is the same for the
same code and inputs whatever else the machine is doing. Each step runs twice under
callgrind (with a fixed hash seed), with ``--repeat`` rounds and with the warm-up round only;
the difference, divided by the entries processed, is what one entry costs, start-up
excluded.

Steps, on the bench's own 100-line bodies (``logstack.bench``'s ``body_factory``):

- ``mask``: the raw-body screen (``KeyMasker.could_match``), default masking settings;
- ``validate``: the typed decode and per-entry checks (``validate_body``);
- ``wal``: the WAL record's MessagePack encoding and frame (``encode_frame``);
- ``delivery``: a 1000-entry batch from WAL records to a protobuf+snappy push body (record
  decode, ``PushBatch.add``, ``prepare``);
- ``receiver``: the Loki stand-in's decoding of that push (``decode_push_request_raw``).

The counts leave out the HTTP stack, trio's scheduler and the fsync: see
``python -m logstack.bench`` for the whole.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from typing import Any

STEPS = ("mask", "validate", "wal", "delivery", "receiver")
ENTRIES_PER_REQUEST = 100
REQUESTS_PER_BATCH = 10  # a delivery batch: 1000 entries, the SPEC's flush size
ENTRIES_PER_ROUND = REQUESTS_PER_BATCH * ENTRIES_PER_REQUEST


def workload(step: str, repeat: int) -> None:
    """Run ``step`` once to warm up, then ``repeat`` rounds of ``ENTRIES_PER_ROUND`` entries."""
    from logstack._config import LokiSettings, MaskingSettings, SchemaSettings
    from logstack._delivery import PushBatch
    from logstack._loki_proto import decode_push_request_raw, decompress_snappy
    from logstack._masking import Masker
    from logstack._schema_fast import validate_body
    from logstack._wal_format import FRAME_OVERHEAD, EntryBatch, decode_record, frame_bytes
    from logstack.bench._cli import body_factory

    make = body_factory(ENTRIES_PER_REQUEST)
    bodies = [make(i) for i in range(REQUESTS_PER_BATCH)]
    schema = SchemaSettings()
    batches = []
    for body in bodies:
        entries = validate_body(body, schema)
        assert entries is not None, "the bench's bodies must take the fast path"
        batches.append(EntryBatch("0" * 32, 1, entries))
    records = [frame_bytes(batch)[FRAME_OVERHEAD:] for batch in batches]
    masker = Masker(MaskingSettings()).for_key("bench")
    loki = LokiSettings()

    def to_push(wal_batches: list[Any]) -> PushBatch:
        push = PushBatch("bench", None, (0, 0), (0, 0), [], 1)
        for batch in wal_batches:
            push.add(batch)
        push.prepare(loki)
        return push

    def delivery() -> None:
        to_push([decode_record(record) for record in records])

    prepared = to_push(batches).prepared
    assert prepared is not None
    push_body = decompress_snappy(prepared[0][0][1])

    runs: dict[str, Callable[[], object]] = {  # each: ENTRIES_PER_ROUND entries
        "mask": lambda: [masker.could_match(b) for b in bodies],
        "validate": lambda: [validate_body(b, schema) for b in bodies],
        "wal": lambda: [frame_bytes(b) for b in batches],
        "delivery": delivery,
        "receiver": lambda: decode_push_request_raw(push_body),
    }
    run = runs[step]
    for _ in range(repeat + 1):
        run()


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
    parser.add_argument("--workload", choices=STEPS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.workload:
        workload(args.workload, args.repeat)
        return 0
    unknown = set(args.steps) - set(STEPS)
    if unknown:
        parser.error(f"unknown step(s): {', '.join(sorted(unknown))}; steps: {', '.join(STEPS)}")
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
