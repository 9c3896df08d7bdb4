"""The batcher: the batches it cuts from a key's WAL, and how often long delivery work
gives the event loop back."""

from __future__ import annotations

import json
import time
from pathlib import Path

import trio
import trio.lowlevel

from logstack._config import load_settings
from logstack._context import StageContext
from logstack._delivery import PushBatch
from logstack._entry import LogEntry
from logstack._loki_line import line_batch
from logstack._metrics import Metrics
from logstack._stage import StageConfig
from logstack._wal import KeyLog
from logstack._wal_format import EntryBatch
from stages.batch import BUSY_STEP_ENTRIES, READ_STEP_ENTRIES, BatchStage, Pacer


class _StepCounter(trio.abc.Instrument):
    """Counts the steps of one task: each checkpoint it passes starts a new one."""

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.steps += 1


async def _checkpoints(context: StageContext, record_sizes: list[int]) -> int:
    counter = _StepCounter(trio.lowlevel.current_task())
    trio.lowlevel.add_instrument(counter)
    try:
        pacer = Pacer(context)
        for size in record_sizes:
            await pacer.worked(size)
    finally:
        trio.lowlevel.remove_instrument(counter)
    return counter.steps


async def test_the_pacer_pauses_after_each_record_while_requests_are_served() -> None:
    context = StageContext(load_settings(env={}))
    records = [100] * 10  # ten requests of 100 entries: 1000, one push
    assert await _checkpoints(context, records) == 1000 // READ_STEP_ENTRIES
    context.requests_in_flight = 1
    assert BUSY_STEP_ENTRIES <= 100
    assert await _checkpoints(context, records) == 10


async def test_the_read_step_follows_the_requests_in_flight() -> None:
    context = StageContext(load_settings(env={}))
    assert Pacer.step_for(context) == READ_STEP_ENTRIES
    context.requests_in_flight = 3
    assert Pacer.step_for(context) == BUSY_STEP_ENTRIES


def _record(i: int, entries: int) -> EntryBatch:
    return EntryBatch(
        f"req-{i}",
        time.time_ns(),
        [
            LogEntry(
                1_700_000_000_000_000_000 + i * 1000 + j,
                "ERROR" if j % 7 == 0 else "INFO",
                f"request {i} line {j}",
                "checkout",
                "prod",
                {"region": "eu"} if j % 2 else {},
                metadata={"i": i, "j": j},
            )
            for j in range(entries)
        ],
    )


async def test_collect_cuts_batches_at_the_entry_limit_equal_to_converting_the_records(
    tmp_path: Path,
) -> None:
    """Each record is converted as it is read; the batch must be the one converting the
    same records afterwards gives, over the same WAL range, cut at ``batch_max_entries``.
    The WAL spans an upgrade: every other record is an ``EntryBatch``, as written before
    ``LineBatch``; the reference converts them all as ``EntryBatch``es."""
    context = StageContext(load_settings(env={"LOGSTACK_LOKI_BATCH_MAX_WAIT_S": "0.05"}))
    stage = BatchStage(StageConfig(), context)
    loki = context.settings.loki
    keylog = KeyLog("alpha", tmp_path / "alpha", 1 << 20, Metrics())
    keylog.directory.mkdir()
    records = [_record(i, 100) for i in range(12)]  # 1,200 entries: two batches
    written = [
        line_batch(r.request_id, r.received_ns, r.entries) if i % 2 else r
        for i, r in enumerate(records)
    ]
    ends = [keylog.append([record]) for record in written]
    await keylog.sync()
    assert loki.batch_max_entries == 1000

    first, end = await stage._collect(keylog, keylog.delivered, loki)
    assert first is not None
    assert (first.start, first.end, end) == (keylog.delivered, ends[9], ends[9])
    expected = PushBatch.from_wal("alpha", None, first.start, end, records[:10])
    assert first.items == expected.items
    assert first.entries == expected.entries
    assert (first.fields, first.loki_bytes) == (expected.fields, expected.loki_bytes)
    assert first.oldest_received_ns == records[0].received_ns

    with trio.fail_after(5):  # the rest goes once its oldest entry waited batch_max_wait_s
        second, end = await stage._collect(keylog, end, loki)
    assert second is not None
    assert (second.start, second.end, end) == (ends[9], ends[11], ends[11])
    assert second.items == PushBatch.from_wal("alpha", None, ends[9], end, records[10:]).items
    keylog.close()


def test_a_key_removed_or_renamed_by_a_reload_keeps_its_tenant_for_its_backlog() -> None:
    """Its entries not yet cut into a batch went to Loki without ``X-Scope-OrgID``: into
    a single-tenant Loki's ``fake`` tenant, or refused and dead-lettered."""
    tenants = {
        "payments_token_0123456789": {"name": "payments", "loki_tenant": "team-a"},
        "users_token_0123456789ab": {"name": "users", "loki_tenant": "team-b"},
    }
    before = load_settings(env={"LOGSTACK_SECURITY_API_KEYS": json.dumps(tenants)})
    stage = BatchStage(StageConfig(), StageContext(before))
    renamed = {"payments_token_0123456789": {"name": "payments-v2", "loki_tenant": "team-a"}}
    after = load_settings(env={"LOGSTACK_SECURITY_API_KEYS": json.dumps(renamed)})
    stage.context.settings = after
    stage.reload(after)
    assert stage.tenant_of("payments") == "team-a"  # renamed: its old name's backlog
    assert stage.tenant_of("users") == "team-b"  # removed
    assert stage.tenant_of("payments-v2") == "team-a"
    assert stage.tenant_of("never-configured") is None
