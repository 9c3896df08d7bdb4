"""``server.workers: 2``: one port, two processes, a WAL shard each, nothing lost.

Real processes throughout: the supervisor and its workers, SIGKILL of one worker, and a
restart with fewer workers that must still deliver what the removed worker's shard held.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from logstack.bench._procstat import process_tree
from logstack.testing import open_loki_receiver
from logstack.testing._process import TEST_TOKEN, LogstackProcess, deep_merge, make_test_config

INGEST = "/v1/logs:ingest"
HEADERS = {"Authorization": f"Bearer {TEST_TOKEN}", "Content-Type": "application/json"}


def batch(tag: str, n: int, size: int = 5) -> dict[str, object]:
    return {
        "entries": [
            {
                "timestamp": f"2026-01-01T00:00:00.{n:05d}{i:04d}Z",
                "level": "INFO",
                "message": f"{tag}-{n}-{i}",
                "service": "workers-test",
                "env": "ci",
            }
            for i in range(size)
        ]
    }


async def post_batches(url: str, tag: str, count: int, connections: int = 16) -> set[str]:
    """POST ``count`` batches, each connection its own client (so its own source port,
    which is what the kernel spreads over the workers); retry what is refused."""
    acked: set[str] = set()
    send, receive = trio.open_memory_channel[int](count)
    for n in range(count):
        send.send_nowait(n)
    send.close()

    async def connection() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            async for n in receive:
                body = batch(tag, n)
                for _ in range(50):
                    try:
                        response = await client.post(INGEST, headers=HEADERS, json=body)
                    except httpx.TransportError:
                        await trio.sleep(0.1)  # a worker being restarted
                        continue
                    if response.status_code == 202:
                        acked.update(str(e["message"]) for e in body["entries"])  # type: ignore[attr-defined]
                        break
                    await trio.sleep(0.1)

    async with trio.open_nursery() as nursery:
        for _ in range(connections):
            nursery.start_soon(connection)
    return acked


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus exposition (which must parse) by name and labels."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@asynccontextmanager
async def running(server: LogstackProcess) -> AsyncIterator[LogstackProcess]:
    """The server started (it listens) for the block, stopped with SIGTERM after it."""
    await trio.to_thread.run_sync(server.start)
    try:
        yield server
    finally:
        await trio.to_thread.run_sync(server.stop)


def child_pids(pid: int) -> list[int]:
    """The supervisor's worker processes (they start none of their own)."""
    return sorted(process_tree(pid)[1:])


def segments(root: Path) -> dict[str, int]:
    """Segment files per shard directory ("." for shard 0)."""
    found: dict[str, int] = {}
    for path in root.glob("**/*.seg"):
        shard = path.parent.parent.relative_to(root).as_posix()
        found[shard] = found.get(shard, 0) + 1
    return found


def server_for(tmp_path: Path, loki_port: int, workers: int) -> LogstackProcess:
    return LogstackProcess(
        tmp_path,
        make_test_config(
            tmp_path,
            f"http://127.0.0.1:{loki_port}",
            server={"workers": workers},
            security={"rate_limit_rps": 100_000, "rate_limit_burst": 100_000},
        ),
    )


async def test_two_workers_share_the_port_and_write_their_own_shards(tmp_path: Path) -> None:
    async with open_loki_receiver() as rx:
        server = server_for(tmp_path, rx.port, workers=2)
        async with running(server):
            assert server.proc is not None
            assert len(child_pids(server.proc.pid)) == 2
            acked = await post_batches(server.url, "share", 200)
            assert len(acked) == 200 * 5
            await rx.wait_for_entries(len(acked), timeout=60)
            delivered = [json.loads(line)["message"] for line in rx.lines()]
            assert sorted(delivered) == sorted(acked)  # every entry, exactly once
            # Both workers took connections, and each wrote only its own shard.
            assert set(segments(server.wal_root)) == {".", "_shard-1"}
            # Whichever worker answers /metrics, the answer covers both, sample by sample.
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                for _ in range(4):
                    text = (await client.get("/metrics")).text
                    samples = parse_metrics(text)
                    assert samples[("logstack_worker_up", (("worker", "0"),))] == 1
                    assert samples[("logstack_worker_up", (("worker", "1"),))] == 1
                    ingested = {
                        labels: value
                        for (name, labels), value in samples.items()
                        if name == "logs_ingested_total"
                    }
                    assert {dict(labels)["worker"] for labels in ingested} == {"0", "1"}
                    assert sum(ingested.values()) == len(acked)
                local = parse_metrics((await client.get("/metrics?scope=worker")).text)
                assert not any(name == "logstack_worker_up" for name, _ in local)
            # Every answer says which worker gave it; new connections reach both.
            answered = set()
            for _ in range(40):
                async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                    answered.add((await client.get("/healthz")).headers["x-logstack-worker"])
            assert answered == {"0", "1"}
        assert server.proc is not None and server.proc.returncode == 0


