"""``logstack serve``: one root nursery holding the stage pipeline and Hypercorn.

Start-up order: resolve and validate the pipeline (fail fast, listing every problem), open
the WAL (recovery), start the stages (the head channel comes back via ``task_status``), then
serve HTTP. Shutdown (SIGTERM/SIGINT) is a deadline: stop accepting, let in-flight requests
reach the WAL, close the head so every stage drains in order, cancel only if the grace
period runs out (a second signal cancels at once). SIGHUP reloads keys, masking, limits and
schema, keeping the old config if the new one is invalid.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, nullcontext
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any, Final

import trio
from hypercorn.config import Config as HypercornConfig

from . import __version__
from ._config import Settings, load_settings_for_reload
from ._context import StageContext
from ._errors import ConfigError
from ._http import create_app, disk_free_ratio, instrument, normalise_slashes
from ._http_server import serve as serve_asgi
from ._logging import set_secrets
from ._pipeline import build_stages, serve_pipeline
from ._registry import resolve_pipeline
from ._stage import Stage
from ._wal import WalStore
from ._workers import WorkerRole, retire_shard

log = logging.getLogger("logstack.service")

ASGIApp = Callable[..., Awaitable[None]]

RESTART_ONLY: Final[dict[str, tuple[str, ...]]] = {
    "server": (
        "host",
        "port",
        "bound_ports_file",
        "max_body_bytes",
        "pipeline_capacity",
        "listen_backlog",
        "max_connections",
        "shutdown_grace_s",
        "log_format",
        "workers",
    ),
    "wal": ("root_path", "segment_max_bytes"),
}
"""Settings fixed at start-up (sockets, channels, open files, worker counts): a reload that
changes them keeps the running values, says so, and applies everything else."""


MIN_REDACTED_LENGTH = 6

REPEATED_STOP_WINDOW_S: Final = 1.0
"""A worker's second stop request this soon after its first is the same request: a
SIGTERM/SIGINT sent to the whole process group (systemd's ``KillMode=control-group``,
Ctrl-C in a terminal) reaches each worker directly and again through the supervisor."""


def _secrets_of(settings: Settings) -> list[str | None]:
    loki = settings.loki
    # Nothing logs Loki's credentials; redacting them is a second guard. A very short
    # password is left out: every occurrence of its letters in every log line would go.
    credentials = [loki.password, loki.bearer_token, loki.authorization()]
    return [
        *settings.security.api_keys,
        settings.security.admin_token,
        *(c for c in credentials if c and len(c) >= MIN_REDACTED_LENGTH),
    ]


def keep_restart_only(old: Settings, new: Settings) -> tuple[Settings, list[str]]:
    """``new`` with the restart-only values of ``old``, and the names of those it kept."""
    kept: list[str] = []
    updates: dict[str, Any] = {}
    for section, keys in RESTART_ONLY.items():
        old_section, new_section = getattr(old, section), getattr(new, section)
        changed = {
            key: getattr(old_section, key)
            for key in keys
            if getattr(old_section, key) != getattr(new_section, key)
        }
        if changed:
            kept += [f"{section}.{key}" for key in changed]
            updates[section] = new_section.model_copy(update=changed)
    if new.pipeline != old.pipeline:
        kept.append("pipeline")
        updates["pipeline"] = old.pipeline
    return (new.model_copy(update=updates) if updates else new), kept


def _log_warnings(settings: Settings) -> None:
    for warning in settings.warnings():
        log.warning("config: %s", warning, extra={"config_warning": warning})


class Service:
    """The running service's shared state: context, pipeline head, readiness, reload."""

    def __init__(
        self,
        settings: Settings,
        config_path: str | os.PathLike[str] | None = None,
        role: WorkerRole | None = None,
    ):
        self.config_path = config_path
        self.role = role or WorkerRole()
        self.context = StageContext(settings)
        self.head: trio.MemorySendChannel[Any] | None = None
        self.stopping = False
        self.stages: list[Stage] = []
        self.config_version = 1
        self.started_at = time.time()
        self.config_loaded_at = self.started_at
        self.last_reload_error: list[str] | None = None
        self.binds: list[str] = []
        self._no_requests = trio.Event()
        self._stop_scope: trio.CancelScope | None = None
        self._stop_requested_at: float | None = None
        self.drained = False
        """A drain worker delivered everything its shard held."""
        set_secrets(_secrets_of(settings))
        _log_warnings(settings)

    @property
    def wal(self) -> WalStore:
        store: WalStore = self.context.services["wal"]
        return store

    def readiness(self) -> dict[str, dict[str, Any]]:
        """Each check with its detail, from facts the stages keep current: nothing here
        talks to Loki (the forwarder probes ``/ready`` in the background when pushes are
        not succeeding, and records the outcome in ``HealthState``)."""
        settings = self.context.settings
        health = self.context.health
        checks: dict[str, dict[str, Any]] = {}
        now = time.monotonic()
        window = settings.loki.ready_window_s
        last_ok = health.loki_last_ok
        age = None if last_ok is None else now - last_ok
        failing = health.loki_failing_since
        failing_s = None if failing is None else now - failing
        failure = health.loki_last_failure
        # Pushes failing matter while there is something to push, or Loki was asked very
        # recently: a single refused push, dead-lettered, must not keep an idle service
        # "not ready" for good (a load balancer would never send it the traffic to mend it).
        still_failing = failing_s is not None and (
            self._has_backlog() or (failure is not None and now - failure <= window)
        )
        push_error = health.loki_push_error or health.loki_last_error or "unknown"
        loki_ok = age is not None and age <= window
        if loki_ok and still_failing and failing_s is not None and failing_s > window:
            # ``/ready`` says 200, but Loki has taken no push for a while (it refuses or
            # throttles them, or the URL behind it hangs): not ready, and why.
            loki_ok = False
            detail = f"no push taken for {failing_s:.0f}s: {push_error}"
        elif loki_ok and still_failing and failing_s is not None:
            detail = (
                f"Loki answered {age:.0f}s ago; no push taken for {failing_s:.0f}s: " + push_error
            )
        elif loki_ok:
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
        root = settings.wal.root_path
        # ``os.access`` alone is true for a plain file, and for any path when run as root.
        writable = health.wal_writable and os.path.isdir(root) and os.access(root, os.W_OK)
        checks["wal"] = {
            "ok": writable,
            "detail": "writable"
            if writable
            else (health.wal_last_error or f"WAL directory {root} is not a writable directory"),
        }
        checks["forwarder"] = {
            "ok": health.forwarder_running,
            "detail": "running" if health.forwarder_running else "not running",
        }
        return checks

    def _has_backlog(self) -> bool:
        """Whether any key's WAL holds entries not yet delivered."""
        store: WalStore | None = self.context.services.get("wal")
        if store is None:
            return False
        return any(log.has_unread_entries(log.delivered) for log in store.logs.values())

    def refresh_gauges(self) -> None:
        """Gauges that are cheaper to compute on scrape than to keep updated."""
        metrics = self.context.metrics
        store: WalStore | None = self.context.services.get("wal")
        for name, keylog in (store.logs if store is not None else {}).items():
            metrics.wal_segments_active.labels(token=name).set(len(keylog.segments))
            metrics.wal_disk_usage.labels(token=name).set(keylog.disk_bytes)
        for check, result in self.readiness().items():
            metrics.ready.labels(check=check).set(1 if result["ok"] else 0)

    async def reload(self) -> bool:
        """Re-read the configuration (SIGHUP); keep the old one, and say why, if it is bad.

        Keys, masking, rate limits, schema, quotas and Loki batching apply at once; the
        settings in ``RESTART_ONLY`` and the pipeline keep their running values.
        """
        metrics = self.context.metrics
        path = self.config_path

        def load() -> Settings:
            new = load_settings_for_reload(path)
            resolve_pipeline(new)  # a pipeline that would not start is a bad config too
            return self.role.apply(new)

        try:
            new = await trio.to_thread.run_sync(load)
        except ConfigError as exc:
            self.last_reload_error = exc.problems
            metrics.config_reloads.labels(result="failed").inc()
            log.error(
                "config reload failed; keeping the running config",
                extra={"problems": exc.problems, "config_version": self.config_version},
            )
            return False
        old = self.context.settings
        new, kept = keep_restart_only(old, new)
        if kept:
            log.warning(
                "config reload: these settings need a restart; keeping their running values",
                extra={"settings": kept},
            )
        self.context.settings = new
        set_secrets(_secrets_of(new))
        _log_warnings(new)
        failures: list[str] = []
        for stage in self.stages:
            try:
                stage.reload(new)
            except Exception as exc:  # a plugin's bug must not stop the others reloading
                failures.append(stage.name)
                log.exception(
                    "stage failed to apply the reloaded config",
                    extra={"stage": stage.name, "error_type": type(exc).__name__},
                )
        level = "DEBUG" if new.server.debug else new.server.log_level
        logging.getLogger().setLevel(level)
        self.config_version += 1
        self.config_loaded_at = time.time()
        self.last_reload_error = None
        metrics.config_reloads.labels(result="ok").inc()
        metrics.config_version.set(self.config_version)
        old_names = {key.name for key in old.security.api_keys.values()}
        new_names = {key.name for key in new.security.api_keys.values()}
        log.info(
            "config reloaded",
            extra={
                "config_version": self.config_version,
                "api_keys": len(new.security.api_keys),
                "keys_added": sorted(new_names - old_names),
                "keys_removed": sorted(old_names - new_names),
                "stages_failed": failures,
            },
        )
        return True

    @property
    def requests_in_flight(self) -> int:
        """HTTP requests inside the app (``instrument`` counts them)."""
        return self.context.requests_in_flight

    def request_started(self) -> None:
        self.context.requests_in_flight += 1
        if self._no_requests.is_set():
            self._no_requests = trio.Event()

    def request_finished(self) -> None:
        self.context.requests_in_flight -= 1
        if self.context.requests_in_flight == 0:
            self._no_requests.set()

    async def wait_requests_answered(self) -> None:
        """Return once no HTTP request is being served (at once if none is)."""
        while self.requests_in_flight:
            await self._no_requests.wait()

    def request_stop(self, reason: str = "requested") -> None:
        """Begin a graceful stop; called a second time, cancel whatever is still running
        (in a worker, not when the second comes within ``REPEATED_STOP_WINDOW_S``)."""
        if self.context.shutdown.is_set():
            if self._repeats_the_stop_request():
                log.info(
                    "stop request repeated at once: the same request, the drain goes on"
                    " (a signal to the process group reaches a worker twice)",
                    extra={"by": reason},
                )
                return
            if self._stop_scope is not None:
                log.warning("second stop request: cancelling the drain", extra={"by": reason})
                self._stop_scope.cancel()
            return
        log.info("shutdown requested", extra={"by": reason})
        self._stop_requested_at = time.monotonic()
        self.stopping = True
        self.context.shutdown.set()

    def _repeats_the_stop_request(self) -> bool:
        """Whether a worker's second stop request is its first one arriving again."""
        if self.role.single or self._stop_requested_at is None:
            return False
        return time.monotonic() - self._stop_requested_at < REPEATED_STOP_WINDOW_S

    def __repr__(self) -> str:
        state = "stopping" if self.stopping else "running"
        return f"<Service {state} config_version={self.config_version} binds={self.binds}>"


