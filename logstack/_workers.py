"""``logstack serve`` with several worker processes: one WAL shard each, one shared port.

CPython runs one request at a time per process, so a second core needs a second process.
With ``server.workers: N`` (or ``logstack serve --workers N``) a small supervisor starts N
workers. Each is a whole LogStack (pipeline, WAL, forwarder) that owns one WAL shard, so no
two processes ever write one file:

* shard 0 is the WAL root itself (what a single worker uses, so going from 1 to N workers
  keeps the existing WAL), shard ``i > 0`` is ``<root>/_shard-<i>`` (a leading ``_`` cannot
  start a key name, so a shard never looks like a key's directory);
* every worker binds the same address with ``SO_REUSEPORT``, and the kernel spreads new
  connections over the workers' listening sockets;
* a key's rate limit and WAL quota are divided by N in every worker. Connections are spread
  by a hash of their addresses, so this is exact when a key's traffic comes over several
  connections and stricter when a key sends everything over one; a burst share is never
  below one request, so a burst below N lets up to one request per worker more through
  (the documented approximation, like idempotency keys, which each worker keeps alone);
* every worker starts from the settings the supervisor keeps (handed over on its stdin,
  never written to disk), not from the file: the file may have changed, or broken, since
  the workers started. SIGHUP reloads them in the supervisor as in a worker (a bad file
  changes nothing, restart-only settings keep their running values), so a worker started
  again runs what the others run;
* a worker that dies is started again (its shard is recovered like after any crash), but
  one that fails on its first start stops the supervisor, as a single process would;
  SIGTERM/SIGINT are passed on to every worker, SIGHUP to every worker that got going
  (the others get it once they do), and workers stop by themselves if the supervisor
  disappears;
* ``/metrics`` of any worker covers all of them: each also listens on a private Unix
  socket, where the others ask for its samples (``gather_metrics``).

Shards left over from an earlier run with more workers (``_shard-i`` with ``i >= N`` still
holding entries) are not forgotten: each gets a *drain* worker — the same service without
HTTP — that delivers what its shard holds, removes the delivered segments and exits.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import httpx
import trio

from ._config import Settings, load_settings_for_reload
from ._errors import ConfigError
from ._metrics import merge_expositions

log = logging.getLogger("logstack.workers")

SHARD_PREFIX: Final = "_shard-"
RESTART_BACKOFF_S: Final = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
"""Waits before restarting a worker that keeps dying; back to the first after a minute up."""
STABLE_AFTER_S: Final = 60.0
START_TIMEOUT_S: Final = 60.0
DRAIN_STARTUP_S: Final = 10.0
GOING_POLL_S: Final = 0.05


def shard_root(root: Path, index: int) -> Path:
    """The WAL directory of shard ``index``: the root itself for shard 0."""
    return root if index == 0 else root / f"{SHARD_PREFIX}{index}"


def shard_indices(root: Path) -> list[int]:
    """Indices of the ``_shard-<i>`` directories under ``root`` (shard 0 not included)."""
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        suffix = path.name.removeprefix(SHARD_PREFIX)
        if path.is_dir() and suffix != path.name and suffix.isdigit() and int(suffix) > 0:
            found.append(int(suffix))
    return sorted(found)


def shard_holds_entries(shard: Path) -> bool:
    """Whether any key directory of the shard still has a segment file."""
    return any(shard.glob("*/*.seg"))


def orphan_shards(root: Path, workers: int) -> list[int]:
    """Shards beyond ``workers`` that still hold segments: they need a drain worker."""
    return [
        i for i in shard_indices(root) if i >= workers and shard_holds_entries(shard_root(root, i))
    ]


def retire_shard(shard: Path) -> None:
    """Remove a drained shard's segments and whatever directories are left empty.

    Only called once every entry in it was delivered (or dead-lettered); dead-letter files
    are kept where they are.
    """
    for segment in shard.glob("*/*.seg"):
        segment.unlink(missing_ok=True)
    for directory in sorted(shard.glob("*/"), reverse=True):
        if directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()
    if not any(shard.iterdir()):
        shard.rmdir()


@dataclass(frozen=True)
class WorkerRole:
    """Which part of the service this process is: worker ``index`` of ``count``."""

    index: int = 0
    count: int = 1
    drain: bool = False
    """Serve no HTTP: deliver what shard ``index`` holds, then exit (a shard left over)."""
    port: int | None = None
    """Listen on this port with ``SO_REUSEPORT`` (the supervisor picked it)."""
    ports_file: str | None = None
    peers_dir: str | None = None
    """Where every serving worker also listens on ``worker-<i>.sock``: ``/metrics`` asks
    the others there, so any worker's answer covers all of them."""
    supervisor: int | None = None
    """The supervisor's pid: the worker stops once its parent is another process."""

    @property
    def single(self) -> bool:
        """A process on its own, with no supervisor. Every role a supervisor starts has a
        port or drains, so it is never single, not even the only worker of a restart
        with fewer workers and a shard left over: it must write the private ports file,
        watch the supervisor and take its part of the shared port."""
        return self.count == 1 and self.port is None and not self.drain

    def apply(self, settings: Settings) -> Settings:
        """``settings`` as this worker runs them: its shard, its share of limits and quotas.

        Applied at start and again to every reloaded configuration.
        """
        if self.single:
            return settings
        n = self.count
        security = settings.security
        keys = {
            token: key.model_copy(
                update={
                    "rate_limit_rps": None
                    if key.rate_limit_rps is None
                    else key.rate_limit_rps / n,
                    "rate_limit_burst": None
                    if key.rate_limit_burst is None
                    else _burst_share(key.rate_limit_burst, n),
                }
            )
            for token, key in security.api_keys.items()
        }
        wal = settings.wal
        server_updates: dict[str, object] = {"workers": n, "bound_ports_file": self.ports_file}
        if self.port is not None:
            server_updates["port"] = self.port
        return settings.model_copy(
            update={
                "server": settings.server.model_copy(update=server_updates),
                "security": security.model_copy(
                    update={
                        "rate_limit_rps": security.rate_limit_rps / n,
                        "rate_limit_burst": _burst_share(security.rate_limit_burst, n),
                        "api_keys": keys,
                    }
                ),
                "wal": wal.model_copy(
                    update={
                        "root_path": shard_root(Path(wal.root_path), self.index),
                        "quota_bytes": max(1, wal.quota_bytes // n),
                    }
                ),
            }
        )

    def peer_socket(self, index: int) -> str | None:
        return None if self.peers_dir is None else f"{self.peers_dir}/worker-{index}.sock"

    def listen_socket(self, host: str, port: int) -> socket.socket:
        """The bound (not yet listening) socket this process serves on: the shared port
        with ``SO_REUSEPORT`` for a worker of several, ``host:port`` for a single process.
        ``ConfigError`` if it cannot be bound (the port is taken, the address not local)."""
        if self.port is not None:
            return bind_socket(host, self.port, reuse_port=True)
        return bind_socket(host, port, reuse_port=False)


def _burst_share(burst: float, workers: int) -> float:
    # A bucket smaller than one request would refuse every request.
    return max(1.0, burst / workers)


def bind_socket(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    """A TCP socket bound to ``host:port`` (not listening yet), or ``ConfigError``."""
    host = host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            [f"server.port: cannot listen on {host}:{port}: {exc.strerror or exc}"]
        ) from None
    except BaseException:
        sock.close()
        raise
    return sock


# ------------------------------------------------------------------------------ supervisor


@dataclass(eq=False)
class _Worker:
    role: WorkerRole
    process: trio.Process | None = None
    started_at: float = 0.0
    failures: int = 0
    done: bool = False
    """A drain worker that finished its shard (not restarted)."""
    ever_started: bool = False
    """It listened (or, a drain worker, ran to an exit) once: a later exit is a crash."""
    going: bool = False
    """The current process got going (see ``Supervisor._got_going``): it handles SIGHUP."""
    reload_pending: bool = False
    """A SIGHUP came while the current process was still starting: sent once it is going."""
    bind: str | None = None
    stopped: trio.Event = field(default_factory=trio.Event)


class Supervisor:
    """Starts the workers, restarts those that die, passes signals on, stops them all.

    ``settings`` are what the workers run (before each role applies its share): what they
    started with, updated by each SIGHUP whose file is valid, restart-only settings kept.
    Every worker, at its first start and every restart, gets them on its stdin.
    """

    def __init__(
        self,
        settings: Settings,
        config_path: str | None,
        *,
        command: Callable[[WorkerRole, str | None], Sequence[str]] | None = None,
    ) -> None:
        self.settings = settings
        self.config_path = config_path
        self.command = command or worker_command
        self.count = settings.server.workers
        self.stopping = False
        self.exit_code = 0
        self._stop = trio.Event()
        self.workdir: Path | None = None
        """Ports files and peer sockets; made by ``run`` and removed when it ends."""
        root = Path(settings.wal.root_path)
        self.orphans = orphan_shards(root, self.count)
        self._reserved: socket.socket | None = None
        self.workers: list[_Worker] = []

    def _reserve_port(self) -> int:
        """Bind (without listening) to learn the port and keep it while the workers run;
        only listening sockets receive connections.

        ``SO_REUSEPORT`` would also let us join a group that another program (another
        LogStack, say) listens with; a plain bind first makes a taken port an error."""
        server = self.settings.server
        if server.port:
            bind_socket(server.host, server.port, reuse_port=False).close()
        self._reserved = bind_socket(server.host, server.port, reuse_port=True)
        port: int = self._reserved.getsockname()[1]
        return port

    async def run(self) -> int:
        self.workdir = Path(tempfile.mkdtemp(prefix="logstack-workers-"))
        try:
            port = self._reserve_port()  # inside: a refused port leaves no directory behind
            self.workers = self._plan_workers(port, self.workdir)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._signals)
                for worker in self.workers:
                    nursery.start_soon(self._keep_running, worker)
                await self._announce(port)
                for worker in self.workers:
                    await worker.stopped.wait()
                nursery.cancel_scope.cancel()
        finally:
            if self._reserved is not None:
                self._reserved.close()
            shutil.rmtree(self.workdir, ignore_errors=True)
        return self.exit_code

    def _plan_workers(self, port: int, workdir: Path) -> list[_Worker]:
        """One serving worker per index, and one drain worker per shard left over."""
        supervisor = os.getpid()
        workers = [
            _Worker(
                WorkerRole(
                    index,
                    self.count,
                    port=port,
                    ports_file=str(workdir / f"worker-{index}.ports"),
                    peers_dir=str(workdir),
                    supervisor=supervisor,
                )
            )
            for index in range(self.count)
        ]
        for index in self.orphans:
            # Its private socket answers the workers' /metrics fan-out: the shard's lag and
            # disk use stay visible while it drains.
            role = WorkerRole(
                index, self.count, drain=True, peers_dir=str(workdir), supervisor=supervisor
            )
            workers.append(_Worker(role))
            log.warning(
                "WAL shard left by an earlier run with more workers: draining it",
                extra={"shard": index, "workers": self.count},
            )
        return workers

    async def _announce(self, port: int) -> None:
        """Once every serving worker listens, write ``server.bound_ports_file``."""
        deadline = trio.current_time() + START_TIMEOUT_S
        ports_files = [Path(w.role.ports_file) for w in self.workers if w.role.ports_file]
        while not all(path.is_file() and path.read_text().strip() for path in ports_files):
            if self.stopping:
                return
            if trio.current_time() > deadline:
                log.error("workers did not start listening in time; still waiting")
                deadline = trio.current_time() + START_TIMEOUT_S
            await trio.sleep(0.05)
        host = self.settings.server.host.strip("[]")
        bind = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
        log.info(
            "serving", extra={"binds": [bind], "workers": self.count, "drains": len(self.orphans)}
        )
        if self.settings.server.bound_ports_file:
            await trio.Path(self.settings.server.bound_ports_file).write_text(bind + "\n")

    async def _keep_running(self, worker: _Worker) -> None:
        try:
            while not self.stopping and not worker.done:
                code = await self._run_once(worker)
                if self.stopping:
                    break
                if worker.role.drain and code == 0:
                    worker.done = True
                    log.info("WAL shard drained", extra={"shard": worker.role.index})
                    break
                if not (worker.ever_started or worker.going or self._got_going(worker)):
                    # It never got going (a WAL it cannot open, a plugin that fails, ...):
                    # starting it again would fail the same way. Stop, as one process would,
                    # with its status: 2 says the configuration cannot be used.
                    log.error(
                        "worker failed to start; stopping (its own log lines say why)",
                        extra={"worker": worker.role.index, "exit_code": code},
                    )
                    self.exit_code = 2 if code == 2 else 1
                    self._stop_all()
                    break
                worker.ever_started = True
                if time.monotonic() - worker.started_at > STABLE_AFTER_S:
                    worker.failures = 0
                wait = RESTART_BACKOFF_S[min(worker.failures, len(RESTART_BACKOFF_S) - 1)]
                worker.failures += 1
                log.error(
                    "worker exited; starting it again",
                    extra={
                        "worker": worker.role.index,
                        "exit_code": code,
                        "restart_in_s": wait,
                    },
                )
                with trio.move_on_after(wait):
                    await self._stop.wait()
        finally:
            worker.stopped.set()

    async def _run_once(self, worker: _Worker) -> int:
        """Start the worker's process with the current settings; its exit status."""
        worker.started_at = time.monotonic()
        worker.going = False
        worker.reload_pending = False  # it starts from the settings the last SIGHUP left
        if worker.role.ports_file is not None:
            # The last process's file would say this one listens before it does.
            await trio.Path(worker.role.ports_file).unlink(missing_ok=True)
        settings = self.settings_document()
        command = list(self.command(worker.role, self.config_path))
        process = await trio.lowlevel.open_process(command, stdin=subprocess.PIPE)
        worker.process = process
        if self.stopping:
            # The stop came while the process was being started: _send_all missed it.
            _send_signal(process, signal.SIGTERM)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_hand_over, process, settings)
            nursery.start_soon(self._watch_start, worker, process)
            code = await process.wait()
            nursery.cancel_scope.cancel()
        return code

    def settings_document(self) -> bytes:
        """``settings`` as a worker reads them on its stdin (``--settings-stdin``)."""
        return json.dumps(self.settings.model_dump(mode="json", by_alias=True)).encode()

    async def _watch_start(self, worker: _Worker, process: trio.Process) -> None:
        """Mark the worker going once it is, and pass on a SIGHUP it missed until then."""
        while True:
            if self._got_going(worker):
                break
            await trio.sleep(GOING_POLL_S)
        worker.going = True
        if worker.reload_pending:
            worker.reload_pending = False
            log.info(
                "worker got going: passing on the SIGHUP that came while it started",
                extra={"worker": worker.role.index},
            )
            _send_signal(process, signal.SIGHUP)

    @staticmethod
    def _got_going(worker: _Worker) -> bool:
        """Whether the process that just exited had started: a serving worker once it
        listened; a drain worker (no port) once it ran past ``DRAIN_STARTUP_S``."""
        path = worker.role.ports_file
        if path is None:
            return time.monotonic() - worker.started_at > DRAIN_STARTUP_S
        return Path(path).is_file() and bool(Path(path).read_text().strip())

    def _stop_all(self) -> None:
        self.stopping = True
        self._stop.set()
        self._send_all(signal.SIGTERM)

    def _send_all(self, signum: int) -> None:
        for worker in self.workers:
            if worker.process is not None:
                _send_signal(worker.process, signum)

    def _reload_workers(self) -> None:
        """SIGHUP to every worker that got going; the others get it once they do (until
        then SIGHUP would find no handler, or be ignored, and the reload be lost)."""
        for worker in self.workers:
            if worker.going and worker.process is not None:
                _send_signal(worker.process, signal.SIGHUP)
            else:
                worker.reload_pending = True

    async def reload(self) -> bool:
        """Load and check the file as the workers will, and keep it for workers started
        from now on, restart-only settings kept as they run; a bad file changes nothing."""
        from ._registry import resolve_pipeline
        from ._service import keep_restart_only

        path = self.config_path

        def load() -> Settings:
            new = load_settings_for_reload(path)
            resolve_pipeline(new)  # a pipeline that would not start is a bad config too
            return new

        try:
            new = await trio.to_thread.run_sync(load)
        except ConfigError as exc:
            log.error(
                "config reload failed; workers keep, and restarted workers get, the running config",
                extra={"problems": exc.problems},
            )
            return False
        self.settings, kept = keep_restart_only(self.settings, new)
        if kept:  # ``server.workers`` above all: only the supervisor would act on it
            log.warning(
                "config reload: these settings take effect only when the service restarts; "
                "restarted workers get the running values",
                extra={"settings": kept},
            )
        log.info("config reloaded for restarted workers", extra={"kept_running": kept})
        return True

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    log.info("SIGHUP: workers reload their configuration")
                    await self.reload()
                    self._reload_workers()  # they report a bad file themselves, too
                    continue
                log.info("stopping the workers", extra={"signal": signal.Signals(signum).name})
                # A second signal reaches the workers as a second signal: they cancel the drain.
                self._stop_all()


