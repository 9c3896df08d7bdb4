"""Per-key WAL logs on real files (SPEC §6): append + fsync, read by position, rotation,
delivery checkpoints and segment deletion, crash recovery, gauges."""

from __future__ import annotations

import logging
import os
import struct
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from logstack._entry import LogEntry
from logstack._errors import WalError
from logstack._metrics import Metrics
from logstack._wal import (
    READ_CHUNK,
    KeyLog,
    Position,
    ReadResult,
    WalStore,
    recover_key_log,
    segment_name,
)
from logstack._wal_format import (
    FORMAT_VERSION,
    FRAME_OVERHEAD,
    HEADER_SIZE,
    Checkpoint,
    EntryBatch,
    FrameScan,
    IdempotencyRecord,
    Record,
    decode_record,
    encode_header,
    frame_bytes,
)
from logstack.testing._faults import file_size_limit

BIG = 1 << 40


# --------------------------------------------------------------------------- helpers


def entry(i: int, message: str = "hello") -> LogEntry:
    return LogEntry(
        timestamp_ns=1_700_000_000_000_000_000 + i,
        level="INFO",
        message=f"{message} {i}",
        service="svc",
        env="test",
        metadata={"i": i},
    )


def batch(i: int, n: int = 1, pad: int = 0) -> EntryBatch:
    return EntryBatch(f"req-{i}", 1_700_000_000_000_000_000 + i, [entry(i, "x" * pad)] * n)


def new_log(tmp_path: Path, segment_max_bytes: int = 1 << 20, name: str = "alpha") -> KeyLog:
    directory = tmp_path / name
    directory.mkdir(parents=True, exist_ok=True)
    keylog = KeyLog(name, directory, segment_max_bytes, Metrics())
    return keylog


def payload_size(record: Record) -> int:
    return len(frame_bytes(record)) - FRAME_OVERHEAD


def read_all(
    keylog: KeyLog, position: Position, **limits: int
) -> tuple[list[EntryBatch], Position]:
    """Read until no progress; return every batch and the final position."""
    out: list[EntryBatch] = []
    for _ in range(10_000):
        result = keylog.read(position, limits.get("max_entries", BIG), limits.get("max_bytes", BIG))
        out.extend(result.batches)
        if result.end == position:
            return out, position
        position = result.end
    raise AssertionError("read never stopped making progress")


def segment_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.seg"))


def file_records(path: Path) -> list[Record]:
    data = path.read_bytes()
    scan = FrameScan(memoryview(data)[HEADER_SIZE:], HEADER_SIZE)
    records = [decode_record(frame.payload) for frame in scan]
    assert scan.stop == len(data), f"{path.name} is damaged at {scan.stop}"
    return records


def append_raw(path: Path, data: bytes) -> None:
    """Write bytes behind the WAL's back, as a crash mid-write would leave them."""
    with open(path, "ab") as handle:
        handle.write(data)


def sample(metrics: Metrics, name: str, **labels: str) -> float | None:
    value: float | None = metrics.registry.get_sample_value(name, labels)
    return value


def corrupt_count(metrics: Metrics, token: str, kind: str) -> float:
    return sample(metrics, "wal_corrupt_records_total", token=token, kind=kind) or 0.0


def assert_gauges_match_disk(keylog: KeyLog) -> None:
    files = segment_files(keylog.directory)
    metrics = keylog.metrics
    assert sample(metrics, "wal_segments_active", token=keylog.name) == len(files)
    assert sample(metrics, "wal_disk_usage_bytes", token=keylog.name) == sum(
        f.stat().st_size for f in files
    )
    assert [s.path for s in keylog.segments] == files
    assert [s.size for s in keylog.segments] == [f.stat().st_size for f in files]


# --------------------------------------------------------------------------- append / read


async def test_append_sync_read_returns_batches_in_order(tmp_path: Path) -> None:
    keylog = new_log(tmp_path)
    batches = [batch(i, n=i + 1) for i in range(5)]
    ends = [keylog.append([b]) for b in batches]
    await keylog.sync()
    assert keylog.synced_end == ends[-1]
    assert ends == sorted(ends) and all(seq == 1 for seq, _ in ends)

    result = keylog.read(keylog.delivered, BIG, BIG)
    assert result.batches == batches
    assert result.end == ends[-1]
    assert result.payload_bytes == sum(payload_size(b) for b in batches)

    # Reading from any returned end continues right after that record.
    for i, end in enumerate(ends):
        rest = keylog.read(end, BIG, BIG)
        assert rest.batches == batches[i + 1 :]
        assert rest.end == ends[-1]
    assert not keylog.has_unread(ends[-1])
    assert keylog.has_unread(ends[0])
    keylog.close()


async def test_first_segment_layout_on_disk(tmp_path: Path) -> None:
    keylog = new_log(tmp_path)
    keylog.append([batch(1)])
    await keylog.sync()
    (path,) = segment_files(keylog.directory)
    assert path.name == segment_name(1) == "0000000000000001.seg"
    assert file_records(path) == [batch(1)]
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    keylog.close()


async def test_read_skips_checkpoints_and_idempotency_records(tmp_path: Path) -> None:
    keylog = new_log(tmp_path)
    end = keylog.append(
        [
            batch(1),
            IdempotencyRecord("h" * 64, "req-1", 1, 5),
            Checkpoint(0, HEADER_SIZE, 6),
            batch(2),
            Checkpoint(0, HEADER_SIZE, 7),
        ]
    )
    await keylog.sync()
    result = keylog.read(keylog.delivered, BIG, BIG)
    assert result.batches == [batch(1), batch(2)]
    assert result.end == end
    keylog.close()


