"""The wal_append stage: group commit, quotas, idempotency, ADR-002 rotation on the clock."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from logstack._config import ApiKey, load_settings
from logstack._context import StageContext
from logstack._entry import LogEntry
from logstack._envelope import Accepted, Envelope
from logstack._errors import IdempotencyKeyReusedError, QuotaExceededError, UnavailableError
from logstack._loki_line import line_batch
from logstack._wal import WalStore, segment_name
from logstack._wal_format import LineBatch
from logstack.testing._faults import file_size_limit
from stages.wal_append import WalAppendStage, idempotency_hash


async def fsync_inline(fds: list[int]) -> None:
    for fd in fds:
        os.fdatasync(fd)


ENTRY = LogEntry(1_700_000_000_000_000_000, "INFO", "hello", "svc", "prod")


class Harness:
    def __init__(self, stage: WalAppendStage, head: trio.MemorySendChannel[Any]) -> None:
        self.stage = stage
        self.head = head
        self.context: StageContext = stage.context
        self.store: WalStore = stage.store

    async def post(
        self, key: str = "alpha", n: int = 1, idempotency_key: str | None = None
    ) -> Accepted | Exception:
        envelope = Envelope(f"req-{trio.current_time()}", None, b"", idempotency_key)
        envelope.key = ApiKey(name=key)
        envelope.entries = [ENTRY] * n
        await self.head.send([envelope])
        return await envelope.reply.wait()

    def rotations(self, reason: str, key: str = "alpha") -> float:
        value = self.context.metrics.registry.get_sample_value(
            "segment_rotations_total", {"token": key, "reason": reason}
        )
        return value or 0.0


@asynccontextmanager
async def running(tmp_path: Path, clock: Any = None, **wal: Any) -> AsyncIterator[Harness]:
    env = {f"LOGSTACK_WAL_{k.upper()}": str(v) for k, v in wal.items()}
    env["LOGSTACK_WAL_ROOT_PATH"] = str(tmp_path / "wal")
    settings = load_settings(env=env)
    context = StageContext(settings)
    store = WalStore(settings.wal.root_path, settings.wal.segment_max_bytes, context.metrics)
    if clock is not None:
        # On the autojump clock, time jumps whenever every task waits, also while an
        # fsync thread runs: fsync inline (still a real fsync) to keep timers exact.
        store.clock = trio.current_time
        store.fsync_runner = fsync_inline
    store.open()
    context.services["wal"] = store
    stage = WalAppendStage(WalAppendStage.Config(), context)
    head_send, head_receive = trio.open_memory_channel[Any](16)
    out_send, out_receive = trio.open_memory_channel[Any](1000)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stage.run, head_receive, out_send)
        try:
            yield Harness(stage, head_send)
        finally:
            await head_send.aclose()
    await out_receive.aclose()
    store.close()


async def test_ack_after_fsync_and_hint_downstream(tmp_path: Path) -> None:
    async with running(tmp_path) as h:
        answer = await h.post(n=3)
        assert isinstance(answer, Accepted) and answer.entries_accepted == 3
        keylog = h.store.logs["alpha"]
        assert keylog.synced_end == keylog.end  # durable before the answer
        value = h.context.metrics.registry.get_sample_value(
            "logs_ingested_total", {"token": "alpha"}
        )
        assert value == 3


async def test_a_written_request_lets_go_of_its_entries_before_its_fsync(tmp_path: Path) -> None:
    """Entries are freed once written (cheaper while their encoding has them in the CPU's
    caches); the answer after the fsync still counts them, and the WAL holds them."""
    async with running(tmp_path) as h:
        envelope = Envelope("req-free", None, b"")
        envelope.key = ApiKey(name="alpha")
        envelope.entries = [ENTRY] * 4
        envelope.raw_entries = [{"message": "hello"}] * 4
        await h.head.send([envelope])
        await trio.testing.wait_all_tasks_blocked()  # written; its fsync may still run
        assert envelope.entries is None and envelope.raw_entries is None
        answer = await envelope.reply.wait()
        assert isinstance(answer, Accepted) and answer.entries_accepted == 4
        keylog = h.store.logs["alpha"]
        (record,) = keylog.read(keylog.delivered, 100, 1 << 20).batches
        assert isinstance(record, LineBatch) and record.request_id == "req-free"
        assert record.entries == line_batch("req-free", 0, [ENTRY] * 4).entries
        assert record.entries[0].line == b'{"message":"hello"}'


async def test_requests_are_written_while_a_group_is_being_fsynced(tmp_path: Path) -> None:
    """The next group is on disk (not yet durable) when the current group's fsync ends, so
    its own fsync starts at once; each request is still answered only after an fsync that
    began once it was written."""
    async with running(tmp_path) as h:
        gate = trio.Event()
        fsyncs: list[int] = []
        real_runner = h.store.fsync_runner

        async def gated(fds: list[int]) -> None:
            fsyncs.append(h.store.logs["alpha"].end[1])  # what this fsync covers
            await gate.wait()
            await real_runner(fds)

        h.store.fsync_runner = gated
        for log in h.store.logs.values():
            log.fsync_runner = gated
        answers: list[Accepted | Exception] = []

        async def post(n: int) -> None:
            answers.append(await h.post(n=n))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(post, 1)
            with trio.fail_after(5):
                while not fsyncs:  # the first group's fsync has started, waits at the gate
                    await trio.sleep(0.001)
                keylog = h.store.logs["alpha"]
                first_end = keylog.end
                nursery.start_soon(post, 2)
                while keylog.end == first_end:  # written while that fsync still runs
                    await trio.sleep(0.001)
            assert not answers and len(fsyncs) == 1
            gate.set()
        assert [a.entries_accepted for a in answers if isinstance(a, Accepted)] == [1, 2]
        assert fsyncs == [first_end[1], keylog.end[1]]  # the second fsync covered the second
        assert keylog.synced_end == keylog.end


async def test_concurrent_requests_share_fsyncs(tmp_path: Path) -> None:
    async with running(tmp_path) as h:
        async with trio.open_nursery() as nursery:
            for i in range(50):
                nursery.start_soon(h.post, "alpha" if i % 2 else "beta")
        fsyncs = h.context.metrics.registry.get_sample_value("wal_fsyncs_total")
        assert fsyncs is not None and fsyncs < 50, fsyncs  # group commit: fewer fsyncs


async def test_idempotent_retry_is_answered_once_and_stored_once(tmp_path: Path) -> None:
    async with running(tmp_path) as h:
        first = await h.post(n=2, idempotency_key="abc")
        again = await h.post(n=2, idempotency_key="abc")
        other_key = await h.post(key="beta", n=2, idempotency_key="abc")
        assert isinstance(first, Accepted) and isinstance(again, Accepted)
        assert again == first
        assert isinstance(other_key, Accepted) and other_key.request_id != first.request_id
        keylog = h.store.logs["alpha"]
        batches = keylog.read(keylog.delivered, 10_000, 1 << 30).batches
        assert sum(len(b.entries) for b in batches) == 2


async def test_an_idempotency_key_reused_for_other_entries_is_refused_not_answered_202(
    tmp_path: Path,
) -> None:
    """Once answered with the first request's 202, and nothing of the second was stored."""
    async with running(tmp_path) as h:
        first = await h.post(n=1, idempotency_key="k")
        reused = await h.post(n=2, idempotency_key="k")
        assert isinstance(first, Accepted)
        assert isinstance(reused, IdempotencyKeyReusedError) and reused.status == 422
        assert reused.details == {"request_id": first.request_id, "entries_accepted": 1}
        assert await h.post(n=1, idempotency_key="k") == first  # the real retry still is
        keylog = h.store.logs["alpha"]
        batches = keylog.read(keylog.delivered, 10_000, 1 << 30).batches
        assert sum(len(b.entries) for b in batches) == 1
    # After a restart the digest is read back from the WAL with the key.
    async with running(tmp_path) as h:
        assert isinstance(await h.post(n=2, idempotency_key="k"), IdempotencyKeyReusedError)
        assert await h.post(n=1, idempotency_key="k") == first