def all_delivered(store: WalStore) -> bool:
    """Whether every entry batch in the store reached Loki (or the DLQ), durably."""
    return all(log.delivered >= log.last_entry_end for log in store.logs.values())


async def _stop_with_supervisor(service: Service, supervisor: int, poll_s: float = 0.5) -> None:
    """A worker whose supervisor is gone (killed with SIGKILL, say) stops gracefully
    instead of serving on unsupervised. (Not ``PR_SET_PDEATHSIG``: trio starts processes
    from worker threads, and that signal fires when the starting *thread* exits.)

    ``supervisor`` is the pid the supervisor put on the command line, not ``getppid()``
    read now: one that died while this worker started has left it with another parent
    already, and the check must fire at once."""
    while True:  # polling: no event tells a process that its parent died
        if os.getppid() != supervisor:
            service.request_stop("supervisor gone")
            return
        await trio.sleep(poll_s)


async def _stop_when_drained(service: Service, poll_s: float = 0.5) -> None:
    """Drain role: stop the service once its shard holds nothing undelivered."""
    shutdown = service.context.shutdown
    while not shutdown.is_set():
        if all_delivered(service.wal):
            service.drained = True
            service.request_stop("shard drained")
            return
        with trio.move_on_after(poll_s):
            await shutdown.wait()