async def four_batches_of_three(
    tmp_path: Path,
) -> tuple[KeyLog, list[EntryBatch], list[Position], Position]:
    """A synced log of four 3-entry batches: (log, batches, each batch's end, start)."""
    keylog = new_log(tmp_path)
    batches = [batch(i, n=3) for i in range(4)]
    ends = [keylog.append([b]) for b in batches]
    await keylog.sync()
    return keylog, batches, ends, keylog.delivered


async def test_read_limits(tmp_path: Path) -> None:
    keylog, batches, ends, start = await four_batches_of_three(tmp_path)
    size = payload_size(batches[0])

    by_entries = keylog.read(start, 5, BIG)  # 3 fit, 6 would not
    assert by_entries.batches == batches[:1] and by_entries.end == ends[0]
    assert keylog.read(start, 6, BIG).batches == batches[:2]
    assert keylog.read(start, 6, BIG).end == ends[1]

    by_bytes = keylog.read(start, BIG, 2 * size - 1)
    assert by_bytes.batches == batches[:1] and by_bytes.end == ends[0]
    exact = keylog.read(start, BIG, 2 * size)
    assert exact.batches == batches[:2] and exact.payload_bytes == 2 * size

    # Reading in small steps still returns everything, in order.
    stepped, end = read_all(keylog, start, max_entries=1)
    assert stepped == batches and end == ends[-1]
    stepped, end = read_all(keylog, start, max_bytes=1)
    assert stepped == batches and end == ends[-1]
    keylog.close()


async def test_stop_after_ends_a_read_early_within_the_limits(tmp_path: Path) -> None:
    keylog, batches, ends, start = await four_batches_of_three(tmp_path)
    early = keylog.read(start, BIG, BIG, stop_after=4)  # 3 is not yet enough, 6 is
    assert early.batches == batches[:2] and early.end == ends[1]
    # The hard limits still win, and the rest follows from where it stopped.
    assert keylog.read(start, 5, BIG, stop_after=4).batches == batches[:1]
    rest = keylog.read(early.end, BIG, BIG, stop_after=100)
    assert rest.batches == batches[2:] and rest.end == ends[-1]
    keylog.close()


async def test_at_least_one_returns_an_oversized_first_batch(tmp_path: Path) -> None:
    keylog = new_log(tmp_path)
    huge = batch(1, n=10, pad=500)
    end = keylog.append([huge, batch(2)])
    await keylog.sync()
    start = keylog.delivered

    result = keylog.read(start, 5, 100, at_least_one=True)
    assert result.batches == [huge]
    assert result.end[0] == 1 and result.end < end
    assert result.payload_bytes == payload_size(huge)

    refused = keylog.read(start, 5, 100, at_least_one=False)
    assert refused.batches == []
    assert refused.end == (1, HEADER_SIZE)  # nothing consumed
    assert refused.payload_bytes == 0

    # The oversized batch is not returned on top of others that already hold the limit.
    second = keylog.read(result.end, 5, 100, at_least_one=False)
    assert second.batches == [batch(2)] and second.end == end
    keylog.close()


async def test_appended_but_unsynced_data_is_invisible(tmp_path: Path) -> None:
    keylog = new_log(tmp_path)
    synced = keylog.append([batch(1)])
    await keylog.sync()
    pending = keylog.append([batch(2)])
    assert pending > synced and keylog.synced_end == synced

    result = keylog.read(keylog.delivered, BIG, BIG)
    assert result.batches == [batch(1)] and result.end == synced
    assert not keylog.has_unread(synced)
    assert keylog.read(synced, BIG, BIG) == ReadResult([], synced, 0)

    await keylog.sync()
    assert keylog.synced_end == pending and keylog.has_unread(synced)
    assert keylog.read(synced, BIG, BIG).batches == [batch(2)]
    keylog.close()


async def test_sync_without_appends_is_a_no_op(tmp_path: Path) -> None:
    keylog = new_log(tmp_path)
    await keylog.sync()  # nothing open yet
    assert segment_files(keylog.directory) == []
    keylog.append([batch(1)])
    await keylog.sync()
    end = keylog.synced_end
    await keylog.sync()
    assert keylog.synced_end == end
    keylog.close()


async def test_one_read_gathers_records_beyond_its_read_chunk_and_larger_ones(
    tmp_path: Path,
) -> None:
    """``read`` copies the segment ``READ_CHUNK`` bytes at a time: a read whose limits reach
    further goes on past the chunk, and a record larger than a chunk is read whole."""
    keylog = new_log(tmp_path, segment_max_bytes=64 << 20)
    small = [batch(i, pad=900) for i in range(400)]  # ~400 KiB: several chunks
    huge = batch(400, n=3, pad=READ_CHUNK)  # ~3 chunks on its own
    ends = [keylog.append([b]) for b in [*small, huge]]
    await keylog.sync()
    result = keylog.read(keylog.delivered, BIG, BIG)
    assert result.batches == [*small, huge]
    assert result.end == ends[-1]
    # Byte and entry limits still end the read where they did, chunk or not.
    limited = keylog.read(keylog.delivered, 250, BIG)
    assert limited.batches == small[:250] and limited.end == ends[249]
    cut = sum(payload_size(b) for b in small[:300])
    by_bytes = keylog.read(keylog.delivered, BIG, cut)
    assert by_bytes.batches == small[:300] and by_bytes.end == ends[299]
    keylog.close()


async def test_concurrent_syncs_each_return_only_once_durable(tmp_path: Path) -> None:
    """Group commit: a sync() that finds another fsync already in flight must wait for it
    (or run its own), never return before the data it covers is durable."""
    keylog = new_log(tmp_path)
    end = keylog.append([batch(1)])
    seen: list[Position] = []

    async def syncer() -> None:
        await keylog.sync()
        seen.append(keylog.synced_end)

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(syncer)
    assert seen == [end, end, end]
    keylog.close()