async def test_a_killed_worker_is_restarted_and_loses_nothing(tmp_path: Path) -> None:
    async with open_loki_receiver() as rx:
        server = server_for(tmp_path, rx.port, workers=2)
        async with running(server):
            assert server.proc is not None
            before = await post_batches(server.url, "before", 50)
            victim = child_pids(server.proc.pid)[0]
            os.kill(victim, signal.SIGKILL)
            after = await post_batches(server.url, "after", 50)
            with trio.fail_after(30):
                while len(pids := child_pids(server.proc.pid)) < 2 or victim in pids:
                    await trio.sleep(0.1)
            acked = before | after
            assert len(acked) == 100 * 5
            await rx.wait_for_entries(len(acked), timeout=60)
            delivered = {json.loads(line)["message"] for line in rx.lines()}
            assert acked <= delivered
        log = server.log_file.read_text()
        assert "worker exited; starting it again" in log


async def test_fewer_workers_still_deliver_the_shards_left_behind(tmp_path: Path) -> None:
    async with open_loki_receiver() as rx:
        port = rx.port
        rx.stop()  # Loki down: both shards fill up
    server = server_for(tmp_path, port, workers=2)
    async with running(server):
        acked = await post_batches(server.url, "left", 100)
    assert len(acked) == 100 * 5
    assert "_shard-1" in segments(server.wal_root)

    async with open_loki_receiver(port=port) as rx:
        single = server_for(tmp_path, port, workers=1)
        async with running(single):
            await rx.wait_for_entries(len(acked), timeout=60)
            delivered = [json.loads(line)["message"] for line in rx.lines()]
            assert sorted(delivered) == sorted(acked)
            # The drain worker removes the delivered shard and exits; the worker stays.
            assert single.proc is not None
            with trio.fail_after(30):
                while (server.wal_root / "_shard-1").exists():
                    await trio.sleep(0.1)
                while len(child_pids(single.proc.pid)) != 1:
                    await trio.sleep(0.1)
            async with httpx.AsyncClient(base_url=single.url, timeout=30) as client:
                response = await client.post(INGEST, headers=HEADERS, json=batch("new", 0))
            assert response.status_code == 202
        log = single.log_file.read_text()
        assert "WAL shard drained" in log
        # Each worker's lines say whose they are (a damaged shard's line read the same as
        # another's); the supervisor's say nothing.
        this_run = log.rpartition("--- start #")[2]  # the file has the first run's too
        docs = [json.loads(line) for line in this_run.splitlines() if line.startswith("{")]
        assert {doc.get("worker", "supervisor") for doc in docs} == {"0", "1-drain", "supervisor"}
        [drained] = [doc for doc in docs if doc["msg"] == "WAL shard drained"]
        assert "worker" not in drained and drained["shard"] == 1  # the supervisor's line


async def test_a_shard_being_drained_is_in_the_metrics(tmp_path: Path) -> None:
    """The drain worker served no HTTP, so no scrape showed its shard: its undelivered
    bytes and lag were missing while Loki was down, and what it forwarded was never
    counted (an audit). Its private socket now answers the fan-out, as ``<i>-drain``."""
    async with open_loki_receiver() as rx:
        port = rx.port
        rx.stop()  # Loki down: both shards fill up and stay
    server = server_for(tmp_path, port, workers=2)
    async with running(server):
        assert len(await post_batches(server.url, "left", 20)) == 20 * 5
    single = server_for(tmp_path, port, workers=1)
    async with running(single), httpx.AsyncClient(base_url=single.url, timeout=30) as client:

        async def samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
            return parse_metrics((await client.get("/metrics")).text)

        drain = (("worker", "1-drain"),)
        with trio.fail_after(30):
            while ("logstack_worker_up", drain) not in (found := await samples()):
                await trio.sleep(0.1)
        assert found["logstack_worker_up", drain] == 1
        shard_bytes = found["wal_disk_usage_bytes", (("token", "payments-api"), *drain)]
        assert shard_bytes > 0
        assert found["forwarder_lag_seconds", (("token", "payments-api"), *drain)] > 0
        assert found["logstack_worker_up", (("worker", "0"),)] == 1

        async with open_loki_receiver(port=port):
            with trio.fail_after(60):  # the drain delivers, exits, and leaves the scrape
                while ("logstack_worker_up", drain) in await samples():
                    await trio.sleep(0.2)