async def test_an_idempotency_record_without_a_digest_takes_any_retry_as_the_same(
    tmp_path: Path,
) -> None:
    """Records written before the digest was kept cannot tell: the first answer, as before."""
    async with running(tmp_path) as h:
        keylog = h.store.log_for("alpha")
        keylog.idempotency[idempotency_hash("alpha", "old")] = ("req-old", 3, time.time_ns(), "")
        assert await h.post(n=5, idempotency_key="old") == Accepted(3, "req-old")


async def test_quota_rejects_one_key_only(tmp_path: Path) -> None:
    async with running(tmp_path, quota_bytes=8192) as h:
        answers = [await h.post(n=20) for _ in range(30)]
        assert any(isinstance(a, QuotaExceededError) for a in answers)
        refused = next(a for a in answers if isinstance(a, QuotaExceededError))
        assert refused.retry_after is not None and refused.retry_after >= 1
        # Nothing refused costs WAL space: the log stopped growing at the soft limit.
        assert h.store.logs["alpha"].disk_bytes < 8192
        assert isinstance(await h.post(key="beta"), Accepted)


async def test_the_quota_counts_the_backlog_not_what_was_delivered(tmp_path: Path) -> None:
    """Delivered records stay in the active segment until it rotates (minutes): counted
    on disk, they kept a key that Loki was up to date with at 429 for that long."""
    async with running(tmp_path, quota_bytes=8192) as h:
        while not isinstance(await h.post(n=20), QuotaExceededError):
            pass
        keylog = h.store.logs["alpha"]
        await keylog.commit_delivered(keylog.end)  # Loki took it all; nothing rotated
        assert keylog.undelivered_bytes() == 0 and len(keylog.segments) == 1
        assert keylog.disk_bytes >= 8192 * 0.8
        assert isinstance(await h.post(n=20), Accepted)
        answers = [await h.post(n=20) for _ in range(30)]  # a new backlog hits it again
        refused = next(a for a in answers if isinstance(a, QuotaExceededError))
        assert refused.details["undelivered_bytes"] >= 8192 * 0.8