async def test_wait_changed_wakes_after_a_sync(tmp_path: Path) -> None:
    keylog = new_log(tmp_path)
    woke = trio.Event()

    async def waiter() -> None:
        await keylog.wait_changed()
        woke.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        keylog.append([batch(1)])
        await trio.testing.wait_all_tasks_blocked()
        assert not woke.is_set()  # not durable yet: nothing to read
        await keylog.sync()
        with trio.fail_after(5):
            await woke.wait()
    assert keylog.has_unread(keylog.delivered)

    # And again: a fresh waiter is woken by the next sync, not by the old one.
    woke = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert not woke.is_set()
        keylog.append([batch(2)])
        await keylog.sync()
        with trio.fail_after(5):
            await woke.wait()
    keylog.close()


# --------------------------------------------------------------------------- rotation


async def test_rotation_by_size_spreads_records_and_read_follows(tmp_path: Path) -> None:
    keylog = new_log(tmp_path, segment_max_bytes=4096)
    batches = [batch(i, pad=200) for i in range(60)]
    ends = []
    for b in batches:
        ends.append(keylog.append([b]))
        if len(ends) % 7 == 0:
            await keylog.sync()
    await keylog.sync()

    files = segment_files(keylog.directory)
    assert len(files) >= 4
    assert [f.name for f in files] == [segment_name(i) for i in range(1, len(files) + 1)]
    assert all(f.stat().st_size <= 4096 for f in files)
    assert len({seq for seq, _ in ends}) == len(files)
    rotations = sample(keylog.metrics, "segment_rotations_total", token="alpha", reason="size")
    assert rotations == len(files) - 1
    assert [s.sealed for s in keylog.segments] == [True] * (len(files) - 1) + [False]

    # Every segment after the first starts with the checkpoint current at rotation time.
    on_disk: list[EntryBatch] = []
    for index, path in enumerate(files):
        records = file_records(path)
        if index:
            assert isinstance(records[0], Checkpoint)
            assert (records[0].segment, records[0].offset) == (0, HEADER_SIZE)
        on_disk.extend(r for r in records if isinstance(r, EntryBatch))
    assert on_disk == batches

    # Reading crosses segment boundaries, in one go or one batch at a time.
    everything = keylog.read(keylog.delivered, BIG, BIG)
    assert everything.batches == batches and everything.end == ends[-1]
    stepped, end = read_all(keylog, keylog.delivered, max_entries=1)
    assert stepped == batches and end == ends[-1]
    for i in (0, 10, 33, 58):
        assert keylog.read(ends[i], BIG, BIG).batches == batches[i + 1 :]
    assert_gauges_match_disk(keylog)
    keylog.close()


async def test_rotate_writes_current_checkpoint_into_new_segment(tmp_path: Path) -> None:
    keylog = new_log(tmp_path)
    ends = [keylog.append([batch(i)]) for i in range(3)]
    await keylog.sync()
    await keylog.commit_delivered(ends[1])
    keylog.rotate("flush")
    await keylog.sync()

    first, second = segment_files(keylog.directory)
    assert keylog.segments[0].sealed and not keylog.segments[1].sealed
    (checkpoint,) = file_records(second)
    assert isinstance(checkpoint, Checkpoint)
    assert (checkpoint.segment, checkpoint.offset) == ends[1]
    assert sample(keylog.metrics, "segment_rotations_total", token="alpha", reason="flush") == 1
    # The sealed segment ends with the commit's checkpoint and is not deleted: batch 2 is
    # still undelivered.
    last = file_records(first)[-1]
    assert isinstance(last, Checkpoint) and (last.segment, last.offset) == ends[1]
    assert keylog.read(keylog.delivered, BIG, BIG).batches == [batch(2)]
    assert_gauges_match_disk(keylog)
    keylog.close()


async def test_oversized_record_gets_a_segment_of_its_own(tmp_path: Path) -> None:
    keylog = new_log(tmp_path, segment_max_bytes=4096)
    keylog.append([batch(0)])
    big = batch(1, n=4, pad=2000)
    end = keylog.append([big])
    keylog.append([batch(2)])
    await keylog.sync()
    assert end[0] == 2
    assert [len(file_records(f)) for f in segment_files(keylog.directory)] == [1, 2, 2]
    assert keylog.read(keylog.delivered, BIG, BIG).batches == [batch(0), big, batch(2)]
    keylog.close()


# --------------------------------------------------------------------------- delivery


async def test_commit_delivered_checkpoints_and_deletes_delivered_segments(
    tmp_path: Path,
) -> None:
    keylog = new_log(tmp_path, segment_max_bytes=4096)
    batches = [batch(i, pad=200) for i in range(60)]
    ends = [keylog.append([b]) for b in batches]
    await keylog.sync()
    files = segment_files(keylog.directory)
    assert len(files) >= 4
    assert_gauges_match_disk(keylog)

    # Delivered up to the middle of segment 3: segments 1 and 2 go, 3 stays.
    target = next(e for e in ends if e[0] == 3)
    await keylog.commit_delivered(target)
    assert keylog.delivered == target
    remaining = segment_files(keylog.directory)
    assert [f.name for f in remaining] == [f.name for f in files[2:]]
    assert not files[0].exists() and not files[1].exists()
    last = file_records(remaining[-1])[-1]
    assert isinstance(last, Checkpoint) and (last.segment, last.offset) == target
    assert_gauges_match_disk(keylog)
    assert keylog.read(keylog.delivered, BIG, BIG).batches == batches[ends.index(target) + 1 :]

    # Committing an older position changes nothing and writes nothing.
    size_before = remaining[-1].stat().st_size
    await keylog.commit_delivered(ends[0])
    assert keylog.delivered == target
    assert remaining[-1].stat().st_size == size_before

    # Everything delivered: every sealed segment goes, the active one never does.
    await keylog.commit_delivered(ends[-1])
    (active,) = segment_files(keylog.directory)
    assert active == keylog.active.path and not keylog.active.sealed
    # Only the commit's own checkpoint follows the delivered position.
    assert keylog.read(keylog.delivered, BIG, BIG) == ReadResult([], keylog.synced_end, 0)
    assert_gauges_match_disk(keylog)

    # The log keeps working after the deletions.
    end = keylog.append([batch(99)])
    await keylog.sync()
    assert keylog.read(keylog.delivered, BIG, BIG) == ReadResult(
        [batch(99)], end, payload_size(batch(99))
    )
    keylog.close()


