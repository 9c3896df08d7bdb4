"""The ``wal_append`` stage: durable append with group commit; the 202 leaves after the fsync."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import msgspec
import trio

from logstack._envelope import Accepted, Batch, Envelope
from logstack._errors import (
    IdempotencyKeyReusedError,
    QuotaExceededError,
    RejectError,
    UnavailableError,
    WalError,
)
from logstack._loki_line import line_batch
from logstack._stage import Stage, StageConfig, coalesce, pass_on
from logstack._wal import IDEMPOTENCY_WINDOW_NS, KeyLog, WalStore
from logstack._wal_format import IdempotencyRecord, Record

log = logging.getLogger("logstack.wal")

ROTATION_CHECK_S = 1.0
DISK_CHECK_INTERVAL_S = 1.0
QUOTA_RETRY_AFTER_S = 30
DISK_RETRY_AFTER_S = 30
PROBE_INTERVAL_S = 1.0
"""How often an unwritable WAL is probed, so that readiness recovers by itself."""
COMMIT_QUEUE = 64
"""Written batches of requests that may wait for a group commit (then writing waits too)."""

_msgpack_encode = msgspec.msgpack.Encoder().encode

Written = tuple[Envelope, KeyLog, Accepted | None, int]
"""A written request: its log, the first answer if it was an idempotent retry, its entries."""


def idempotency_hash(key_name: str, idempotency_key: str) -> str:
    return hashlib.sha256(f"{key_name}\0{idempotency_key}".encode()).hexdigest()[:32]


def entries_digest(entries: list[Any]) -> str:
    """What tells a retry from another request under the same idempotency key: a digest of
    its entries as masked and validated (the same body gives the same entries, whatever
    its encoding or gzip; a digest, never the entries, so nothing unmasked is kept)."""
    return hashlib.blake2b(_msgpack_encode(entries), digest_size=16).hexdigest()


class WalAppendStage(Stage):
    """Append each request to its key's WAL; one fsync answers every request that waited for it."""

    Config = StageConfig

    def __init__(self, config: StageConfig, context: Any) -> None:
        super().__init__(config, context)
        self.name = "wal_append"
        self._disk_checked = -1e9
        self._disk_free_ratio = 1.0

    @property
    def store(self) -> WalStore:
        store: WalStore = self.context.services["wal"]
        return store

    def _disk_free(self) -> float:
        now = time.monotonic()
        if now - self._disk_checked >= DISK_CHECK_INTERVAL_S:
            self._disk_checked = now
            stats = os.statvfs(self.store.root)
            self._disk_free_ratio = stats.f_bavail / stats.f_blocks if stats.f_blocks else 0.0
        return self._disk_free_ratio

    def _admit(self, keylog: KeyLog) -> None:
        """Quota and disk-pressure checks; nothing rejected here costs WAL space."""
        wal = self.context.settings.wal
        if self._disk_free() < wal.min_free_disk_ratio:
            raise UnavailableError(
                "WAL disk is nearly full; try again later",
                retry_after=DISK_RETRY_AFTER_S,
                details={"disk_free_ratio": round(self._disk_free_ratio, 4)},
                reason="disk_pressure",
            )
        soft_bytes = wal.quota_bytes * wal.quota_soft_ratio
        # The quota bounds the backlog: delivered records still in the active segment are
        # on disk until it rotates, but a key that Loki is up to date with is not refused
        # for them (with a quota under the rotation size it was, for minutes).
        if keylog.disk_bytes >= soft_bytes and (backlog := keylog.undelivered_bytes()) >= (
            soft_bytes
        ):
            raise QuotaExceededError(
                "this key's WAL backlog is at its quota; delivery to Loki is behind",
                retry_after=QUOTA_RETRY_AFTER_S,
                details={"undelivered_bytes": backlog, "quota_bytes": wal.quota_bytes},
            )
        oldest = keylog.oldest_undelivered_ns()
        if oldest is not None:
            age_s = (time.time_ns() - oldest) / 1e9
            if age_s >= wal.quota_age_s * wal.quota_soft_ratio:
                raise QuotaExceededError(
                    "this key's oldest undelivered entries are near the WAL age quota",
                    retry_after=QUOTA_RETRY_AFTER_S,
                    details={
                        "oldest_undelivered_age_s": round(age_s),
                        "quota_age_s": wal.quota_age_s,
                    },
                )

    def _append(
        self, envelope: Envelope, waiting: dict[str, tuple[str, int, str]]
    ) -> tuple[KeyLog, Accepted | None, int]:
        """Write one request's records; return the log to fsync, for an idempotent retry
        the first answer to repeat once that fsync is done, and the entries written.

        The request's entries are dropped once written: freed right after their encoding
        touched them, their ~10 objects each cost a fraction of what they do a group's
        fsync later, when other requests have taken the CPU's caches."""
        keylog = self.store.log_for(envelope.key_name)
        entries = envelope.entries or []
        digest = fingerprint = None
        if envelope.idempotency_key is not None:
            digest = idempotency_hash(envelope.key_name, envelope.idempotency_key)
            fingerprint = entries_digest(entries)
            seen = waiting.get(digest) or self._recent(keylog, digest)
            if seen is not None:
                if seen[2] and seen[2] != fingerprint:
                    raise IdempotencyKeyReusedError(
                        "X-Idempotency-Key was used within the last 15 minutes for a request "
                        "with other entries; use a new key for new entries",
                        details={"request_id": seen[0], "entries_accepted": seen[1]},
                    )
                # A retry of an accepted request: the first answer, stored once.
                return keylog, Accepted(seen[1], seen[0]), 0
        self._admit(keylog)
        records: list[Record] = [line_batch(envelope.request_id, time.time_ns(), entries)]
        now = time.time_ns()
        if digest is not None and fingerprint is not None:
            records.append(
                IdempotencyRecord(digest, envelope.request_id, len(entries), now, fingerprint)
            )
        keylog.append(records)
        if digest is not None and fingerprint is not None:
            # Only once written: a retry must not be told "accepted" for a write that
            # failed (it was, and nothing was stored). ``_answer_group`` forgets it again
            # if the fsync fails.
            keylog.idempotency[digest] = (envelope.request_id, len(entries), now, fingerprint)
            waiting[digest] = (envelope.request_id, len(entries), fingerprint)
        envelope.entries = envelope.raw_entries = None
        return keylog, None, len(entries)

    @staticmethod
    def _recent(keylog: KeyLog, digest: str) -> tuple[str, int, str] | None:
        """The request accepted under ``digest`` within the window: its request id, entries
        accepted and entries' digest."""
        seen = keylog.idempotency.get(digest)
        if seen is None:
            return None
        if time.time_ns() - seen[2] > IDEMPOTENCY_WINDOW_NS:
            del keylog.idempotency[digest]
            return None
        return seen[0], seen[1], seen[3]

    async def run(
        self, inbox: trio.MemoryReceiveChannel[Batch], outbox: trio.MemorySendChannel[Any]
    ) -> None:
        written_send, written_receive = trio.open_memory_channel[list[Written]](COMMIT_QUEUE)
        async with inbox, outbox, trio.open_nursery() as timers:
            timers.start_soon(self._maintain)
            async with trio.open_nursery() as pipeline:
                pipeline.start_soon(self._commit, written_receive, outbox)
                async with written_send:
                    async for first in inbox:
                        written = self._write_batch(coalesce(first, inbox))
                        if written:
                            await pass_on(written_send, written)
            # Every written request has been answered.
            timers.cancel_scope.cancel()
        # Stopping: make everything written durable before the store closes.
        await self._sync_all(list(self.store.logs.values()))

    def _write_batch(self, batch: Batch) -> list[Written]:
        """Write every pending request of ``batch`` (or refuse it); the committer answers
        the written ones once their group's fsync is done."""
        written: list[Written] = []
        waiting: dict[str, tuple[str, int, str]] = {}
        for envelope in batch:
            if not envelope.pending:
                continue
            try:
                keylog, replay, count = self._append(envelope, waiting)
            except RejectError as error:
                envelope.reject(error)
                continue
            except (WalError, OSError) as exc:
                self._unwritable(envelope.key_name, exc, "WAL append failed")
                envelope.reject(UnavailableError("the WAL cannot be written", retry_after=5))
                continue
            written.append((envelope, keylog, replay, count))
        return written

    async def _commit(
        self,
        written_receive: trio.MemoryReceiveChannel[list[Written]],
        outbox: trio.MemorySendChannel[Any],
    ) -> None:
        """Group commit: one fsync per touched log covers every request written before it
        started. Requests go on being written while it runs (``run``), so the next group's
        fsync can start as soon as this one ends."""
        async with written_receive:
            async for first in written_receive:
                await self._answer_group(coalesce(first, written_receive), outbox)

    async def _answer_group(
        self, written: list[Written], outbox: trio.MemorySendChannel[Any]
    ) -> None:
        metrics = self.context.metrics
        failed: set[str] = set()
        if self.context.settings.wal.fsync == "always":
            failed = await self._sync_all({id(kl): kl for _, kl, _, _ in written}.values())
        for envelope, keylog, replay, count in written:
            if keylog.name in failed:
                if replay is None:
                    _forget_idempotency(keylog, envelope)
                envelope.reject(UnavailableError("the WAL fsync failed", retry_after=5))
                continue
            if replay is not None:
                envelope.reply.resolve(replay)
                continue
            if envelope.accept(count):  # not if its client was answered 503 meanwhile
                metrics.logs_ingested.labels(token=keylog.name).inc(count)
        # Tell the batcher which keys grew; it reads the WAL itself, so a full channel
        # just means it is busy: never wait for it.
        try:
            outbox.send_nowait(sorted({kl.name for _, kl, _, _ in written}))
        except trio.WouldBlock:
            pass

    async def _maintain(self) -> None:
        """Timers: ADR-002 rotation (age, idle, forced) and, in ``fsync: interval`` mode,
        the periodic fsync. Rotation is driven by the clock, not only by the next write."""
        next_probe = 0.0
        while True:
            wal = self.context.settings.wal
            interval_mode = wal.fsync == "interval"
            await trio.sleep(wal.fsync_interval_ms / 1000 if interval_mode else ROTATION_CHECK_S)
            rotated = []
            for keylog in list(self.store.logs.values()):
                reason = keylog.rotation_due(
                    max_age_s=wal.segment_max_age_s,
                    min_rotate_bytes=wal.segment_min_rotate_bytes,
                    idle_s=wal.segment_idle_s,
                    force_s=wal.segment_force_s,
                )
                if reason is None:
                    continue
                try:
                    if keylog.rotate(reason):
                        rotated.append(keylog)
                except WalError as exc:  # a full disk, say: the next append starts it
                    self._unwritable(keylog.name, exc, "WAL rotation failed")
            logs = list(self.store.logs.values()) if interval_mode else rotated
            await self._sync_all(logs)
            for keylog in rotated:
                keylog.delete_delivered()
            if not self.context.health.wal_writable and trio.current_time() >= next_probe:
                next_probe = trio.current_time() + PROBE_INTERVAL_S
                await self._probe_writable()

    def _unwritable(self, name: str, exc: Exception, message: str) -> None:
        self.context.health.wal_failed(name, str(exc))
        log.error(message, extra={"token": name, "error": str(exc)})

    async def _probe_writable(self) -> None:
        """After a failed write, readiness said "not writable" until an ingest succeeded,
        which a load balancer following ``/readyz`` never sends: check by itself whether
        the WAL takes writes again (a small file written, fsynced and removed), in the
        root and in the directory of each key that failed."""
        health = self.context.health
        root = self.store.root
        try:
            await trio.to_thread.run_sync(_write_probe, root)
        except OSError:
            return
        writable = []
        for name in list(health.wal_failing):
            keylog = self.store.logs.get(name)
            directory = keylog.directory if keylog is not None else root
            try:
                await trio.to_thread.run_sync(_write_probe, directory)
            except OSError:
                continue
            writable.append(name)
        if health.wal_recovered(writable):
            log.info("the WAL takes writes again", extra={"root": str(root)})

    async def _sync_all(self, logs: Any) -> set[str]:
        """fsync every touched log concurrently; return the names whose fsync failed."""
        failed: set[str] = set()
        synced: list[str] = []
        health = self.context.health
        metrics = self.context.metrics

        async def sync_one(keylog: KeyLog) -> None:
            if keylog.synced_end >= keylog.end:
                return
            started = time.perf_counter()
            try:
                await keylog.sync()
            except WalError as exc:
                failed.add(keylog.name)
                self._unwritable(keylog.name, exc, "WAL fsync failed")
                return
            synced.append(keylog.name)
            metrics.wal_fsyncs.inc()
            metrics.wal_fsync_duration.observe(time.perf_counter() - started)

        async with trio.open_nursery() as nursery:
            for keylog in logs:
                nursery.start_soon(sync_one, keylog)
        if synced and health.wal_recovered(synced):
            log.info("the WAL takes writes again", extra={"root": str(self.store.root)})
        return failed


PROBE_BYTES = 4096


def _write_probe(root: Path) -> None:
    """Write, fsync and remove a small file in ``root``; ``OSError`` if it cannot."""
    path = root / f".write-probe-{os.getpid()}"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            if os.write(fd, b"\0" * PROBE_BYTES) != PROBE_BYTES:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        path.unlink(missing_ok=True)


def _forget_idempotency(keylog: KeyLog, envelope: Envelope) -> None:
    """A request refused after its write (the fsync failed) must not be answered as
    accepted to its retry: forget its idempotency key."""
    if envelope.idempotency_key is None:
        return
    digest = idempotency_hash(envelope.key_name, envelope.idempotency_key)
    seen = keylog.idempotency.get(digest)
    if seen is not None and seen[0] == envelope.request_id:
        del keylog.idempotency[digest]