async def test_workers_stop_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    server = server_for(tmp_path, 9, workers=2)
    await trio.to_thread.run_sync(server.start)
    assert server.proc is not None
    workers = child_pids(server.proc.pid)
    assert len(workers) == 2
    server.kill()  # SIGKILL: the supervisor cannot pass anything on
    with trio.fail_after(30):
        while any(_running(pid) for pid in workers):
            await trio.sleep(0.1)


def _running(pid: int) -> bool:
    """Alive and not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_a_worker_that_cannot_start_stops_everything(tmp_path: Path) -> None:
    """A WAL root the workers cannot open fails them at once: the supervisor stops with
    an error instead of restarting them forever."""
    server = server_for(tmp_path, 9, workers=2)
    (tmp_path / "wal").write_text("not a directory")
    with pytest.raises(RuntimeError, match="exited with 2 before listening"):
        await trio.to_thread.run_sync(server.start)  # 2, as one process: a bad config
    assert "worker failed to start; stopping" in server.log_file.read_text()


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_taken_port_is_a_clear_error(tmp_path: Path, workers: int) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = server_for(tmp_path, 9, workers=workers)
        server.config = deep_merge(server.config, {"server": {"port": port}})
        with pytest.raises(RuntimeError, match="exited with 2 before listening"):
            await trio.to_thread.run_sync(server.start)
    assert f"cannot listen on 127.0.0.1:{port}" in server.log_file.read_text()
    assert not (tmp_path / "wal").exists()  # refused before the WAL was touched


def workers_by_index(pid: int) -> dict[str, int]:
    """The supervisor's children by their ``--worker`` argument ("0/2", ...); a drain
    worker's key ends in ``d``."""
    found = {}
    for child in child_pids(pid):
        try:
            args = Path(f"/proc/{child}/cmdline").read_bytes().decode().split("\0")
        except FileNotFoundError:
            continue
        if "--worker" in args:
            key = args[args.index("--worker") + 1] + ("d" if "--drain" in args else "")
            found[key] = child
    return found


def ports_file_of(pid: int) -> Path:
    args = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    return Path(args[args.index("--ports-file") + 1])


async def wait_until(check: Callable[[], bool], timeout: float = 30.0) -> None:  # noqa: ASYNC109
    with trio.fail_after(timeout):
        while not check():
            await trio.sleep(0.05)


def log_count(server: LogstackProcess, text: str) -> int:
    return server.log_text().count(text)


async def kill_and_wait_for_restart(server: LogstackProcess, key: str) -> None:
    """SIGKILL worker ``key`` and wait until the process started in its place listens."""
    assert server.proc is not None
    supervisor = server.proc.pid
    victim = workers_by_index(supervisor)[key]
    os.kill(victim, signal.SIGKILL)

    def listening_again() -> bool:
        pid = workers_by_index(supervisor).get(key)
        if pid is None or pid == victim:
            return False
        path = ports_file_of(pid)
        return path.is_file() and bool(path.read_text().strip()) and _running(pid)

    await wait_until(listening_again)


async def test_a_restarted_worker_runs_what_the_others_run(tmp_path: Path) -> None:
    """A worker started again gets the supervisor's settings, not the file's: neither a
    restart-only value the running workers kept, nor a file they refused."""
    async with open_loki_receiver() as rx:
        server = server_for(tmp_path, rx.port, workers=2)
        async with running(server):
            moved = deep_merge(server.config, {"wal": {"root_path": str(tmp_path / "moved")}})
            server.write_config(moved)
            server.signal(signal.SIGHUP)
            # The supervisor reloads before it passes SIGHUP on: the workers' lines come after.
            await wait_until(lambda: log_count(server, "need a restart; keeping") == 2)
            # The supervisor warns too (it logged INFO only: ``server.workers`` changed by a
            # reload went unnoticed).
            assert log_count(server, "take effect only when the service restarts") == 1
            await kill_and_wait_for_restart(server, "1/2")
            acked = await post_batches(server.url, "moved", 40)
            server.config_path.write_text("security: [")
            server.signal(signal.SIGHUP)
            await wait_until(lambda: log_count(server, "reload failed; keeping the running") == 2)
            await kill_and_wait_for_restart(server, "0/2")
            acked |= await post_batches(server.url, "broken", 40)
            await trio.sleep(1)  # a worker crash-looping on the broken file would show now
            assert len(acked) == 80 * 5
            await rx.wait_for_entries(len(acked), timeout=60)
            assert acked <= {json.loads(line)["message"] for line in rx.lines()}
        assert server.proc is not None and server.proc.returncode == 0
        assert not (tmp_path / "moved").exists()  # every shard stayed where it was
        assert log_count(server, "worker exited; starting it again") == 2