async def test_commit_at_end_of_sealed_segment_deletes_it(tmp_path: Path) -> None:
    keylog = new_log(tmp_path)
    first_end = keylog.append([batch(1)])
    keylog.rotate("flush")
    keylog.append([batch(2)])
    await keylog.sync()
    # At the very end of sealed segment 1: the segment is wholly delivered, so it goes now.
    await keylog.commit_delivered(first_end)
    assert [f.name for f in segment_files(keylog.directory)] == [segment_name(2)]
    result = keylog.read(keylog.delivered, BIG, BIG)
    assert result.batches == [batch(2)]
    await keylog.commit_delivered(result.end)
    assert [f.name for f in segment_files(keylog.directory)] == [segment_name(2)]
    assert_gauges_match_disk(keylog)
    keylog.close()


# --------------------------------------------------------------------------- recovery


async def _write_then_crash(tmp_path: Path, *, deliver: int) -> tuple[Path, list[Any]]:
    """Write 6 batches, deliver the first ``deliver``; return the directory and the ends."""
    keylog = new_log(tmp_path, segment_max_bytes=4096)
    batches = [batch(i, pad=300) for i in range(6)]
    ends = [keylog.append([b]) for b in batches]
    await keylog.sync()
    if deliver:
        await keylog.commit_delivered(ends[deliver - 1])
    keylog.close()
    return keylog.directory, ends


async def test_recover_truncates_torn_tail_and_resumes_from_checkpoint(tmp_path: Path) -> None:
    directory, ends = await _write_then_crash(tmp_path, deliver=2)
    last = segment_files(directory)[-1]
    intact = last.stat().st_size
    half = frame_bytes(batch(100, pad=300))[:57]
    append_raw(last, half)

    metrics = Metrics()
    keylog = recover_key_log("alpha", directory, 4096, metrics)
    assert last.stat().st_size == intact
    assert corrupt_count(metrics, "alpha", "torn_tail") == 1
    assert corrupt_count(metrics, "alpha", "corrupt_tail") == 0
    (quarantined,) = (directory / "quarantine").iterdir()
    assert quarantined.read_bytes() == half
    assert quarantined.name == f"{last.stem}-{intact}.bin"

    # Already delivered records are not read again.
    assert keylog.delivered == ends[1]
    batches, end = read_all(keylog, keylog.delivered)
    assert batches == [batch(i, pad=300) for i in range(2, 6)]
    assert end == keylog.synced_end == (int(last.stem), intact)
    assert_gauges_match_disk(keylog)

    # The log is writable after recovery, and a second recovery finds nothing wrong.
    new_end = keylog.append([batch(7)])
    await keylog.sync()
    assert keylog.read(end, BIG, BIG).batches == [batch(7)]
    keylog.close()
    again = Metrics()
    keylog = recover_key_log("alpha", directory, 4096, again)
    assert (
        again.registry.get_sample_value(
            "wal_corrupt_records_total", {"token": "alpha", "kind": "torn_tail"}
        )
        is None
    )
    assert keylog.synced_end == new_end
    assert read_all(keylog, keylog.delivered)[0] == [batch(i, pad=300) for i in range(2, 6)] + [
        batch(7)
    ]
    keylog.close()


@pytest.mark.parametrize(
    "garbage",
    [b"\xff" * 40, b"\x00" * 4096, frame_bytes(batch(9))[:4] + b"\x00" * 200],
    ids=["absurd-length", "zero-filled", "bad-crc"],
)
async def test_recover_truncates_corrupt_tail(tmp_path: Path, garbage: bytes) -> None:
    directory, _ = await _write_then_crash(tmp_path, deliver=0)
    last = segment_files(directory)[-1]
    intact = last.stat().st_size
    append_raw(last, garbage)

    metrics = Metrics()
    keylog = recover_key_log("alpha", directory, 4096, metrics)
    assert last.stat().st_size == intact
    assert corrupt_count(metrics, "alpha", "corrupt_tail") == 1
    assert corrupt_count(metrics, "alpha", "undecodable") == 0
    assert (directory / "quarantine" / f"{last.stem}-{intact}.bin").read_bytes() == garbage
    batches, _ = read_all(keylog, keylog.delivered)
    assert batches == [batch(i, pad=300) for i in range(6)]
    keylog.close()


async def test_crc_valid_but_undecodable_record_is_skipped_not_fatal(tmp_path: Path) -> None:
    """A frame whose CRC holds but whose payload is no known record (say, a kind written by
    a newer version) is counted and skipped by recovery and by readers; it must not stop
    delivery of what follows (a reader that raises here crash-loops the service)."""
    keylog = new_log(tmp_path)
    keylog.append([batch(1)])
    payload = b"\x94\x09\x01\x02\x03"  # tag 9: unknown record kind
    keylog.append_bytes(struct.pack("<II", len(payload), zlib.crc32(payload)) + payload)
    end = keylog.append([batch(2)])
    await keylog.sync()

    batches, position = read_all(keylog, keylog.delivered)
    assert batches == [batch(1), batch(2)] and position == end
    keylog.close()

    metrics = Metrics()
    recovered = recover_key_log("alpha", keylog.directory, 1 << 20, metrics)
    assert corrupt_count(metrics, "alpha", "undecodable") == 1
    assert read_all(recovered, recovered.delivered) == ([batch(1), batch(2)], end)
    recovered.close()


