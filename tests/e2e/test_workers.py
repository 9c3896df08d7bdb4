"""``server.workers: 2``: one port, two processes, a WAL shard each, nothing lost.

Real processes throughout: the supervisor and its workers, SIGKILL of one worker, and a
restart with fewer workers that must still deliver what the removed worker's shard held.
"""

from __future__ import annotations

import json
import os
import signal
import socket
from collections.abc import AsyncIterator
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
    with pytest.raises(RuntimeError, match="exited with 1 before listening"):
        await trio.to_thread.run_sync(server.start)
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