def _send_signal(process: trio.Process, signum: int) -> None:
    if process.returncode is None:
        try:
            process.send_signal(signum)
        except ProcessLookupError:
            pass


async def _hand_over(process: trio.Process, document: bytes) -> None:
    """Write the settings to the worker's stdin and close it (EOF ends the document)."""
    assert process.stdin is not None
    try:
        async with process.stdin:
            await process.stdin.send_all(document)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # it died before reading them: its exit status tells the rest


def worker_command(role: WorkerRole, config_path: str | None) -> list[str]:
    """The worker's command line. Its settings come on stdin (``--settings-stdin``);
    ``--config`` is the file it reloads on SIGHUP."""
    command = [sys.executable, "-m", "logstack", "serve", "--worker", f"{role.index}/{role.count}"]
    command.append("--settings-stdin")
    if config_path is not None:
        command += ["--config", config_path]
    if role.drain:
        command.append("--drain")
    if role.port is not None:
        command += ["--port", str(role.port)]
    if role.ports_file is not None:
        command += ["--ports-file", role.ports_file]
    if role.peers_dir is not None:
        command += ["--peers", role.peers_dir]
    if role.supervisor is not None:
        command += ["--supervisor", str(role.supervisor)]
    return command


async def gather_metrics(role: WorkerRole, own: bytes, timeout_s: float = 2.0) -> bytes:
    """Every worker's metrics in one exposition, each sample labelled with its worker.

    The others are asked over their private sockets (``/metrics?scope=worker``); one that
    does not answer in time (being restarted, say) is left out and reported as
    ``logstack_worker_up{worker="<i>"} 0``.

    Drain workers (shards of an earlier run with more workers) are found by their sockets
    and labelled ``worker="<i>-drain"``: the lag and disk use of a shard still being
    delivered were missing from every scrape.
    """
    texts: dict[str, bytes] = {str(role.index): own}
    workers = [str(index) for index in range(role.count)]
    sockets = {str(index): role.peer_socket(index) for index in range(role.count)}
    if role.peers_dir is not None:
        for path in await trio.Path(role.peers_dir).glob("worker-*.sock"):
            index = path.stem.removeprefix("worker-")
            if index.isdigit() and int(index) >= role.count:
                workers.append(f"{index}-drain")
                sockets[f"{index}-drain"] = str(path)

    async def fetch(worker: str) -> None:
        path = sockets[worker]
        if path is None:
            return
        transport = httpx.AsyncHTTPTransport(uds=path)
        try:
            async with httpx.AsyncClient(transport=transport, timeout=timeout_s) as client:
                answer = await client.get("http://worker/metrics", params={"scope": "worker"})
                answer.raise_for_status()
        except (httpx.HTTPError, OSError):
            return
        texts[worker] = answer.content

    async with trio.open_nursery() as nursery:
        for worker in workers:
            if worker not in texts:
                nursery.start_soon(fetch, worker)
    merged = merge_expositions({worker: texts[worker] for worker in workers if worker in texts})
    up = [
        b"# HELP logstack_worker_up Whether the worker answered this scrape.",
        b"# TYPE logstack_worker_up gauge",
        *(
            b'logstack_worker_up{worker="%s"} %d' % (worker.encode(), worker in texts)
            for worker in workers
        ),
    ]
    return merged + b"\n".join(up) + b"\n"


def parse_worker(text: str) -> tuple[int, int]:
    """``"i/N"`` → ``(i, N)``."""
    index, _, count = text.partition("/")
    return int(index), int(count)


def needs_supervisor(settings: Settings) -> bool:
    """Several workers, or shards of an earlier multi-worker run still to deliver."""
    root = Path(settings.wal.root_path)
    return settings.server.workers > 1 or bool(orphan_shards(root, settings.server.workers))


def run_supervisor(settings: Settings, config_path: str | None) -> int:
    return trio.run(Supervisor(settings, config_path).run)


__all__ = [
    "SHARD_PREFIX",
    "Supervisor",
    "WorkerRole",
    "needs_supervisor",
    "orphan_shards",
    "parse_worker",
    "retire_shard",
    "run_supervisor",
    "shard_root",
    "worker_command",
]