async def _crash_with_batch_2_damaged(tmp_path: Path) -> Path:
    """``_write_then_crash`` (nothing delivered), then one bit flipped inside the payload
    of batch 2, in the middle of the only segment."""
    directory, ends = await _write_then_crash(tmp_path, deliver=0)
    (segment,) = segment_files(directory)
    data = bytearray(segment.read_bytes())
    data[ends[1][1] + FRAME_OVERHEAD + 10] ^= 0x04
    segment.write_bytes(bytes(data))
    return directory


async def test_corrupt_middle_record_is_skipped_and_later_records_survive(
    tmp_path: Path,
) -> None:
    directory = await _crash_with_batch_2_damaged(tmp_path)

    metrics = Metrics()
    keylog = recover_key_log("alpha", directory, 4096, metrics)
    batches, _ = read_all(keylog, keylog.delivered)
    expected = [batch(i, pad=300) for i in range(6) if i != 2]
    assert batches == expected
    assert sum(corrupt_count(metrics, "alpha", k) for k in ("corrupt_tail", "corrupt_record")) == 1
    assert any((directory / "quarantine").iterdir())
    keylog.close()


async def test_damage_in_the_middle_is_counted_once_not_at_every_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """It stays in its segment until that is delivered and deleted, and every start steps
    over it again: counted each time, the WAL damage alert fired again after every
    restart for damage already found, reported and kept aside."""
    directory = await _crash_with_batch_2_damaged(tmp_path)
    first = Metrics()
    recover_key_log("alpha", directory, 4096, first).close()
    assert corrupt_count(first, "alpha", "corrupt_record") == 1

    again = Metrics()
    with caplog.at_level(logging.INFO, logger="logstack.wal"):
        keylog = recover_key_log("alpha", directory, 4096, again)
    assert corrupt_count(again, "alpha", "corrupt_record") == 0
    assert "already in quarantine" in caplog.text
    assert len(list((directory / "quarantine").iterdir())) == 1
    batches, _ = read_all(keylog, keylog.delivered)
    assert batches == [batch(i, pad=300) for i in range(6) if i != 2]
    keylog.close()

    # Other damage at the same place is new damage.
    next((directory / "quarantine").iterdir()).write_bytes(b"something else")
    fresh = Metrics()
    recover_key_log("alpha", directory, 4096, fresh).close()
    assert corrupt_count(fresh, "alpha", "corrupt_record") == 1


async def test_what_the_wal_writes_is_private_to_the_service(tmp_path: Path) -> None:
    """Quarantined bytes (masked log lines) were 0644 and every directory 0755 under the
    usual umask: other local users could read them and list keys (a secrets audit)."""
    directory = await _crash_with_batch_2_damaged(tmp_path)
    keylog = recover_key_log("alpha", directory, 4096, Metrics())
    keylog.close()
    [kept] = (directory / "quarantine").iterdir()
    assert kept.stat().st_mode & 0o777 == 0o600
    assert (directory / "quarantine").stat().st_mode & 0o777 == 0o700
    store = WalStore(tmp_path / "root", 4096, Metrics())
    store.open()
    store.log_for("beta")
    assert (tmp_path / "root").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "root" / "beta").stat().st_mode & 0o777 == 0o700
    store.close()


@pytest.mark.parametrize(
    ("content", "kind"),
    [
        # The newest segment's header not on disk yet: the process stopped as it was
        # created (its header is synced with its first records), a tear, not damage.
        (b"", "torn_tail"),
        (b"LOGST", "torn_tail"),
        (b"\x00" * HEADER_SIZE, "torn_tail"),
        (b"NOTAWAL!" + b"\x00" * 40, "bad_header"),
        (b"LOGSTWAL\x07", "bad_header"),  # cut short, but not a prefix of our header
    ],
    ids=["empty", "short", "zeros", "bad-magic", "short-damaged"],
)
async def test_segment_with_bad_header_is_quarantined(
    tmp_path: Path, content: bytes, kind: str
) -> None:
    directory, ends = await _write_then_crash(tmp_path, deliver=1)
    files = segment_files(directory)
    bad = directory / segment_name(int(files[-1].stem) + 1)
    bad.write_bytes(content)

    metrics = Metrics()
    keylog = recover_key_log("alpha", directory, 4096, metrics)
    assert corrupt_count(metrics, "alpha", kind) == 1
    other = "bad_header" if kind == "torn_tail" else "torn_tail"
    assert corrupt_count(metrics, "alpha", other) == 0
    assert not bad.exists()
    assert (directory / "quarantine" / bad.name).read_bytes() == content
    assert segment_files(directory) == files
    assert keylog.delivered == ends[0]
    assert read_all(keylog, keylog.delivered)[0] == [batch(i, pad=300) for i in range(1, 6)]
    assert_gauges_match_disk(keylog)

    # Still writable: rotation can reuse the quarantined sequence number.
    keylog.rotate("flush")
    end = keylog.append([batch(50)])
    await keylog.sync()
    assert end[0] == int(bad.stem)
    assert keylog.read(ends[-1], BIG, BIG).batches == [batch(50)]
    keylog.close()

    # Restarting again is not a crash loop either.
    keylog = recover_key_log("alpha", directory, 4096, Metrics())
    assert read_all(keylog, keylog.delivered)[0][-1] == batch(50)
    keylog.close()