async def _serve_drain(
    service: Service,
    app: ASGIApp,
    settings: Settings,
    role: WorkerRole,
    task_status: trio.TaskStatus[list[str]],
) -> None:
    """Drain role: no public HTTP; the private socket only, for the workers' /metrics."""
    private = role.peer_socket(role.index)
    async with trio.open_nursery() as nursery:
        if private is not None:
            await nursery.start(
                partial(serve_http, service, app, settings, private_socket=private, public=False)
            )
        task_status.started([])
        await _stop_when_drained(service)
    if private is not None:  # a finished drain is not a worker down
        await trio.Path(private).unlink(missing_ok=True)


def build_asgi_app(service: Service) -> ASGIApp:
    """The Quart app wrapped in request ids, HTTP metrics and slash normalisation."""
    return normalise_slashes(instrument(create_app(service), service))


def hypercorn_config(
    settings: Settings,
    listen_socket: socket.socket | None = None,
    private_socket: str | None = None,
    *,
    public: bool = True,
) -> HypercornConfig:
    """Hypercorn's settings; ``listen_socket`` (bound, not listening) is handed over as
    ``fd://`` and owned by Hypercorn from then on; ``private_socket`` is a Unix socket path
    also listened on (a worker's, for its peers); ``public=False``: that socket only."""
    config = HypercornConfig()
    if not public:
        config.bind = []
    elif listen_socket is None:
        config.bind = [f"{settings.server.host}:{settings.server.port}"]
    else:
        config.bind = [f"fd://{listen_socket.detach()}"]
    if private_socket is not None:
        config.bind.append(f"unix:{private_socket}")
    config.graceful_timeout = settings.server.shutdown_grace_s
    config.backlog = settings.server.listen_backlog  # Hypercorn's own default is 100
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.keep_alive_timeout = 75
    config.max_app_queue_size = 64
    return config