async def test_one_worker_with_a_shard_left_over_is_still_supervised(tmp_path: Path) -> None:
    """Down to one worker with ``_shard-1`` left: worker 0 of 1 is a supervised worker
    (private ports file, restarted when killed), not a process on its own."""
    async with open_loki_receiver() as rx:
        port = rx.port
        rx.stop()  # Loki down: the shard stays, its drain worker keeps running
    server = server_for(tmp_path, port, workers=2)
    async with running(server):
        assert len(await post_batches(server.url, "left", 20)) == 20 * 5
    single = server_for(tmp_path, port, workers=1)
    async with running(single):
        assert single.proc is not None
        assert set(workers_by_index(single.proc.pid)) == {"0/1", "1/1d"}
        await wait_until(lambda: '"logger":"logstack.workers","msg":"serving"' in single.log_text())
        assert single.port_file.read_text() == single.url + "\n"  # the supervisor's line
        await kill_and_wait_for_restart(single, "0/1")
        async with httpx.AsyncClient(base_url=single.url, timeout=30) as client:
            assert (await client.get("/healthz")).headers["x-logstack-worker"] == "0"
    assert single.proc.returncode == 0
    assert log_count(single, "worker exited; starting it again") == 1


def start_in_background(server: LogstackProcess) -> subprocess.Popen[bytes]:
    """Start the supervisor without waiting for it to listen."""
    server.write_config()
    log = server.log_file.open("ab")
    return subprocess.Popen(
        server.command(), stdout=log, stderr=subprocess.STDOUT, cwd=server.workdir
    )


async def test_workers_stop_when_the_supervisor_dies_while_they_start(tmp_path: Path) -> None:
    server = server_for(tmp_path, 9, workers=2)
    supervisor = start_in_background(server)
    workers: list[int] = []
    try:
        await wait_until(lambda: len(child_pids(supervisor.pid)) == 2, timeout=10)
        workers = child_pids(supervisor.pid)
        supervisor.kill()  # long before the workers finished their imports
        supervisor.wait()
        with trio.fail_after(30):
            while any(_running(pid) for pid in workers):
                await trio.sleep(0.1)
    finally:
        for pid in workers:
            if _running(pid):
                os.kill(pid, signal.SIGKILL)
        supervisor.kill()
        supervisor.wait()


async def test_a_sighup_while_the_workers_start_is_passed_on_once_they_listen(
    tmp_path: Path,
) -> None:
    server = server_for(tmp_path, 9, workers=2)

    async def hang_up_early() -> None:
        await wait_until(lambda: server.proc is not None and len(child_pids(server.proc.pid)) == 2)
        server.signal(signal.SIGHUP)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(hang_up_early)
        async with running(server):
            # Both workers live through it, and each reloads once it listens.
            await wait_until(lambda: log_count(server, '"msg":"config reloaded"') == 2)
            assert log_count(server, "passing on the SIGHUP that came while it started") == 2
    assert server.proc is not None and server.proc.returncode == 0


async def test_a_stop_signal_to_the_process_group_is_one_request(tmp_path: Path) -> None:
    """systemd's KillMode=control-group, or Ctrl-C: each worker gets SIGTERM directly and
    again through the supervisor; the second must not cancel the drain."""
    server = server_for(tmp_path, 9, workers=2)
    server.launcher = ["setsid"]  # its own process group, as under systemd
    async with running(server):
        assert server.proc is not None
        os.killpg(server.proc.pid, signal.SIGTERM)
        await trio.to_thread.run_sync(server.proc.wait, 30)
    assert server.proc.returncode == 0
    assert log_count(server, "second stop request") == 0
    # (Each worker says "stop request repeated at once" unless both signals arrived before
    # it handled the first: pending signals are merged.)
    assert log_count(server, '"clean":true') == 2