async def test_a_damaged_header_is_repaired_and_its_records_kept(tmp_path: Path) -> None:
    """A bit flipped in a segment's magic quarantined the whole file, acknowledged records
    included. Records carry their own length and CRC: the header is rewritten (the damaged
    one is kept in ``quarantine/``) and every record is delivered."""
    keylog = new_log(tmp_path, segment_max_bytes=4096)
    ends = [keylog.append([batch(i, pad=1500)]) for i in range(6)]
    await keylog.sync()
    await keylog.commit_delivered(ends[0])
    keylog.close()
    directory = keylog.directory
    files = segment_files(directory)
    assert len(files) >= 3
    victims = (files[1], files[-1])  # a sealed segment, and the one appended to
    for victim in victims:
        data = bytearray(victim.read_bytes())
        data[0] ^= 0x01
        victim.write_bytes(bytes(data))

    metrics = Metrics()
    keylog = recover_key_log("alpha", directory, 4096, metrics)
    assert corrupt_count(metrics, "alpha", "bad_header") == 2
    assert segment_files(directory) == files
    assert keylog.delivered == ends[0]
    assert read_all(keylog, keylog.delivered)[0] == [batch(i, pad=1500) for i in range(1, 6)]
    kept = {p.name: p.read_bytes() for p in (directory / "quarantine").iterdir()}
    assert sorted(kept) == [f"{victim.stem}-0.bin" for victim in victims]
    assert all(header.startswith(b"MOGSTWAL") for header in kept.values())
    assert_gauges_match_disk(keylog)
    end = keylog.append([batch(50)])  # the repaired active segment takes appends
    await keylog.sync()
    assert keylog.read(ends[-1], BIG, BIG).batches == [batch(50)]
    keylog.close()

    metrics = Metrics()  # repaired for good: nothing to report on the next start
    keylog = recover_key_log("alpha", directory, 4096, metrics)
    assert corrupt_count(metrics, "alpha", "bad_header") == 0
    assert read_all(keylog, keylog.delivered)[0][-1] == batch(50)
    assert end[0] == int(files[-1].stem)
    keylog.close()


async def test_a_header_of_another_format_version_is_not_repaired(tmp_path: Path) -> None:
    """Not damage: a WAL written by another release (here, a header naming the next
    version over frames whose records are not this format's); it is not read as ours."""
    directory, _ = await _write_then_crash(tmp_path, deliver=1)
    files = segment_files(directory)
    header = bytearray(files[-1].read_bytes()[:HEADER_SIZE])
    header[8:10] = (FORMAT_VERSION + 1).to_bytes(2, "little")
    payload = b"\x92\x63" + b"\xa5other" * 20  # msgpack [99, ...]: no record of ours
    frame = struct.pack("<II", len(payload), zlib.crc32(payload)) + payload
    other = bytes(header) + frame * 3
    files[-1].write_bytes(other)
    metrics = Metrics()
    keylog = recover_key_log("alpha", directory, 4096, metrics)
    assert corrupt_count(metrics, "alpha", "bad_header") == 1
    assert (directory / "quarantine" / files[-1].name).read_bytes() == other
    assert segment_files(directory) == files[:-1]
    keylog.close()


@pytest.mark.parametrize("version", [0, FORMAT_VERSION + 1, 9, 0x0101])
async def test_a_damaged_version_over_our_records_is_repaired(tmp_path: Path, version: int) -> None:
    """One flipped byte in the version field quarantined a whole segment of intact records
    (an audit: 50 acknowledged entries never delivered, the lag gauge at 0). Its first
    frame is one of ours, so the header is rewritten as for a damaged magic."""
    directory, ends = await _write_then_crash(tmp_path, deliver=1)
    files = segment_files(directory)
    data = bytearray(files[-1].read_bytes())
    data[8:10] = version.to_bytes(2, "little")
    files[-1].write_bytes(bytes(data))
    metrics = Metrics()
    keylog = recover_key_log("alpha", directory, 4096, metrics)
    assert corrupt_count(metrics, "alpha", "bad_header") == 1
    assert segment_files(directory) == files
    assert keylog.delivered == ends[0]
    assert read_all(keylog, keylog.delivered)[0] == [batch(i, pad=300) for i in range(1, 6)]
    [kept] = (directory / "quarantine").iterdir()
    assert kept.read_bytes() == bytes(data[:HEADER_SIZE])
    keylog.close()


async def test_an_empty_segment_that_is_not_the_newest_is_damage(tmp_path: Path) -> None:
    """Only the newest segment can be one the process stopped creating: an older one was
    followed by a newer, so its header had reached the disk."""
    directory, _ = await _write_then_crash(tmp_path, deliver=1)
    files = segment_files(directory)
    newer = directory / segment_name(int(files[-1].stem) + 1)
    newer.write_bytes(encode_header(time.time_ns()))
    files[0].write_bytes(b"")
    metrics = Metrics()
    keylog = recover_key_log("alpha", directory, 4096, metrics)
    assert corrupt_count(metrics, "alpha", "bad_header") == 1
    assert corrupt_count(metrics, "alpha", "torn_tail") == 0
    assert (directory / "quarantine" / files[0].name).read_bytes() == b""
    keylog.close()


async def test_bad_header_in_the_only_segment(tmp_path: Path) -> None:
    directory = tmp_path / "alpha"
    directory.mkdir()
    (directory / segment_name(1)).write_bytes(b"garbage")
    metrics = Metrics()
    keylog = recover_key_log("alpha", directory, 4096, metrics)
    assert keylog.segments == [] and corrupt_count(metrics, "alpha", "bad_header") == 1
    end = keylog.append([batch(1)])
    await keylog.sync()
    assert end == (1, keylog.active.size)
    assert keylog.read(keylog.delivered, BIG, BIG).batches == [batch(1)]
    keylog.close()


