"""``logstack serve``: one root nursery holding the stage pipeline and Hypercorn.

Start-up order: resolve and validate the pipeline (fail fast, listing every problem), open
the WAL (recovery), start the stages (the head channel comes back via ``task_status``), then
serve HTTP. Shutdown (SIGTERM/SIGINT) is a deadline: stop accepting, let in-flight requests
reach the WAL, close the head so every stage drains in order, cancel only if the grace
period runs out. SIGHUP reloads keys, masking and limits, keeping the old config if the new
one is invalid.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from functools import partial
from pathlib import Path
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from . import __version__
from ._config import Settings, load_settings
from ._context import StageContext
from ._errors import ConfigError
from ._http import count_requests, create_app, disk_free_ratio, normalise_slashes
from ._pipeline import build_stages, serve_pipeline
from ._registry import resolve_pipeline
from ._stage import Stage
from ._wal import WalStore

log = logging.getLogger("logstack.service")


class Service:
    """The running service's shared state: context, pipeline head, readiness."""

    def __init__(self, settings: Settings, config_path: str | None = None) -> None:
        self.config_path = config_path
        self.context = StageContext(settings)
        self.head: trio.MemorySendChannel[Any] | None = None
        self.stopping = False
        self.stages: list[Stage] = []
        self.config_version = 1
        self.started_at = time.time()

    @property
    def wal(self) -> WalStore:
        store: WalStore = self.context.services["wal"]
        return store

    def readiness(self) -> dict[str, dict[str, Any]]:
        settings = self.context.settings
        health = self.context.health
        checks: dict[str, dict[str, Any]] = {}
        last_ok = health.loki_last_ok
        age = None if last_ok is None else time.monotonic() - last_ok
        loki_ok = age is not None and age <= settings.loki.ready_window_s
        if loki_ok:
            detail = f"Loki answered {age:.0f}s ago"
        elif age is None:
            detail = f"Loki not reached yet: {health.loki_last_error or 'no answer'}"
        else:
            detail = f"no answer from Loki for {age:.0f}s: {health.loki_last_error or 'unknown'}"
        checks["loki"] = {"ok": loki_ok, "detail": detail}
        try:
            free = disk_free_ratio(settings.wal.root_path)
        except OSError as exc:
            checks["disk"] = {"ok": False, "detail": f"cannot stat WAL disk: {exc.strerror}"}
        else:
            checks["disk"] = {
                "ok": free >= settings.wal.min_free_disk_ratio,
                "detail": f"{free:.1%} free (minimum {settings.wal.min_free_disk_ratio:.0%})",
            }
        writable = health.wal_writable and os.access(settings.wal.root_path, os.W_OK)
        checks["wal"] = {
            "ok": writable,
            "detail": "writable"
            if writable
            else (health.wal_last_error or "WAL directory not writable"),
        }
        checks["forwarder"] = {
            "ok": health.forwarder_running,
            "detail": "running" if health.forwarder_running else "not running",
        }
        return checks

    def refresh_gauges(self) -> None:
        """Gauges that are cheaper to compute on scrape than to keep updated."""
        metrics = self.context.metrics
        now = time.time_ns()
        for name, keylog in self.wal.logs.items():
            metrics.wal_segments_active.labels(token=name).set(len(keylog.segments))
            metrics.wal_disk_usage.labels(token=name).set(keylog.disk_bytes)
            if not keylog.has_unread(keylog.delivered):
                metrics.forwarder_lag.labels(token=name).set(0)
            else:
                oldest = keylog.oldest_undelivered_ns()
                if oldest is not None:
                    current = metrics.forwarder_lag.labels(token=name)
                    current.set(max(0.0, (now - oldest) / 1e9))

    def reload(self) -> bool:
        """Re-read the configuration; keep the old one (and say why) if the new one is bad."""
        try:
            new = load_settings(self.config_path)
            resolve_pipeline(new)
        except ConfigError as exc:
            log.error(
                "config reload failed; keeping the running config", extra={"problems": exc.problems}
            )
            return False
        old = self.context.settings
        if new.pipeline != old.pipeline or new.wal.root_path != old.wal.root_path:
            log.warning("pipeline, WAL root and server changes need a restart; applying the rest")
        self.context.settings = new
        for stage in self.stages:
            stage.reload(new)
        self.config_version += 1
        log.info(
            "config reloaded",
            extra={"config_version": self.config_version, "api_keys": len(new.security.api_keys)},
        )
        return True


def hypercorn_config(settings: Settings) -> HypercornConfig:
    config = HypercornConfig()
    config.bind = [f"{settings.server.host}:{settings.server.port}"]
    config.graceful_timeout = settings.server.shutdown_grace_s
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.keep_alive_timeout = 75
    config.max_app_queue_size = 64
    return config


async def serve(
    settings: Settings,
    *,
    config_path: str | None = None,
    task_status: trio.TaskStatus[Service] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run LogStack until SIGTERM/SIGINT (or cancellation)."""
    resolved = resolve_pipeline(settings)
    service = Service(settings, config_path)
    started = time.perf_counter()
    store = WalStore(
        Path(settings.wal.root_path), settings.wal.segment_max_bytes, service.context.metrics
    )
    await trio.to_thread.run_sync(store.open)
    service.context.services["wal"] = store
    log.info(
        "WAL opened",
        extra={
            "root": str(settings.wal.root_path),
            "keys": len(store.logs),
            "recovery_s": round(time.perf_counter() - started, 3),
        },
    )
    service.stages = build_stages(resolved, service.context)
    app = normalise_slashes(count_requests(create_app(service), service))
    shutdown = service.context.shutdown
    grace = settings.server.shutdown_grace_s
    clean = False
    try:
        async with trio.open_nursery() as outer:
            outer.start_soon(_signal_loop, service)
            try:
                async with trio.open_nursery() as root:
                    service.head = await root.start(
                        partial(
                            serve_pipeline,
                            service.stages,
                            head_capacity=settings.server.pipeline_capacity,
                        )
                    )

                    async def http_then_close_head(task_status: trio.TaskStatus[Any]) -> None:
                        try:
                            await hypercorn_serve(
                                app,
                                hypercorn_config(settings),
                                shutdown_trigger=shutdown.wait,
                                task_status=task_status,
                            )
                        finally:
                            # In-flight requests are answered; closing the head drains
                            # every stage in order.
                            service.stopping = True
                            if service.head is not None:
                                await service.head.aclose()

                    binds = await root.start(http_then_close_head)
                    if settings.server.bound_ports_file:
                        await trio.Path(settings.server.bound_ports_file).write_text(
                            "\n".join(binds) + "\n"
                        )
                    log.info(
                        "serving",
                        extra={
                            "binds": binds,
                            "version": __version__,
                            "pipeline": [s.name for s in service.stages],
                        },
                    )
                    task_status.started(service)
                    await shutdown.wait()
                    service.stopping = True
                    root.cancel_scope.deadline = trio.current_time() + grace
                clean = not root.cancel_scope.cancelled_caught
            finally:
                outer.cancel_scope.cancel()
    finally:
        store.close()
        log.info("stopped", extra={"clean": clean})


async def _signal_loop(service: Service) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                service.reload()
                continue
            log.info("shutdown requested", extra={"signal": signal.Signals(signum).name})
            service.context.shutdown.set()
