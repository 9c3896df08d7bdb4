"""The ``batch`` stage: follow each key's WAL and cut push batches (1 MiB, 1000 entries, 1 s).

One follower task per key reads the key's WAL from its delivery checkpoint (page cache while
it keeps up, disk when it falls behind) and cuts a :class:`PushBatch` when
``loki.batch_max_entries`` or ``loki.batch_max_bytes`` is reached, when the oldest entry it
holds has waited ``loki.batch_max_wait_s``, or on an admin flush.

At most one push per key is in flight, which keeps each key's order and lets the forwarder
serve keys fairly; but the next batch is read, converted and encoded while the previous one
is in flight, and handed over as soon as Loki has taken that one (its checkpoint fsync
overlaps the next push). The work is done in steps with a trio checkpoint between them
(``Pacer``): small ones while HTTP requests are being served, so an ack waits less behind
delivery at each of its hops, and larger ones otherwise, because every switch away from the
batch being built costs it its warm caches and a drain with nothing else to do runs faster
that way (``docs/performance.md``, "Cold execution").
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import trio

from logstack._config import LokiSettings
from logstack._delivery import PushBatch
from logstack._stage import Stage, StageConfig
from logstack._wal import KeyLog, Position, WalStore

log = logging.getLogger("logstack.batch")

READ_STEP_ENTRIES = 200
"""Entries read, decoded, converted or encoded between two trio checkpoints while no HTTP
request is being served."""
BUSY_STEP_ENTRIES = 50
"""The same while requests are being served (a WAL record, one request, is read and
converted whole, so in practice a checkpoint after each)."""
HANDOVER_ROUNDS = 30
"""Scheduler rounds given to the forwarder after a handover, so it puts the push on the wire
before this follower starts the (CPU-bound) next batch; a round costs ~5 µs."""


class Pacer:
    """Where a long piece of delivery work pauses: a trio checkpoint after every
    ``BUSY_STEP_ENTRIES`` entries while HTTP requests are being served, after every
    ``READ_STEP_ENTRIES`` otherwise. Measured (``docs/performance.md``): the small steps
    lowered p99 ack latency at half load; taken always, they slowed a drain by ~15%."""

    def __init__(self, context: Any) -> None:
        self.context = context
        self.since_checkpoint = 0

    @staticmethod
    def step_for(context: Any) -> int:
        """Entries to work on between two checkpoints, now."""
        return BUSY_STEP_ENTRIES if context.requests_in_flight else READ_STEP_ENTRIES

    async def worked(self, entries: int) -> None:
        self.since_checkpoint += entries
        if self.since_checkpoint >= self.step_for(self.context):
            self.since_checkpoint = 0
            await trio.lowlevel.checkpoint()


class BatchStage(Stage):
    """Follow every key's WAL from its delivery checkpoint and cut push batches for Loki."""

    Config = StageConfig

    def __init__(self, config: StageConfig, context: Any) -> None:
        super().__init__(config, context)
        self.name = "batch"
        self._tenants: dict[str, str | None] = {}
        """The tenant of every key seen in any configuration since start: a key removed or
        renamed by a reload still has a backlog, whose entries must not reach Loki
        without their tenant (a single-tenant Loki files them under ``fake``)."""
        self._remember_tenants(context.settings)

    def reload(self, settings: Any) -> None:
        self._remember_tenants(settings)

    def _remember_tenants(self, settings: Any) -> None:
        for key in settings.security.api_keys.values():
            self._tenants[key.name] = key.loki_tenant

    def tenant_of(self, name: str) -> str | None:
        """The key's tenant now, or the last one it had if a reload removed it."""
        key = self.context.settings.key_by_name(name)
        return key.loki_tenant if key is not None else self._tenants.get(name)

    async def run(
        self, inbox: trio.MemoryReceiveChannel[Any], outbox: trio.MemorySendChannel[Any]
    ) -> None:
        store: WalStore = self.context.services["wal"]
        following: set[str] = set()
        async with inbox, outbox, trio.open_nursery() as nursery:

            def follow(name: str) -> None:
                if name not in following:
                    following.add(name)
                    nursery.start_soon(self._follow, store.log_for(name), outbox.clone())

            for name in list(store.logs):
                follow(name)
            # Hints from wal_append name the keys that grew; a key seen for the first time
            # gets its own follower task.
            async for names in inbox:
                for name in names:
                    follow(name)
            # Ingest is closed: stop cutting new batches; the WAL keeps the rest.
            nursery.cancel_scope.cancel()

    async def _follow(self, keylog: KeyLog, outbox: trio.MemorySendChannel[PushBatch]) -> None:
        cursor: Position = keylog.delivered
        previous: PushBatch | None = None
        async with outbox:
            while True:
                loki = self.context.settings.loki
                push, end = await self._collect(keylog, cursor, loki)
                if push is None:
                    cursor = end
                    continue
                pacer = Pacer(self.context)
                for entries in push.prepare_steps(loki):
                    await pacer.worked(entries)
                # Built while the previous one was in flight; sent once Loki has that one,
                # so a key's pushes stay in order (its checkpoint fsync overlaps this push).
                if previous is not None:
                    await previous.pushed.wait()
                await outbox.send(push)
                for _ in range(HANDOVER_ROUNDS):
                    await trio.lowlevel.checkpoint()
                previous = push
                cursor = end

    async def _collect(
        self, keylog: KeyLog, cursor: Position, loki: LokiSettings
    ) -> tuple[PushBatch | None, Position]:
        """Read from ``cursor`` until a limit is reached or the oldest entry waited long
        enough, turning each WAL record into Loki entries as soon as it is read.

        Converted and dropped at once, a record's ~10 objects per entry are freed while they
        are still in the CPU's caches; held until the batch was complete, they cost several
        times more to convert and to free (docs/performance.md, "Cold execution").
        """
        push: PushBatch | None = None
        pacer = Pacer(self.context)
        entries = size = 0
        read_pos = cursor
        deadline = math.inf
        while True:
            if (
                keylog.has_unread(read_pos)
                and entries < loki.batch_max_entries
                and size < loki.batch_max_bytes
            ):
                await trio.lowlevel.checkpoint()
                result = keylog.read(
                    read_pos,
                    loki.batch_max_entries - entries,
                    loki.batch_max_bytes - size,
                    at_least_one=push is None,
                    stop_after=Pacer.step_for(self.context),
                )
                if result.end == read_pos:
                    break  # limits reached mid-way: what we hold is the batch
                read_pos = result.end
                size += result.payload_bytes
                batches = result.batches
                if not batches:
                    continue
                if push is None:
                    received = batches[0].received_ns
                    age = max(0.0, (time.time_ns() - received) / 1e9)
                    deadline = trio.current_time() + max(0.0, loki.batch_max_wait_s - age)
                    tenant = self.tenant_of(keylog.name)
                    push = PushBatch(keylog.name, tenant, cursor, cursor, received)
                batches.reverse()  # popped from the end: each record freed once converted
                while batches:
                    batch = batches.pop()
                    push.add(
                        batch,
                        structured_metadata=loki.structured_metadata,
                        protobuf=loki.push_format == "protobuf",
                    )
                    converted = len(batch.entries)
                    del batch
                    entries += converted
                    await pacer.worked(converted)
                continue
            if push is None and read_pos != cursor:
                return None, read_pos  # skipped non-entry records only
            if push is not None and (
                entries >= loki.batch_max_entries
                or size >= loki.batch_max_bytes
                or trio.current_time() >= deadline
                or keylog.flush_requested
            ):
                keylog.flush_requested = False
                break
            with trio.move_on_at(deadline):
                await keylog.wait_changed()
        if push is not None:
            push.end = read_pos
        return push, read_pos
