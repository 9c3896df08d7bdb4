"""The ``forward_loki`` stage: push batches to Loki, retry through outages, dead-letter refusals."""

from __future__ import annotations

import gzip
import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import httpx
import trio

from logstack import __version__
from logstack._config import LokiSettings
from logstack._delivery import PushBatch
from logstack._dlq import dead_letter
from logstack._loki_proto import (
    PushEntry,
    PushStream,
    compress_snappy,
    encode_json_push,
    encode_push_request,
)
from logstack._stage import Stage, StageConfig
from logstack._wal import WalStore

log = logging.getLogger("logstack.forward")

USER_AGENT = f"logstack/{__version__}"


class LokiTransportError(Exception):
    """The push did not get an HTTP answer (connection refused, reset, timeout)."""


@dataclass(eq=False)
class Endpoint:
    url: str
    unhealthy_until: float = 0.0
    failures: int = 0

    def __repr__(self) -> str:
        return f"<Endpoint {self.url} failures={self.failures}>"


class EndpointPool:
    """Round-robin over Loki URLs, skipping ones that failed recently."""

    def __init__(self, urls: list[str]) -> None:
        self.endpoints = [Endpoint(u) for u in urls]
        self._next = 0

    def pick(self) -> Endpoint:
        now = trio.current_time()
        count = len(self.endpoints)
        for i in range(count):
            endpoint = self.endpoints[(self._next + i) % count]
            if endpoint.unhealthy_until <= now:
                self._next = (self._next + i + 1) % count
                return endpoint
        return min(self.endpoints, key=lambda e: e.unhealthy_until)

    def mark(self, endpoint: Endpoint, ok: bool, penalty_s: float = 0.0) -> None:
        if ok:
            endpoint.failures = 0
            endpoint.unhealthy_until = 0.0
        else:
            endpoint.failures += 1
            endpoint.unhealthy_until = trio.current_time() + penalty_s


def encode_push(batch: PushBatch, loki: LokiSettings) -> tuple[bytes, dict[str, str]]:
    """The HTTP body and headers of one push, in the configured format."""
    streams = [
        PushStream(dict(labels), [PushEntry(ts, line, {}) for ts, line in values])
        for labels, values in batch.streams.items()
    ]
    headers = {"User-Agent": USER_AGENT}
    if batch.tenant:
        headers["X-Scope-OrgID"] = batch.tenant
    if loki.push_format == "json":
        body = encode_json_push(streams)
        headers["Content-Type"] = "application/json"
        if loki.gzip:
            body = gzip.compress(body, compresslevel=1)
            headers["Content-Encoding"] = "gzip"
    else:
        body = compress_snappy(encode_push_request(streams))
        headers["Content-Type"] = "application/x-protobuf"
    return body, headers


def backoff_delay(attempt: int, low: float, high: float) -> float:
    """Exponential backoff with full jitter: uniform in [low, min(high, low·2^attempt)]."""
    ceiling = min(high, low * (2 ** min(attempt, 32)))
    return random.uniform(low, max(low, ceiling))