async def test_disk_pressure_rejects_everyone_with_503(tmp_path: Path) -> None:
    async with running(tmp_path, min_free_disk_ratio=0.999) as h:
        for key in ("alpha", "beta"):
            answer = await h.post(key=key)
            assert isinstance(answer, UnavailableError)
            assert answer.reason == "disk_pressure" and answer.retry_after


async def test_fsync_interval_mode_acks_before_the_fsync(tmp_path: Path) -> None:
    async with running(tmp_path, fsync="interval", fsync_interval_ms=50) as h:
        assert isinstance(await h.post(), Accepted)
        keylog = h.store.logs["alpha"]
        with trio.fail_after(5):
            while keylog.synced_end < keylog.end:
                await trio.sleep(0.01)


# --------------------------------------------------------------- ADR-002 rotation
@pytest.mark.parametrize(
    ("wal", "wait_s", "reason"),
    [
        # Active ≥ 5 min and ≥ 64 KiB (here: any size) → "age".
        ({"segment_min_rotate_bytes": 0}, 300, "age"),
        # Too small for age rotation, but unwritten for 1 h → "idle".
        ({"segment_min_rotate_bytes": 1 << 30}, 3600, "idle"),
    ],
)
async def test_rotation_on_the_clock(
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    wal: dict[str, Any],
    wait_s: float,
    reason: str,
) -> None:
    async with running(tmp_path, clock=autojump_clock, **wal) as h:
        await h.post()
        await trio.sleep(wait_s - 3)
        assert h.rotations(reason) == 0
        await trio.sleep(5)
        assert h.rotations(reason) == 1
        keylog = h.store.logs["alpha"]
        assert len(keylog.segments) == 2 and keylog.segments[0].sealed
        # Nothing new since: no further rotation of the fresh segment.
        await trio.sleep(wait_s * 3)
        assert h.rotations(reason) == 1


