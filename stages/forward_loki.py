"""The ``forward_loki`` stage: push batches to Loki fairly, retry through outages, dead-letter
what Loki refuses for good.

Delivery rules (docs/forwarding.md has the why):

- **Per-key order, fairness.** The batcher hands over at most one :class:`PushBatch` per key
  at a time and waits for it. Every HTTP request takes a slot of one FIFO
  ``trio.CapacityLimiter`` (``loki.max_concurrent_pushes``), re-queued at the back for each
  push and each retry, so with K keys waiting a key's push starts after at most K-1 others.
  Retry waits hold no slot: a key backing off never blocks another key.
- **Never over the burst.** A batch is split so that no push carries more than
  ``loki.burst_limit_bytes`` as Loki counts them (line + structured metadata); an entry
  larger than that alone can never be accepted (Loki answers 429 forever) and is
  dead-lettered at once.
- **Answers.** 2xx: delivered. 429, 5xx, no answer: retried with exponential backoff and full
  jitter (``backoff_min_s`` → ``backoff_max_s``; a ``Retry-After`` is honoured), after an
  immediate fail-over to another healthy URL for 5xx and network errors. 400: Loki stored
  the valid lines; the refused ones (and any its answer does not account for) go to the
  dead-letter queue, the push is never re-sent. Other 4xx: the whole push is dead-lettered.
  Only then is the checkpoint written.
- **URLs.** Round-robin over healthy ones; a URL failing with 5xx or a network error is
  skipped for ``endpoint_cooldown_s`` (doubling per consecutive failure) and its ``/ready``
  probed; when it (or any URL) recovers, pushes waiting out a backoff go at once.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import trio

from logstack._config import LokiSettings, Settings
from logstack._delivery import (
    Item,
    Labels,
    LokiAnswer,
    LokiTimeoutError,
    LokiTransport,
    LokiTransportError,
    PushBatch,
    attribute_rejections,
    encode_push,
    loki_size,
    split_by_size,
)
from logstack._dlq import (
    DeadLetter,
    DeadLetterQueue,
    ReplayBusyError,
    dead_letter_queue,
    make_dead_letter,
)
from logstack._errors import WalError
from logstack._logging import redact
from logstack._loki_http import Http11Transport
from logstack._loki_proto import is_valid_label_name, sanitize_label_name
from logstack._stage import Stage, StageConfig
from logstack._wal import WalStore

log = logging.getLogger("logstack.forward")

PROBE_TIMEOUT_S = 5.0


# ------------------------------------------------------------------------ endpoints


@dataclass(eq=False)
class Endpoint:
    url: str
    unhealthy_until: float = 0.0
    """``trio.current_time()`` before which pushes skip this URL."""
    failures: int = 0
    """Consecutive failed pushes (network error or 5xx); reset by a successful push."""
    last_error: str | None = None
    requests: int = 0
    seen_down: bool = False
    """Since its last failed push, the URL was seen unreachable or not ready: a ``/ready``
    200 is then news that it is back (a URL that answers ``/ready`` but fails pushes with
    5xx is not brought back by its probes, only by its cool-down running out)."""

    def healthy(self, now: float) -> bool:
        return self.unhealthy_until <= now

    def __repr__(self) -> str:
        return f"<Endpoint {self.url} failures={self.failures} requests={self.requests}>"


class EndpointPool:
    """Round-robin over Loki URLs, skipping ones that failed recently.

    ``recovered`` fires whenever a failed URL answers again (a push or a ``/ready`` probe),
    so pushes waiting out a long backoff can go at once.
    """

    def __init__(self, urls: Sequence[str]) -> None:
        self.endpoints = [Endpoint(u) for u in urls]
        self._next = 0
        self.recovered = trio.Event()

    def set_urls(self, urls: Sequence[str]) -> None:
        """Adopt a new URL list (SIGHUP), keeping the state of URLs that stay."""
        known = {e.url: e for e in self.endpoints}
        self.endpoints = [known.get(u) or Endpoint(u) for u in urls]
        self._next %= max(1, len(self.endpoints))

    def pick(self, exclude: set[str] | frozenset[str] = frozenset()) -> Endpoint:
        """The next healthy URL not in ``exclude``; if none, the one that recovers first."""
        now = trio.current_time()
        count = len(self.endpoints)
        for i in range(count):
            endpoint = self.endpoints[(self._next + i) % count]
            if endpoint.healthy(now) and endpoint.url not in exclude:
                self._next = (self._next + i + 1) % count
                return endpoint
        candidates = [e for e in self.endpoints if e.url not in exclude] or self.endpoints
        return min(candidates, key=lambda e: e.unhealthy_until)

    def has_healthy(self, exclude: set[str]) -> bool:
        now = trio.current_time()
        return any(e.healthy(now) and e.url not in exclude for e in self.endpoints)

    def mark_ok(self, endpoint: Endpoint) -> None:
        """A push to ``endpoint`` was answered (not 5xx): it is healthy."""
        was_failing = endpoint.failures > 0 or endpoint.unhealthy_until > trio.current_time()
        endpoint.unhealthy_until = 0.0
        endpoint.failures = 0
        endpoint.last_error = None
        endpoint.seen_down = False
        if was_failing:
            self._recovered()

    def mark_probed(self, endpoint: Endpoint, ready: bool) -> None:
        """A ``/ready`` probe answered 200 (``ready``) or not. Ready after being seen down
        ends the cool-down (its failure count stays, so failing again backs off further)."""
        if not ready:
            endpoint.seen_down = True
            return
        if endpoint.seen_down and endpoint.unhealthy_until > trio.current_time():
            endpoint.unhealthy_until = 0.0
            self._recovered()
        endpoint.seen_down = False

    def _recovered(self) -> None:
        self.recovered.set()
        self.recovered = trio.Event()

    def mark_failed(
        self, endpoint: Endpoint, error: str, base_s: float, max_s: float, *, answered: bool
    ) -> None:
        """A push failed: 5xx (``answered``) or no answer. Skip the URL for a cool-down
        that doubles per consecutive failure."""
        endpoint.failures += 1
        endpoint.last_error = error
        endpoint.seen_down = not answered
        cooldown = min(max_s, base_s * 2 ** min(endpoint.failures - 1, 32))
        endpoint.unhealthy_until = trio.current_time() + cooldown

    def __repr__(self) -> str:
        return f"<EndpointPool {self.endpoints}>"


# ------------------------------------------------------------------------ pushing


CONFIG_REFUSALS: Final = frozenset({401, 403, 404, 405, 407})
"""Refusals that say every push will be refused (credentials, the URL), unlike a 413 for
one push that is too big: they make readiness fail (``HealthState.loki_failing_since``)."""


def answer_kind(status: int | None) -> str:
    """What a push's answer means (SPEC §7, and what it leaves unsaid):

    * ``stored``: 2xx; ``partial``: 400, Loki stored the valid lines and names the others;
    * ``refused``: any other 4xx but 408 and 429: the push as a whole is dead-lettered;
    * ``throttled``: 429: retried, the URL is fine;
    * ``endpoint_fault``: 5xx, 408 (a proxy's timeout), 3xx (redirects are not followed:
      dead-lettering every push behind an http→https redirect would empty Loki into the
      DLQ), anything else, or no answer: retried, and another URL tried.
    """
    if status is None:
        return "endpoint_fault"
    if 200 <= status < 300:
        return "stored"
    if status == 400:
        return "partial"
    if status == 429:
        return "throttled"
    if 400 <= status < 500 and status != 408:
        return "refused"
    return "endpoint_fault"


def backoff_delay(attempt: int, low: float, high: float) -> float:
    """Exponential backoff with full jitter: uniform in [low, min(high, low·2^attempt)]."""
    ceiling = min(high, low * (2 ** min(attempt, 32)))
    return random.uniform(low, max(low, ceiling))


Dead = tuple[Item, str, bool]
"""A dead-lettered entry: the item, the message that refused it, whether unconfirmed."""


@dataclass(slots=True)
class PushOutcome:
    """How one push ended. ``dead`` indexes into the pushed items."""

    stored: int = 0
    dead: list[tuple[int, str, bool]] = field(default_factory=list)
    status: int | None = None
    text: str = ""
    gave_up: bool = False
    """Not settled: a transient failure with retries off, or the service is stopping."""


@dataclass(slots=True)
class ReplayReport:
    token: str
    replayed_records: int = 0
    replayed_entries: int = 0
    refused_again_entries: int = 0
    remaining_records: int = 0
    remaining_entries: int = 0
    error: str | None = None
    loki_status: int | None = None

    @property
    def complete(self) -> bool:
        return self.error is None and self.remaining_records == 0


def _replay_pushes(items: list[Item], limit: int) -> tuple[list[list[Item]], list[Item]]:
    """A record's entries as replay sends them: one stream per push, each cut to ``limit``.

    Loki's ``400`` names the refused entries of only the last stream it refused entries
    of, so the entries of the other streams of a push come back "unconfirmed"; a record
    dead-lettered that way, pushed again whole, got the same answer at every replay and
    never left the queue, although Loki held or refused each of its entries. One stream
    per push gets an answer about every entry (the first ``max_returned_stream_errors``
    of a stream are listed, the count of all)."""
    by_stream: dict[Labels, list[Item]] = {}
    for item in items:
        by_stream.setdefault(item[0], []).append(item)
    chunks: list[list[Item]] = []
    oversized: list[Item] = []
    for stream_items in by_stream.values():
        stream_chunks, stream_oversized = split_by_size(stream_items, limit)
        chunks.extend(stream_chunks)
        oversized.extend(stream_oversized)
    return chunks, oversized


def _oversize_reason(item: Item, limit: int) -> str:
    return (
        f"entry of {loki_size(item[1])} bytes is larger than loki.burst_limit_bytes ({limit}); "
        "Loki answers 429 to such a push however often it is retried"
    )


def _auth_headers(loki: LokiSettings) -> dict[str, str]:
    authorization = loki.authorization()
    return {} if authorization is None else {"Authorization": authorization}


class LokiForwarder:
    """The delivery engine: pushes, retries, fail-over, dead letters, replay.

    Created by the stage's ``run`` and published as ``context.services["forwarder"]`` for the
    admin endpoints (replay).
    """

    def __init__(self, context: Any, transport: LokiTransport, pool: EndpointPool) -> None:
        self.context = context
        self.transport = transport
        self.pool = pool
        self.limiter = trio.CapacityLimiter(context.settings.loki.max_concurrent_pushes)
        self.auth_headers = _auth_headers(context.settings.loki)
        """``Authorization`` for every request to Loki (pushes and ``/ready``), if configured."""
        store: WalStore = context.services["wal"]
        self.store = store
        self.dlq: DeadLetterQueue = dead_letter_queue(context.services, store.root)
        self._replaying: set[str] = set()

    @property
    def loki(self) -> LokiSettings:
        settings: Settings = self.context.settings
        return settings.loki

    def reload(self, settings: Settings) -> None:
        self.limiter.total_tokens = settings.loki.max_concurrent_pushes
        self.auth_headers = _auth_headers(settings.loki)
        # New credentials or URLs: the pushes refused so far say nothing about them.
        self.context.health.loki_failing_since = None

    # ---------------------------------------------------------------- one request

    async def post(self, endpoint: Endpoint, body: bytes, headers: Mapping[str, str]) -> LokiAnswer:
        """One HTTP push through a concurrency slot; ``LokiTransportError`` if no answer."""
        loki = self.loki
        metrics = self.context.metrics
        if self.auth_headers:
            headers = {**headers, **self.auth_headers}
        async with self.limiter:
            endpoint.requests += 1
            started = time.perf_counter()
            try:
                with trio.fail_after(loki.timeout_s):
                    answer = await self.transport.post(endpoint.url + loki.push_path, body, headers)
            except trio.TooSlowError:
                metrics.loki_requests.labels(status_code="error").inc()
                raise LokiTimeoutError(f"timeout: no answer within {loki.timeout_s:g}s") from None
            except LokiTransportError:
                metrics.loki_requests.labels(status_code="error").inc()
                raise
            finally:
                metrics.loki_duration.observe(time.perf_counter() - started)
        metrics.loki_requests.labels(status_code=str(answer.status)).inc()
        return answer

    # ---------------------------------------------------------------- one push, settled

    async def push(
        self,
        key: str,
        tenant: str | None,
        items: Sequence[Item],
        *,
        retry: bool = True,
        encoded: tuple[bytes, dict[str, str]] | None = None,
    ) -> PushOutcome:
        """Push ``items`` (at most a burst) until Loki settles them.

        With ``retry=False`` (replay) a transient failure ends it (``gave_up``) after trying
        each healthy URL once. Otherwise it retries until Loki answers something other than
        429/5xx, or the service stops.
        """
        loki = self.loki
        metrics = self.context.metrics
        health = self.context.health
        body, headers = encoded or encode_push(items, tenant, loki)
        attempt = 0
        tried: set[str] = set()
        while True:
            endpoint = self.pool.pick(exclude=tried)
            timed_out = False
            try:
                answer = await self.post(endpoint, body, headers)
            except LokiTransportError as exc:
                status, text, retry_after = None, str(exc), None
                timed_out = isinstance(exc, LokiTimeoutError)
            else:
                status, text, retry_after = answer.status, answer.text, answer.retry_after_s
            kind = answer_kind(status)
            what = text if status is None else f"HTTP {status}"
            self._note_for_readiness(kind, status, f"{endpoint.url}: {what}")
            if kind in ("stored", "partial", "refused"):
                self.pool.mark_ok(endpoint)
                if kind == "stored":
                    health.loki_last_error = None
                    metrics.loki_forwarded.labels(token=key).inc(len(items))
                    return PushOutcome(stored=len(items), status=status)
                if kind == "partial":
                    health.loki_last_error = None
                    return self._partial(key, items, text)
                # Another 4xx refuses the push as a whole (nothing of it was stored).
                health.loki_last_error = f"{endpoint.url}: HTTP {status} (dead-lettered)"
                dead = [(i, "", False) for i in range(len(items))]
                return PushOutcome(dead=dead, status=status, text=text)
            # 429, 408, 3xx, 5xx or no answer: transient.
            endpoint_fault = kind == "endpoint_fault"
            if status is not None and 300 <= status < 400:
                what += " (redirects are not followed: check loki.base_url)"
            health.loki_last_error = f"{endpoint.url}: {what}"
            if endpoint_fault:
                self.pool.mark_failed(
                    endpoint,
                    what,
                    loki.endpoint_cooldown_s,
                    max(loki.backoff_max_s, loki.endpoint_cooldown_s),
                    # A push that timed out reached a URL that is up but failing: its
                    # ``/ready`` saying 200 must not end its cool-down early.
                    answered=status is not None or timed_out,
                )
            tried.add(endpoint.url)
            failover = endpoint_fault and self.pool.has_healthy(tried)
            if not retry and not failover:
                return PushOutcome(status=status, text=text, gave_up=True)
            metrics.loki_retries.labels(token=key).inc()
            if failover:
                log.info(
                    "push failed; trying another Loki URL",
                    extra={"token": key, "endpoint": endpoint.url, "error": what[:200]},
                )
                continue
            tried.clear()
            delay = backoff_delay(attempt, loki.backoff_min_s, loki.backoff_max_s)
            if retry_after is not None:
                delay = min(loki.backoff_max_s, max(delay, retry_after))
            attempt += 1
            log.warning(
                "push to Loki failed; will retry",
                extra={
                    "token": key,
                    "endpoint": endpoint.url,
                    "status": status,
                    "error": text[:200],
                    "retry_in_s": round(delay, 2),
                    "attempt": attempt,
                },
            )
            if not await self._wait_retry(delay, wake_on_recovery=endpoint_fault):
                return PushOutcome(status=status, text=text, gave_up=True)

    def _note_for_readiness(self, kind: str, status: int | None, error: str) -> None:
        """A push Loki took, or one it did not (``error``) that says it takes none now: a
        refusal of that push alone (a 413) says nothing about the next."""
        health = self.context.health
        now = time.monotonic()
        if kind in ("stored", "partial"):
            if health.loki_failing_since is not None:
                # The warnings stop; say why, so the log does not just go quiet.
                log.info(
                    "Loki takes pushes again",
                    extra={"failing_for_s": round(now - health.loki_failing_since, 1)},
                )
            health.loki_last_ok = now
            health.loki_failing_since = None
        elif kind != "refused" or status in CONFIG_REFUSALS:
            if health.loki_failing_since is None:
                health.loki_failing_since = now
            health.loki_last_failure = now
            health.loki_push_error = error

    def _partial(self, key: str, items: Sequence[Item], text: str) -> PushOutcome:
        """A 400: Loki stored the valid lines; never re-send them."""
        attribution = attribute_rejections(items, text)
        if attribution.stored:
            self.context.metrics.loki_forwarded.labels(token=key).inc(len(attribution.stored))
        unsure = "; ".join(attribution.unexplained)[:2000]
        dead = [(i, why, False) for i, why in sorted(attribution.rejected.items())]
        dead += [(i, f"unconfirmed: {unsure}", True) for i in attribution.unconfirmed]
        dead.sort()
        return PushOutcome(stored=len(attribution.stored), dead=dead, status=400, text=text)

    async def _wait_retry(self, delay: float, *, wake_on_recovery: bool) -> bool:
        """Sleep ``delay`` (at least ``backoff_min_s`` even if Loki recovers meanwhile);
        ``False`` if the service started stopping."""
        shutdown: trio.Event = self.context.shutdown
        recovered = self.pool.recovered
        start = trio.current_time()
        floor = min(delay, self.loki.backoff_min_s)
        with trio.move_on_after(floor):
            await shutdown.wait()
        if shutdown.is_set():
            return False
        with trio.move_on_at(start + delay):
            async with trio.open_nursery() as nursery:

                async def until(event: trio.Event) -> None:
                    await event.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(until, shutdown)
                if wake_on_recovery:
                    nursery.start_soon(until, recovered)
        return not shutdown.is_set()

    # ---------------------------------------------------------------- one batch

    async def deliver(self, batch: PushBatch) -> bool:
        """Deliver ``batch`` (split to the burst), dead-letter what Loki refused, then
        checkpoint. ``False`` if the service is stopping first (the range stays undelivered)."""
        if not batch.pushed.is_set():
            if not await self._push_batch(batch):
                return False
            batch.pushed.set()
        await self.store.log_for(batch.key_name).commit_delivered(batch.end)
        batch.done.set()
        return True

    async def _push_batch(self, batch: PushBatch) -> bool:
        """Push every entry of ``batch`` or dead-letter it; ``False`` if stopping first."""
        loki = self.loki
        limit = loki.burst_limit_bytes
        if batch.prepared is None:
            batch.prepare(loki)
        assert batch.prepared is not None
        chunks, oversized = batch.prepared
        dead: list[Dead] = [(item, _oversize_reason(item, limit), False) for item in oversized]
        status: int | None = None
        reasons: list[str] = []
        if oversized:
            reasons.append(_oversize_reason(oversized[0], limit))
        for chunk, body, headers in chunks:
            outcome = await self.push(batch.key_name, batch.tenant, chunk, encoded=(body, headers))
            if outcome.gave_up:
                return False
            if outcome.dead:
                status = status or outcome.status
                reason = outcome.text.strip() or f"HTTP {outcome.status}"
                reasons.append(f"HTTP {outcome.status}: {reason}")
                dead.extend((chunk[i], why, unsure) for i, why, unsure in outcome.dead)
        if dead:
            record = make_dead_letter(
                batch.key_name,
                batch.tenant,
                status,
                "\n".join(reasons),
                dead,
                wal_range=(batch.start, batch.end),
            )
            await self._dead_letter(record)
        return True

    async def _dead_letter(self, record: DeadLetter) -> None:
        if not await self.dlq.append(record):
            return  # the same WAL range was dead-lettered before a crash
        self.context.metrics.dlq_entries.labels(token=record.key).inc(record.entries)
        log.error(
            "Loki refused entries; dead-lettered",
            extra={
                "token": record.key,
                "status": record.status,
                "entries": record.entries,
                "unconfirmed": record.unconfirmed,
                "dlq_id": record.id,
                "reason": record.reason[:300],
            },
        )

    async def deliver_guarded(self, batch: PushBatch) -> None:
        """``deliver``, retried with backoff if something local fails (the DLQ or the WAL
        checkpoint cannot be written): a range not yet pushed is delivered again, one that
        was is only checkpointed again (the key's next batch may already be in Loki)."""
        attempt = 0
        while True:
            try:
                await self.deliver(batch)
                return
            except Exception as exc:
                delay = backoff_delay(attempt, self.loki.backoff_min_s, self.loki.backoff_max_s)
                attempt += 1
                log.exception(
                    "delivery failed locally; retrying",
                    extra={"token": batch.key_name, "retry_in_s": round(delay, 2)},
                )
                self.context.health.loki_last_error = f"local delivery error: {exc}"
                if isinstance(exc, WalError):  # a checkpoint the WAL cannot take: say so
                    self.context.health.wal_failed(batch.key_name, str(exc))
                if not await self._wait_retry(delay, wake_on_recovery=False):
                    return

    # ---------------------------------------------------------------- replay

    def replaying(self, key: str) -> bool:
        """Whether a replay of ``key``'s dead letters is running."""
        return key in self._replaying

    async def replay(self, key: str) -> ReplayReport:
        """Push ``key``'s dead letters to Loki again (with the key's current tenant).

        Records Loki now takes leave the queue; entries it refuses again stay with the new
        reason; a transient failure (429, 5xx, no answer) stops the replay and keeps the
        record it was on and every later one.
        """
        if key in self._replaying:
            raise ReplayBusyError(key)
        self._replaying.add(key)
        try:
            return await self._replay(key)
        finally:
            self._replaying.discard(key)

    async def _replay(self, key: str) -> ReplayReport:
        report = ReplayReport(key)
        records = await self.dlq.read(key)
        configured = self.context.settings.key_by_name(key)
        limit = self.loki.burst_limit_bytes
        changes: dict[str, DeadLetter | None] = {}
        processed = 0
        try:
            for record in records:
                tenant = configured.loki_tenant if configured is not None else record.tenant
                items = record.items()
                before = [(e.reason, e.unconfirmed) for s in record.streams for e in s.entries]
                position = {id(item): i for i, item in enumerate(items)}
                still_dead: dict[int, tuple[str, bool]] = {}
                settled: set[int] = set()
                chunks, oversized = _replay_pushes(items, limit)
                for item in oversized:
                    still_dead[position[id(item)]] = (_oversize_reason(item, limit), False)
                    settled.add(position[id(item)])
                failure: PushOutcome | None = None
                answers: list[str] = []
                for chunk in chunks:
                    indices = [position[id(item)] for item in chunk]
                    outcome = await self.push(key, tenant, chunk, retry=False)
                    if outcome.gave_up:
                        failure = outcome
                        break
                    settled.update(indices)
                    report.replayed_entries += outcome.stored
                    for i, why, unsure in outcome.dead:
                        still_dead[indices[i]] = (why or outcome.text.strip(), unsure)
                    if outcome.dead:
                        answers.append(f"HTTP {outcome.status}: {outcome.text.strip()}")
                report.refused_again_entries += len(still_dead)
                for i in range(len(items)):
                    if i not in settled:
                        still_dead[i] = before[i]  # not sent again (replay stopped): unchanged
                processed += 1
                if still_dead:
                    what = "\n".join(answers)
                    if failure is not None:
                        status = f"HTTP {failure.status}" if failure.status else failure.text
                        what = f"{what}\n{status}".strip()
                    pending = [(items[i], still_dead[i]) for i in sorted(still_dead)]
                    changes[record.id] = _updated(record, pending, what)
                else:
                    changes[record.id] = None
                    report.replayed_records += 1
                if failure is not None:
                    what = f"HTTP {failure.status}" if failure.status else failure.text
                    report.error = f"Loki did not take the replay: {what}"[:500]
                    report.loki_status = failure.status
                    break
        except trio.Cancelled:
            # The admin client went away (the request is cancelled with it) or the
            # service is stopping: what was replayed so far is kept below, so the next
            # replay does not push it again.
            log.warning(
                "dead-letter replay stopped before its end; its progress is kept",
                extra={"token": key, "records": processed},
            )
            raise
        finally:
            if changes:
                with trio.CancelScope(shield=True):
                    await self.dlq.rewrite(key, lambda r: changes.get(r.id, r))
        for record in records:
            if record.id in changes:
                kept = changes[record.id]
                if kept is not None:
                    report.remaining_records += 1
                    report.remaining_entries += kept.entries
            else:
                report.remaining_records += 1
                report.remaining_entries += record.entries
        log.info(
            "dead letters replayed",
            extra={
                "token": key,
                "records": processed,
                "replayed_records": report.replayed_records,
                "replayed_entries": report.replayed_entries,
                "remaining_records": report.remaining_records,
                "error": report.error,
            },
        )
        return report

    # ---------------------------------------------------------------- probing

    async def probe_loop(self) -> None:
        """Probe ``/ready`` of URLs that failed (to bring them back), and of all URLs when
        no push succeeded lately (so readiness reflects Loki while nothing is sent)."""
        health = self.context.health
        while True:
            loki = self.loki
            recent = health.loki_last_ok is not None and (
                time.monotonic() - health.loki_last_ok < loki.ready_probe_interval_s
            )
            for endpoint in list(self.pool.endpoints):
                failing = endpoint.failures > 0
                if recent and not failing:
                    continue
                ready = await self._probe(endpoint)
                self.pool.mark_probed(endpoint, ready)
                if ready:
                    health.loki_last_ok = time.monotonic()
                    recent = True
            await trio.sleep(loki.ready_probe_interval_s)

    async def _probe(self, endpoint: Endpoint) -> bool:
        health = self.context.health
        try:
            with trio.fail_after(min(self.loki.timeout_s, PROBE_TIMEOUT_S)):
                answer = await self.transport.get(endpoint.url + "/ready", self.auth_headers)
        except trio.TooSlowError:
            health.loki_last_error = f"{endpoint.url}/ready: timeout"
            return False
        except LokiTransportError as exc:
            health.loki_last_error = f"{endpoint.url}/ready: {str(exc).split(':')[0]}"
            return False
        if answer.status == 200:
            return True
        health.loki_last_error = f"{endpoint.url}/ready: HTTP {answer.status}"
        return False

    def __repr__(self) -> str:
        return (
            f"<LokiForwarder {self.pool!r} slots={self.limiter.borrowed_tokens}/"
            f"{self.limiter.total_tokens} waiting={self.limiter.statistics().tasks_waiting}>"
        )


def _updated(
    record: DeadLetter, pending: list[tuple[Item, tuple[str, bool]]], answer: str
) -> DeadLetter:
    """``record`` reduced to ``pending`` after a replay attempt Loki answered ``answer``."""
    dead = [(item, why, unsure) for item, (why, unsure) in pending]
    new = make_dead_letter(record.key, record.tenant, record.status, record.reason, dead)
    new.id = record.id
    new.dead_lettered_at = record.dead_lettered_at
    new.wal_start, new.wal_end = record.wal_start, record.wal_end
    new.replay_attempts = record.replay_attempts + 1
    new.last_replay_error = redact(answer)[:2000] or None
    return new


def label_name_warnings(settings: Settings) -> dict[str, str]:
    """Allow-listed entry label names Loki would refuse, and the names sent instead."""
    return {
        name: sanitize_label_name(name)
        for name in settings.schema_.label_allowlist
        if not is_valid_label_name(name)
    }


# ------------------------------------------------------------------------ the stage


class ForwardLokiStage(Stage):
    """Push batches to Loki; retry 429/5xx/network errors with backoff, dead-letter refusals."""

    Config = StageConfig

    def __init__(self, config: StageConfig, context: Any) -> None:
        super().__init__(config, context)
        self.name = "forward_loki"
        self.pool = EndpointPool(context.settings.loki.endpoints())
        self.forwarder: LokiForwarder | None = None

    def reload(self, settings: Any) -> None:
        self.pool.set_urls(settings.loki.endpoints())
        if self.forwarder is not None:
            self.forwarder.reload(settings)
        self._warn_label_names(settings)

    @staticmethod
    def _warn_label_names(settings: Settings) -> None:
        renamed = label_name_warnings(settings)
        if renamed:
            log.warning(
                "schema.label_allowlist holds label names Loki refuses; they are sent renamed",
                extra={"renamed": renamed},
            )

    async def run(
        self, inbox: trio.MemoryReceiveChannel[PushBatch], outbox: trio.MemorySendChannel[Any]
    ) -> None:
        await outbox.aclose()  # the last stage: nothing flows further
        context = self.context
        loki = context.settings.loki
        injected = context.services.get("loki_transport")
        transport: LokiTransport = injected or Http11Transport(loki.max_concurrent_pushes * 2 + 2)
        forwarder = self.forwarder = LokiForwarder(context, transport, self.pool)
        context.services["forwarder"] = forwarder
        self._warn_label_names(context.settings)
        context.health.forwarder_running = True
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(forwarder.probe_loop)
                async with inbox, trio.open_nursery() as deliveries:
                    # One task per batch; the batcher sends at most one per key at a time.
                    async for batch in inbox:
                        deliveries.start_soon(forwarder.deliver_guarded, batch)
                nursery.cancel_scope.cancel()
        finally:
            context.health.forwarder_running = False
            context.services.pop("forwarder", None)
            self.forwarder = None
            if injected is None:
                with trio.CancelScope(shield=True):
                    await transport.aclose()