async def test_a_write_cut_short_leaves_no_partial_frame(tmp_path: Path) -> None:
    """Part of a frame stayed at the end of the segment: the next acknowledged records
    followed it at offsets the log did not know, and delivery stopped inside them (they
    came out only after a restart, or never, past a checkpoint taken there)."""
    keylog = new_log(tmp_path)
    keylog.append([batch(1, pad=300)])
    await keylog.sync()
    size = keylog.active.size
    with file_size_limit(size + 100), pytest.raises(WalError, match="short write"):
        keylog.append([batch(2, pad=300)])
    assert keylog.active.path.stat().st_size == keylog.active.size == size
    end = keylog.append([batch(3, pad=300)])
    await keylog.sync()
    assert read_all(keylog, keylog.delivered) == ([batch(1, pad=300), batch(3, pad=300)], end)
    await keylog.commit_delivered(end)
    keylog.close()

    metrics = Metrics()
    keylog = recover_key_log("alpha", keylog.directory, 1 << 20, metrics)
    assert keylog.delivered == end
    assert read_all(keylog, (1, HEADER_SIZE))[0] == [batch(1, pad=300), batch(3, pad=300)]
    assert not any(corrupt_count(metrics, "alpha", k) for k in ("corrupt_tail", "torn_tail"))
    keylog.close()


