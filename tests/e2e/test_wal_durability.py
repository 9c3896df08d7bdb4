"""The WAL through the real server: crash cycles under load, quotas, idempotency, restarts."""

from __future__ import annotations

import json
import os
import random
import resource
from pathlib import Path

import httpx
import trio

from logstack._entry import LogEntry
from logstack._metrics import Metrics
from logstack._wal import KeyLog
from logstack._wal_format import EntryBatch
from logstack.testing import open_loki_receiver
from logstack.testing._process import TEST_TOKEN, TEST_TOKEN_2, LogstackProcess, make_test_config

INGEST = "/v1/logs:ingest"
# ≥ 20 in CI; CRASH_TEST_CYCLES=100 for a longer soak (not LOGSTACK_*: the server
# refuses unknown LOGSTACK_ variables, and the child inherits the environment).
CYCLES = int(os.environ.get("CRASH_TEST_CYCLES", "20"))


def headers(token: str = TEST_TOKEN, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json", **extra}


def batch(tag: str, n: int) -> dict[str, object]:
    return {
        "entries": [
            {
                "timestamp": "2026-01-01T00:00:00.000000001Z",
                "level": "INFO",
                "message": f"{tag}-{i}",
                "service": "crash-cycle",
                "env": "ci",
                "metadata": {"padding": "x" * 200},
            }
            for i in range(n)
        ]
    }


async def load_until_cancelled(url: str, cycle: int, acked: set[str]) -> int:
    """Post 10-entry batches from 8 connections until cancelled; record every 202."""
    sent = 0

    async def worker(w: int) -> None:
        nonlocal sent
        token = TEST_TOKEN if w % 2 else TEST_TOKEN_2
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            for n in range(10**9):
                body = batch(f"c{cycle}-w{w}-r{n}", 10)
                sent += 1
                try:
                    response = await client.post(INGEST, headers=headers(token), json=body)
                except httpx.TransportError:
                    return  # the server died under us: this request was never acked
                if response.status_code == 202:
                    acked.update(str(e["message"]) for e in body["entries"])  # type: ignore[attr-defined]

    async with trio.open_nursery() as nursery:
        for w in range(8):
            nursery.start_soon(worker, w)
    return sent


async def test_sigkill_at_random_moments_loses_no_acknowledged_entry(tmp_path: Path) -> None:
    """≥ 20 kill -9 cycles while a load generator posts and the forwarder delivers."""
    rng = random.Random(20261126)
    acked: set[str] = set()
    async with open_loki_receiver() as rx:
        config = make_test_config(
            tmp_path, rx.url, wal={"segment_max_bytes": 256 * 1024}, loki={"batch_max_wait_s": 0.05}
        )
        server = LogstackProcess(tmp_path, config)
        kills_during_load = 0
        for cycle in range(CYCLES):
            await trio.to_thread.run_sync(server.start)
            with trio.move_on_after(rng.uniform(0.2, 0.8)):
                await load_until_cancelled(server.url, cycle, acked)
            if not server.running:  # pragma: no cover - diagnostic
                raise AssertionError(server.log_tail())
            server.kill()
            kills_during_load += 1
        await trio.to_thread.run_sync(server.start)
        try:
            await rx.wait_for_entries(len(acked), timeout=120)
            with trio.move_on_after(2):  # let stragglers (re-sent in-flight pushes) land
                while True:
                    await trio.sleep(0.5)
            delivered = [json.loads(line)["message"] for line in rx.lines()]
            missing = acked - set(delivered)
            assert not missing, (
                f"{len(missing)} acknowledged entries lost, e.g. {sorted(missing)[:3]}"
            )
            # Duplicates come only from pushes in flight at a kill (Loki stores an exact
            # duplicate once and the receiver counts it): at most 4 pushes of ≤ 1000
            # entries per kill, in practice far fewer.
            print(
                f"\ncrash cycles: {kills_during_load} kills, {len(acked)} acked entries, "
                f"{len(set(delivered))} delivered, {rx.duplicates} duplicate entries re-sent"
            )
            assert rx.duplicates <= kills_during_load * 4 * 1000
            corrupt = [line for line in server.log_text().splitlines() if "Traceback" in line]
            assert not corrupt, corrupt[:3]
        finally:
            await trio.to_thread.run_sync(server.stop)


async def test_quota_429_for_one_key_while_another_is_served(tmp_path: Path) -> None:
    async with open_loki_receiver() as rx:
        port = rx.port
        rx.stop()  # Loki down: the backlog can only grow
    config = make_test_config(tmp_path, f"http://127.0.0.1:{port}", wal={"quota_bytes": 64 * 1024})
    server = LogstackProcess(tmp_path, config)
    await trio.to_thread.run_sync(server.start)
    try:
        async with httpx.AsyncClient(base_url=server.url) as client:
            statuses = []
            for n in range(100):
                response = await client.post(INGEST, headers=headers(), json=batch(f"q{n}", 5))
                statuses.append(response.status_code)
                if response.status_code == 429:
                    break
            assert statuses[-1] == 429, statuses
            doc = response.json()
            assert doc["error"] == "quota_exceeded"
            assert int(response.headers["Retry-After"]) >= 1
            assert all(s == 202 for s in statuses[:-1])
            other = await client.post(INGEST, headers=headers(TEST_TOKEN_2), json=batch("b", 5))
            assert other.status_code == 202
            # Still refused: nothing was delivered, and refusals cost no WAL space.
            again = await client.post(INGEST, headers=headers(), json=batch("again", 5))
            assert again.status_code == 429
    finally:
        await trio.to_thread.run_sync(server.stop)


async def test_disk_pressure_503_for_every_key(tmp_path: Path) -> None:
    config = make_test_config(tmp_path, "http://127.0.0.1:9", wal={"min_free_disk_ratio": 0.999})
    server = LogstackProcess(tmp_path, config)
    await trio.to_thread.run_sync(server.start)
    try:
        async with httpx.AsyncClient(base_url=server.url) as client:
            for token in (TEST_TOKEN, TEST_TOKEN_2):
                response = await client.post(INGEST, headers=headers(token), json=batch("d", 1))
                assert response.status_code == 503
                assert response.json()["error"] == "unavailable"
                assert int(response.headers["Retry-After"]) >= 1
            ready = await client.get("/readyz")
            assert ready.json()["checks"]["disk"]["ok"] is False
    finally:
        await trio.to_thread.run_sync(server.stop)


async def test_idempotency_key_survives_kill_9(tmp_path: Path) -> None:
    async with open_loki_receiver() as rx:
        server = LogstackProcess(tmp_path, make_test_config(tmp_path, rx.url))
        await trio.to_thread.run_sync(server.start)
        try:
            key = {"X-Idempotency-Key": "order-123-attempt"}
            async with httpx.AsyncClient(base_url=server.url) as client:
                first = await client.post(INGEST, headers=headers(**key), json=batch("idem", 3))
                assert first.status_code == 202
            server.kill()
            await trio.to_thread.run_sync(server.start)
            async with httpx.AsyncClient(base_url=server.url) as client:
                again = await client.post(INGEST, headers=headers(**key), json=batch("idem", 3))
                assert again.status_code == 202
                assert again.json()["request_id"] == first.json()["request_id"]
                assert again.json()["entries_accepted"] == 3
                # The same idempotency key from another API key is another request.
                other = await client.post(
                    INGEST, headers=headers(TEST_TOKEN_2, **key), json=batch("other", 3)
                )
                assert other.json()["request_id"] != first.json()["request_id"]
            await rx.wait_for_entries(6, timeout=20)
            with trio.move_on_after(1):
                while True:
                    await trio.sleep(0.2)
            messages = sorted(json.loads(line)["message"] for line in rx.lines())
            assert messages == sorted(
                [f"idem-{i}" for i in range(3)] + [f"other-{i}" for i in range(3)]
            )
            assert rx.duplicates == 0
        finally:
            await trio.to_thread.run_sync(server.stop)


async def test_a_full_disk_refuses_then_recovers_and_loses_nothing(tmp_path: Path) -> None:
    """The disk fills up mid-write (the kernel cuts the server's writes short:
    ``RLIMIT_FSIZE`` set on the running process) and empties again. The writes that were
    cut get 503, readiness says why and recovers by itself, the refused request's retry
    (same idempotency key) is stored, and every acknowledged entry arrives once."""
    async with open_loki_receiver() as rx:
        server = LogstackProcess(tmp_path, make_test_config(tmp_path, rx.url))
        await trio.to_thread.run_sync(server.start)
        assert server.proc is not None
        pid = server.proc.pid
        try:
            acked: list[str] = []
            retry = {"X-Idempotency-Key": "order-42"}
            async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
                # A segment larger than the server's log file, so that the limit below
                # cuts only the WAL's writes.
                for n in range(4):
                    response = await client.post(
                        INGEST, headers=headers(), json=batch(f"pad{n}", 500)
                    )
                    assert response.status_code == 202
                    acked += [f"pad{n}-{i}" for i in range(500)]
                await rx.wait_for_entries(len(acked), timeout=30)
                await trio.sleep(0.5)  # the checkpoint after the push is written
                (segment,) = (server.wal_root / "payments-api").glob("*.seg")
                limit = segment.stat().st_size + 100
                soft, hard = resource.prlimit(pid, resource.RLIMIT_FSIZE)
                resource.prlimit(pid, resource.RLIMIT_FSIZE, (limit, hard))
                refused = await client.post(
                    INGEST, headers=headers(**retry), json=batch("retry", 10)
                )
                assert refused.status_code == 503, refused.text
                assert refused.headers["Retry-After"]
                ready = await client.get("/readyz")
                assert ready.status_code == 503
                assert not ready.json()["checks"]["wal"]["ok"]
                resource.prlimit(pid, resource.RLIMIT_FSIZE, (soft, hard))  # room again
                with trio.fail_after(10):  # without any ingest to prove it
                    while (await client.get("/readyz")).status_code != 200:
                        await trio.sleep(0.2)
                again = await client.post(INGEST, headers=headers(**retry), json=batch("retry", 10))
                assert again.status_code == 202 and again.json()["entries_accepted"] == 10
                acked += [f"retry-{i}" for i in range(10)]
                after = await client.post(INGEST, headers=headers(), json=batch("after", 10))
                assert after.status_code == 202
                acked += [f"after-{i}" for i in range(10)]
            await rx.wait_for_entries(len(acked), timeout=30)
            messages = sorted(json.loads(line)["message"] for line in rx.lines())
            assert messages == sorted(acked)
            assert rx.duplicates == 0
        finally:
            server.stop()


async def test_graceful_restart_delivers_without_duplicates(tmp_path: Path) -> None:
    """A normal stop/start resumes exactly after the last delivered record."""
    async with open_loki_receiver() as rx:
        server = LogstackProcess(tmp_path, make_test_config(tmp_path, rx.url))
        for round_no in range(3):
            await trio.to_thread.run_sync(server.start)
            async with httpx.AsyncClient(base_url=server.url) as client:
                for n in range(20):
                    response = await client.post(
                        INGEST, headers=headers(), json=batch(f"g{round_no}-{n}", 5)
                    )
                    assert response.status_code == 202
            await rx.wait_for_entries(100 * (round_no + 1), timeout=20)
            # stop() blocks: run it in a thread so this process's receiver keeps answering.
            assert await trio.to_thread.run_sync(server.stop) == 0
        assert rx.duplicates == 0
        assert len(rx.lines()) == 300


async def test_a_wal_written_before_line_batches_is_delivered_after_the_upgrade(
    tmp_path: Path,
) -> None:
    """Records as an earlier LogStack wrote them (``EntryBatch``: the entries field by
    field) are delivered by the current server, in order, with the lines rendering them
    gives, followed by what the server writes itself (``LineBatch``)."""
    old_entries = [
        LogEntry(
            1_767_225_600_000_000_000 + i,
            "WARN",
            f"before-{i}",
            "upgrade",
            "ci",
            {"region": "eu"},
            trace_id="4bf92f3577b34da6a3ce929d0e0e4736" if i % 2 else None,
            metadata={"i": i},
            timestamp="2026-01-01T00:00:00Z",
        )
        for i in range(30)
    ]
    directory = tmp_path / "wal" / "payments-api"
    directory.mkdir(parents=True)
    keylog = KeyLog("payments-api", directory, 1 << 20, Metrics())
    for n in range(3):
        keylog.append([EntryBatch(f"old-{n}", 1, old_entries[n * 10 : (n + 1) * 10])])
    keylog.sync_blocking()
    keylog.close()

    async with open_loki_receiver() as rx:
        server = LogstackProcess(tmp_path, make_test_config(tmp_path, rx.url))
        await trio.to_thread.run_sync(server.start)
        try:
            async with httpx.AsyncClient(base_url=server.url) as client:
                response = await client.post(INGEST, headers=headers(), json=batch("after", 5))
                assert response.status_code == 202
            await rx.wait_for_entries(35, timeout=20)
        finally:
            assert await trio.to_thread.run_sync(server.stop) == 0
        delivered = [json.loads(line) for line in rx.lines()]
    expected_old = [
        {"message": e.message, "metadata": e.metadata}
        | ({"trace_id": e.trace_id} if e.trace_id else {})
        for e in old_entries
    ]
    assert [d for d in delivered if d["message"].startswith("before-")] == expected_old
    assert [d["message"] for d in delivered if d["message"].startswith("after-")] == [
        f"after-{i}" for i in range(5)
    ]
    assert rx.duplicates == 0