class ForwardLokiStage(Stage):
    """Push batches to Loki; retry 429/5xx/network errors with backoff, dead-letter other 4xx."""

    Config = StageConfig

    def __init__(self, config: StageConfig, context: Any) -> None:
        super().__init__(config, context)
        self.name = "forward_loki"
        self.pool = EndpointPool(context.settings.loki.endpoints())

    async def run(
        self, inbox: trio.MemoryReceiveChannel[PushBatch], outbox: trio.MemorySendChannel[Any]
    ) -> None:
        await outbox.aclose()  # the last stage: nothing flows further
        loki = self.context.settings.loki
        health = self.context.health
        limits = httpx.Limits(max_connections=loki.max_concurrent_pushes * 2)
        async with httpx.AsyncClient(timeout=None, limits=limits) as client:
            health.forwarder_running = True
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._probe_loop, client)
                    async with inbox, trio.open_nursery() as workers:
                        for _ in range(loki.max_concurrent_pushes):
                            workers.start_soon(self._worker, inbox.clone(), client)
                    nursery.cancel_scope.cancel()
            finally:
                health.forwarder_running = False

    async def _worker(
        self, inbox: trio.MemoryReceiveChannel[PushBatch], client: httpx.AsyncClient
    ) -> None:
        async with inbox:
            async for batch in inbox:
                await self.deliver(batch, client)

    async def _post(
        self, client: httpx.AsyncClient, url: str, body: bytes, headers: dict[str, str]
    ) -> httpx.Response:
        loki = self.context.settings.loki
        metrics = self.context.metrics
        started = time.perf_counter()
        try:
            with trio.fail_after(loki.timeout_s):
                response = await client.post(url + loki.push_path, content=body, headers=headers)
        except (httpx.HTTPError, trio.TooSlowError, OSError) as exc:
            metrics.loki_requests.labels(status_code="error").inc()
            raise LokiTransportError(f"{type(exc).__name__}: {exc}") from exc
        finally:
            metrics.loki_duration.observe(time.perf_counter() - started)
        metrics.loki_requests.labels(status_code=str(response.status_code)).inc()
        return response

    async def deliver(self, batch: PushBatch, client: httpx.AsyncClient) -> None:
        """Push ``batch`` until Loki takes it or refuses it for good; then checkpoint."""
        loki = self.context.settings.loki
        metrics = self.context.metrics
        health = self.context.health
        store: WalStore = self.context.services["wal"]
        body, headers = encode_push(batch, loki)
        attempt = 0
        while True:
            endpoint = self.pool.pick()
            try:
                response = await self._post(client, endpoint.url, body, headers)
            except LokiTransportError as exc:
                status, reason = None, str(exc)
            else:
                status, reason = response.status_code, response.text[:500]
            if status is not None and 200 <= status < 300:
                self.pool.mark(endpoint, ok=True)
                health.loki_last_ok = time.monotonic()
                health.loki_last_error = None
                metrics.loki_forwarded.labels(token=batch.key_name).inc(batch.entry_count)
                break
            if status is None or status == 429 or status >= 500:
                delay = backoff_delay(attempt, loki.backoff_min_s, loki.backoff_max_s)
                attempt += 1
                self.pool.mark(endpoint, ok=False, penalty_s=delay)
                health.loki_last_error = f"{endpoint.url}: {status or reason}"
                metrics.loki_retries.labels(token=batch.key_name).inc()
                log.warning(
                    "push to Loki failed; will retry",
                    extra={
                        "token": batch.key_name,
                        "endpoint": endpoint.url,
                        "status": status,
                        "error": reason[:200],
                        "retry_in_s": round(delay, 2),
                        "attempt": attempt,
                    },
                )
                with trio.move_on_after(delay):
                    await self.context.shutdown.wait()
                if self.context.shutdown.is_set():
                    # Stopping: leave the batch in the WAL; the next start delivers it.
                    return
                continue
            # Another 4xx: Loki refused the push for good (and stored any valid lines of
            # it); resending would repeat the refusal, so it goes to the dead-letter queue.
            self.pool.mark(endpoint, ok=True)
            health.loki_last_ok = time.monotonic()
            keylog = store.log_for(batch.key_name)
            await trio.to_thread.run_sync(dead_letter, keylog.directory, batch, reason, status)
            metrics.dlq_entries.labels(token=batch.key_name).inc(batch.entry_count)
            log.error(
                "Loki refused a push; dead-lettered",
                extra={
                    "token": batch.key_name,
                    "status": status,
                    "entries": batch.entry_count,
                    "reason": reason[:200],
                },
            )
            break
        await store.log_for(batch.key_name).commit_delivered(batch.end)
        batch.done.set()

    async def _probe_loop(self, client: httpx.AsyncClient) -> None:
        """Probe ``/ready`` when no push succeeded lately, so readiness reflects Loki."""
        health = self.context.health
        while True:
            loki = self.context.settings.loki
            recent = health.loki_last_ok is not None and (
                time.monotonic() - health.loki_last_ok < loki.ready_probe_interval_s
            )
            if not recent:
                for endpoint in self.pool.endpoints:
                    try:
                        with trio.fail_after(min(loki.timeout_s, 5.0)):
                            response = await client.get(endpoint.url + "/ready")
                    except (httpx.HTTPError, trio.TooSlowError, OSError) as exc:
                        health.loki_last_error = f"{endpoint.url}/ready: {type(exc).__name__}"
                        continue
                    if response.status_code == 200:
                        health.loki_last_ok = time.monotonic()
                        break
                    health.loki_last_error = f"{endpoint.url}/ready: HTTP {response.status_code}"
            await trio.sleep(loki.ready_probe_interval_s)