async def test_forced_rotation_of_a_busy_small_segment(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(tmp_path, clock=autojump_clock, segment_min_rotate_bytes=1 << 30) as h:
        # A write every 10 minutes: never idle, never big enough for age rotation.
        for _ in range(6 * 6 - 1):
            await h.post()
            await trio.sleep(600)
        assert h.rotations("forced") == 0
        await h.post()
        await trio.sleep(700)
        assert h.rotations("forced") == 1
        assert h.rotations("idle") == 0 and h.rotations("age") == 0


async def test_a_retry_of_a_request_whose_write_failed_is_stored(tmp_path: Path) -> None:
    """The idempotency key was recorded before the write: after a full disk refused the
    request, its retry got "accepted" with the refused request's id, and nothing was
    stored. Readiness also stayed "not writable" until some ingest succeeded."""
    async with running(tmp_path) as h:
        # A large first request keeps the log files of this test below the size limit.
        assert isinstance(await h.post(n=5000), Accepted)
        keylog = h.store.logs["alpha"]
        with file_size_limit(keylog.active.size + 100):  # the disk fills up mid-write
            refused = await h.post(n=20, idempotency_key="order-42")
        assert isinstance(refused, UnavailableError)
        assert not h.context.health.wal_writable
        with trio.fail_after(10):  # it says so by itself once the WAL takes writes
            while not h.context.health.wal_writable:
                await trio.sleep(0.1)
        retried = await h.post(n=20, idempotency_key="order-42")
        assert isinstance(retried, Accepted) and retried.entries_accepted == 20
        again = await h.post(n=20, idempotency_key="order-42")
        assert again == retried  # stored once from then on
        entries = [
            e for b in keylog.read(keylog.delivered, 1 << 30, 1 << 40).batches for e in b.entries
        ]
        assert len(entries) == 5020


async def test_a_rotation_that_fails_on_the_clock_does_not_stop_the_stage(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The timer's rotation error escaped the stage: the service stopped (exit 1)."""
    async with running(tmp_path, clock=autojump_clock, segment_idle_s=60) as h:
        await h.post()
        keylog = h.store.logs["alpha"]
        blocker = keylog.directory / segment_name(keylog.active.seq + 1)
        blocker.mkdir()  # the next segment cannot be created, as on a full disk
        await trio.sleep(65)
        assert h.rotations("idle") == 0
        assert not h.context.health.wal_writable
        assert "cannot start a WAL segment" in (h.context.health.wal_last_error or "")
        blocker.rmdir()
        assert isinstance(await h.post(), Accepted)  # the append starts the segment
        assert len(keylog.segments) == 2
        await trio.sleep(2)
        assert h.context.health.wal_writable


async def test_one_key_that_cannot_write_keeps_the_wal_unready_until_it_can(
    tmp_path: Path,
) -> None:
    """The probe wrote in the WAL root, which still took writes, and another key's fsync
    cleared the failure too: ``/readyz`` flapped between 200 and 503 while every request
    of the broken key got a 503 (an audit, with the key's directory made read-only).
    Real time: the probe runs in a thread, which the autojump clock would race past."""
    async with running(tmp_path, segment_idle_s=0.5) as h:
        await h.post()
        keylog = h.store.logs["alpha"]
        directory = keylog.directory
        away = directory.with_name("alpha.away")
        directory.rename(away)
        directory.write_bytes(b"")  # its path is a file now: nothing can be created in it
        health = h.context.health
        with trio.fail_after(10):  # the idle rotation fails
            while "alpha" not in health.wal_failing:
                await trio.sleep(0.05)
        for _ in range(3):  # probes (one a second), and another key's writes and fsyncs
            assert isinstance(await h.post(key="bravo"), Accepted)
            await trio.sleep(0.7)
            assert not health.wal_writable, "cleared while alpha still cannot write"
        directory.unlink()
        away.rename(directory)
        with trio.fail_after(10):  # the next probe finds alpha's directory writable again
            while not health.wal_writable:
                await trio.sleep(0.05)
        assert health.wal_failing == {}
        assert isinstance(await h.post(), Accepted)


async def test_size_rotation(tmp_path: Path) -> None:
    async with running(tmp_path, segment_max_bytes=4096) as h:
        for _ in range(60):
            await h.post(n=5)
        assert h.rotations("size") >= 3
        keylog = h.store.logs["alpha"]
        assert all(s.size <= 4096 for s in keylog.segments)


async def test_rotation_deletes_a_fully_delivered_segment(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    async with running(tmp_path, clock=autojump_clock, segment_min_rotate_bytes=0) as h:
        await h.post(n=2)
        keylog = h.store.logs["alpha"]
        first_file = keylog.segments[0].path
        result = keylog.read(keylog.delivered, 10_000, 1 << 30)
        await keylog.commit_delivered(result.end)
        assert first_file.exists()  # still the active segment
        await trio.sleep(302)
        assert h.rotations("age") == 1
        assert not first_file.exists()
        assert [s.seq for s in keylog.segments] == [2]