async def serve_http(
    service: Service,
    app: ASGIApp,
    settings: Settings,
    *,
    listen_socket: socket.socket | None = None,
    private_socket: str | None = None,
    public: bool = True,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Hypercorn until the shutdown event, then until every in-flight request is answered.

    On shutdown Hypercorn closes its listeners at once and lets requests in flight finish;
    but it also lingers on keep-alive connections that serve nothing (some until its whole
    graceful timeout, when Quart-Trio cancelled the end of their last answer). We know
    which requests are in flight (``instrument`` counts them), so once none is, the rest
    of the HTTP server is cancelled: a request that has not reached the app yet would only
    have been refused with 503; its connection is closed instead and the client retries.
    """
    shutdown = service.context.shutdown
    with trio.CancelScope() as http_scope:
        async with trio.open_nursery() as nursery:

            async def run_hypercorn(task_status: trio.TaskStatus[list[str]]) -> None:
                await serve_asgi(
                    app,
                    hypercorn_config(settings, listen_socket, private_socket, public=public),
                    shutdown_trigger=shutdown.wait,
                    max_connections=settings.server.max_connections,
                    task_status=task_status,
                )
                http_scope.cancel()  # Hypercorn finished by itself: stop waiting below

            binds: list[str] = await nursery.start(run_hypercorn)
            task_status.started(binds)
            await shutdown.wait()
            await service.wait_requests_answered()
            http_scope.cancel()


async def serve(
    settings: Settings,
    *,
    config_path: str | os.PathLike[str] | None = None,
    handle_signals: bool = True,
    role: WorkerRole | None = None,
    task_status: trio.TaskStatus[Service] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run LogStack until SIGTERM/SIGINT, ``Service.request_stop()`` or cancellation.

    ``handle_signals=False`` leaves signals alone (for running it inside another program
    or a test); the ``Service`` handed to ``task_status`` then stops it. ``role`` makes it
    one worker of several (see ``logstack._workers``): its WAL shard, its share of the
    limits, the shared port; a *drain* role serves no HTTP and stops once its shard is
    delivered.
    """
    role = role or WorkerRole()
    settings = role.apply(settings)
    resolved = resolve_pipeline(settings)
    # Bound first (not listening until Hypercorn runs): a taken port is a clear error
    # before the WAL is touched.
    listen_socket = (
        None if role.drain else role.listen_socket(settings.server.host, settings.server.port)
    )
    service = Service(settings, config_path, role)
    # Build the stages before touching the WAL: a plugin whose constructor fails leaves
    # nothing behind (no WAL directory, no log of a recovery that never mattered).
    service.stages = build_stages(resolved, service.context)
    started = time.perf_counter()
    store = WalStore(
        Path(settings.wal.root_path), settings.wal.segment_max_bytes, service.context.metrics
    )
    try:
        await trio.to_thread.run_sync(store.open)
    except OSError as exc:  # not a directory, not writable, ...: the operator's to fix
        if listen_socket is not None:
            listen_socket.close()
        raise ConfigError(
            [f"wal.root_path: cannot open the WAL in {settings.wal.root_path}: {exc}"]
        ) from None
    service.context.services["wal"] = store
    log.info(
        "WAL opened",
        extra={
            # Absolute: a relative root_path is the working directory's, which differs
            # between a shell, a unit file and a container.
            "root": str(settings.wal.root_path.absolute()),
            "keys": len(store.logs),
            "recovery_s": round(time.perf_counter() - started, 3),
        },
    )
    app = build_asgi_app(service)
    shutdown = service.context.shutdown
    grace = settings.server.shutdown_grace_s
    clean = False
    stop_started: float | None = None
    with _late_stop_signals(service) if handle_signals else nullcontext():
        try:
            async with trio.open_nursery() as outer:
                if handle_signals:
                    outer.start_soon(_signal_loop, service)
                if not role.single:
                    supervisor = role.supervisor if role.supervisor is not None else os.getppid()
                    outer.start_soon(_stop_with_supervisor, service, supervisor)
                try:
                    async with trio.open_nursery() as root:
                        service._stop_scope = root.cancel_scope
                        service.head = await root.start(
                            partial(
                                serve_pipeline,
                                service.stages,
                                head_capacity=settings.server.pipeline_capacity,
                            )
                        )

                        async def http_then_close_head(task_status: trio.TaskStatus[Any]) -> None:
                            try:
                                if role.drain:
                                    await _serve_drain(service, app, settings, role, task_status)
                                else:
                                    await serve_http(
                                        service,
                                        app,
                                        settings,
                                        listen_socket=listen_socket,
                                        private_socket=role.peer_socket(role.index),
                                        task_status=task_status,
                                    )
                            finally:
                                # In-flight requests are answered; closing the head drains
                                # every stage in order.
                                service.stopping = True
                                if service.head is not None:
                                    await service.head.aclose()
                                log.info("HTTP closed; draining the pipeline")

                        service.binds = await root.start(http_then_close_head)
                        if settings.server.bound_ports_file:
                            await trio.Path(settings.server.bound_ports_file).write_text(
                                "\n".join(service.binds) + "\n"
                            )
                        log.info(
                            "serving",
                            extra={
                                "binds": service.binds,
                                "version": __version__,
                                "pipeline": [s.name for s in service.stages],
                            },
                        )
                        task_status.started(service)
                        await shutdown.wait()
                        stop_started = time.perf_counter()
                        service.stopping = True
                        root.cancel_scope.deadline = min(
                            root.cancel_scope.deadline, trio.current_time() + grace
                        )
                    clean = not root.cancel_scope.cancelled_caught
                finally:
                    outer.cancel_scope.cancel()
        finally:
            service.stopping = True
            if listen_socket is not None and listen_socket.fileno() != -1:
                listen_socket.close()  # never handed to Hypercorn (it failed before)
            store.close()
            if role.drain and clean and service.drained:
                retire_shard(store.root)
            log.info(
                "stopped",
                extra={
                    "clean": clean,
                    "stop_s": None
                    if stop_started is None
                    else round(time.perf_counter() - stop_started, 3),
                },
            )


@asynccontextmanager
async def open_service(
    settings: Settings,
    *,
    config_path: str | os.PathLike[str] | None = None,
    role: WorkerRole | None = None,
) -> AsyncIterator[Service]:
    """Run LogStack inside the caller's trio run (no signal handling) for the block.

    ``service.binds`` tells where it listens (bind port 0 for a free one). Leaving the
    block stops it gracefully, as SIGTERM would.
    """
    async with trio.open_nursery() as nursery:
        service: Service = await nursery.start(
            partial(serve, settings, config_path=config_path, handle_signals=False, role=role)
        )
        try:
            yield service
        finally:
            service.request_stop("open_service exit")


@contextmanager
def _late_stop_signals(service: Service) -> Iterator[None]:
    """What SIGTERM and SIGINT do after the signal loop ended, until ``serve`` returns.

    When trio's receiver closes it puts back the handlers it found and raises again the
    signals still queued. Found the defaults there, a worker's second copy of a stop sent
    to the process group (straight, and again through the supervisor) killed it if it came
    late, after the drain, before the worker said it stopped clean. A copy inside
    ``REPEATED_STOP_WINDOW_S`` is ignored here as in ``Service.request_stop``; any other
    signal does what it did before ``serve`` (by default, ends the process).
    """
    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {signum: signal.getsignal(signum) for signum in signals}

    def handle(signum: int, frame: FrameType | None) -> None:
        if service._repeats_the_stop_request():
            return
        before = previous[signal.Signals(signum)]
        if callable(before):
            before(signum, frame)
        elif before != signal.SIG_IGN:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    for signum in signals:
        signal.signal(signum, handle)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


async def _signal_loop(service: Service) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:
                log.info("SIGHUP: reloading the config", extra={"path": str(service.config_path)})
                await service.reload()
                continue
            service.request_stop(signal.Signals(signum).name)