async def test_a_segment_header_cut_short_is_not_left_behind(tmp_path: Path) -> None:
    """The file stayed, so every later attempt to start the segment failed (it exists),
    even with room again, until a restart."""
    keylog = new_log(tmp_path)
    with file_size_limit(HEADER_SIZE // 2), pytest.raises(WalError):
        keylog.append([batch(1)])
    assert segment_files(keylog.directory) == []
    end = keylog.append([batch(2)])
    await keylog.sync()
    assert read_all(keylog, keylog.delivered) == ([batch(2)], end)
    keylog.close()


async def test_a_rotation_that_cannot_start_a_segment_leaves_a_log_that_recovers(
    tmp_path: Path,
) -> None:
    """The failed rotation raised a bare ``OSError`` (the stage's timer then crashed the
    service); and the segment the next append started lacked the live idempotency records
    and checkpoint a rotation writes first, so after a restart a retry was stored twice."""
    keylog = new_log(tmp_path)
    keylog.append([batch(1)])
    keylog.append([IdempotencyRecord("digest-1", "req-1", 1, time.time_ns())])
    keylog.idempotency["digest-1"] = ("req-1", 1, time.time_ns())
    await keylog.sync()
    blocker = keylog.directory / segment_name(2)
    blocker.mkdir()  # the next segment cannot be created (as on a full disk)
    with pytest.raises(WalError, match="cannot start a WAL segment"):
        keylog.rotate("manual")
    blocker.rmdir()  # room again: the next append starts the segment itself
    end = keylog.append([batch(2)])
    await keylog.sync()
    assert end[0] == 2
    assert [type(r).__name__ for r in file_records(blocker)][:2] == [
        "IdempotencyRecord",
        "Checkpoint",
    ]
    keylog.close()

    keylog = recover_key_log("alpha", keylog.directory, 1 << 20, Metrics())
    assert keylog.idempotency["digest-1"][:2] == ("req-1", 1)
    assert read_all(keylog, keylog.delivered)[0] == [batch(1), batch(2)]
    keylog.close()


async def test_a_segment_whose_first_records_are_cut_short_is_started_again(
    tmp_path: Path,
) -> None:
    """Its header written but not the idempotency records and checkpoint that follow: it
    is removed, so that the next append starts it again with them."""
    keylog = new_log(tmp_path)
    keylog.append([batch(1)])
    keylog.idempotency["digest-1"] = ("req-1", 1, time.time_ns())
    await keylog.sync()
    with file_size_limit(HEADER_SIZE + 10), pytest.raises(WalError):
        keylog.rotate("manual")
    assert [p.name for p in segment_files(keylog.directory)] == [segment_name(1)]
    keylog.append([batch(2)])
    await keylog.sync()
    records = file_records(keylog.directory / segment_name(2))
    assert [type(r).__name__ for r in records] == ["IdempotencyRecord", "Checkpoint", "EntryBatch"]
    assert_gauges_match_disk(keylog)
    keylog.close()


async def test_a_segment_cut_under_the_service_is_stepped_over_not_spun_on(
    tmp_path: Path,
) -> None:
    """Shorter than what was written (someone truncated it), a segment made ``read`` loop
    on the same empty read for good, freezing the service."""
    keylog = new_log(tmp_path)
    ends = [keylog.append([batch(i, pad=300)]) for i in range(3)]
    await keylog.sync()
    os.truncate(keylog.active.path, ends[0][1])
    batches, end = read_all(keylog, keylog.delivered)
    assert batches == [batch(0, pad=300)] and end == ends[-1]
    assert corrupt_count(keylog.metrics, "alpha", "missing") == 1
    keylog.close()


async def test_a_segment_deleted_under_the_service_is_stepped_over(tmp_path: Path) -> None:
    """Its ``FileNotFoundError`` stopped delivery, and the service with it."""
    keylog = new_log(tmp_path, segment_max_bytes=4096)
    ends = [keylog.append([batch(i, pad=1500)]) for i in range(6)]
    await keylog.sync()
    files = segment_files(keylog.directory)
    assert len(files) >= 3
    files[1].unlink()
    batches, end = read_all(keylog, keylog.delivered)
    assert end == ends[-1]
    assert batches[0] == batch(0, pad=1500) and batch(5, pad=1500) in batches
    assert len(batches) < 6
    assert corrupt_count(keylog.metrics, "alpha", "missing") == 1
    keylog.close()


async def test_recovery_starts_when_damage_cannot_be_kept_aside(tmp_path: Path) -> None:
    """Quarantine is best effort: a ``quarantine`` that is a file (or a full disk) made
    start-up fail, reported as an invalid configuration."""
    directory, _ = await _write_then_crash(tmp_path, deliver=0)
    last = segment_files(directory)[-1]
    intact = last.stat().st_size
    append_raw(last, frame_bytes(batch(100, pad=300))[:57])
    (directory / "quarantine").write_text("not a directory")
    metrics = Metrics()
    keylog = recover_key_log("alpha", directory, 4096, metrics)
    assert last.stat().st_size == intact
    assert corrupt_count(metrics, "alpha", "torn_tail") == 1
    assert read_all(keylog, keylog.delivered)[0] == [batch(i, pad=300) for i in range(6)]
    keylog.close()

    garbage = directory / segment_name(int(last.stem) + 1)
    garbage.write_bytes(b"not a segment at all")
    keylog = recover_key_log("alpha", directory, 4096, Metrics())  # skipped, kept in place
    assert garbage.exists()
    assert read_all(keylog, keylog.delivered)[0] == [batch(i, pad=300) for i in range(6)]
    keylog.rotate("manual")  # a new segment goes past the one left in place
    end = keylog.append([batch(50)])
    await keylog.sync()
    assert end[0] == int(garbage.stem) + 1
    keylog.close()


# --------------------------------------------------------------------------- store


async def test_wal_store_open_finds_every_key_directory(tmp_path: Path) -> None:
    root = tmp_path / "wal"
    store = WalStore(root, 4096, Metrics())
    store.open()
    assert store.logs == {}
    alpha = store.log_for("alpha")
    assert store.log_for("alpha") is alpha
    beta = store.log_for("beta")
    alpha.append([batch(1)])
    beta.append([batch(2), batch(3)])
    store.log_for("gamma")  # a key that never wrote
    await alpha.sync()
    await beta.sync()
    store.close()

    metrics = Metrics()
    reopened = WalStore(root, 4096, metrics)
    reopened.open()
    assert sorted(reopened.logs) == ["alpha", "beta", "gamma"]
    assert read_all(reopened.logs["alpha"], reopened.logs["alpha"].delivered)[0] == [batch(1)]
    assert read_all(reopened.logs["beta"], reopened.logs["beta"].delivered)[0] == [
        batch(2),
        batch(3),
    ]
    assert reopened.logs["gamma"].segments == []
    for keylog in reopened.logs.values():
        assert_gauges_match_disk(keylog)
    assert reopened.log_for("beta") is reopened.logs["beta"]
    assert "keys=3" in repr(reopened)
    reopened.close()


async def test_gauges_track_appends_rotation_and_deletion(tmp_path: Path) -> None:
    store = WalStore(tmp_path, 4096, Metrics())
    store.open()
    keylog = store.log_for("alpha")
    assert sample(store.metrics, "wal_segments_active", token="alpha") == 0
    assert sample(store.metrics, "wal_disk_usage_bytes", token="alpha") == 0
    ends = []
    for i in range(30):
        ends.append(keylog.append([batch(i, pad=250)]))
        await keylog.sync()
        assert_gauges_match_disk(keylog)
    assert len(keylog.segments) > 2
    await keylog.commit_delivered(ends[20])
    assert_gauges_match_disk(keylog)
    assert len(keylog.segments) < len({seq for seq, _ in ends})
    store.close()


# --------------------------------------------------------------------------- property

_batches = st.builds(
    batch,
    st.integers(min_value=0, max_value=10_000),
    n=st.integers(min_value=1, max_value=3),
    pad=st.integers(min_value=0, max_value=1500),
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(_batches, min_size=1, max_size=12), st.data())
def test_truncated_last_segment_recovers_to_a_prefix(batches: list[EntryBatch], data: Any) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "k"
        directory.mkdir()
        keylog = KeyLog("k", directory, 4096, Metrics())
        ends = [keylog.append([b]) for b in batches]
        keylog.sync_blocking()
        keylog.close()

        last = segment_files(directory)[-1]
        last_seq = int(last.stem)
        original = last.read_bytes()
        boundaries = {HEADER_SIZE} | {
            frame.end for frame in FrameScan(memoryview(original)[HEADER_SIZE:], HEADER_SIZE)
        }
        cut = data.draw(st.integers(min_value=0, max_value=len(original)), label="cut")
        garbage = data.draw(st.binary(max_size=48), label="garbage")
        last.write_bytes(original[:cut] + garbage)

        metrics = Metrics()
        recovered = recover_key_log("k", directory, 4096, metrics)
        got, end = read_all(recovered, recovered.delivered)
        expected = [
            b for b, (seq, e) in zip(batches, ends, strict=True) if seq < last_seq or e <= cut
        ]
        assert got == expected
        damage = sum(
            corrupt_count(metrics, "k", kind)
            for kind in ("torn_tail", "corrupt_tail", "bad_header", "undecodable")
        )
        if not garbage:
            assert (damage > 0) == (cut not in boundaries)
        if cut >= HEADER_SIZE:
            assert last.stat().st_size <= cut + len(garbage)
            assert last.stat().st_size >= max(b for b in boundaries if b <= cut)
        assert_gauges_match_disk(recovered)

        # Still writable, and the new record is what a reader sees next.
        extra = batch(424242)
        recovered.append([extra])
        recovered.sync_blocking()
        assert recovered.read(end, BIG, BIG).batches == [extra]
        recovered.close()
