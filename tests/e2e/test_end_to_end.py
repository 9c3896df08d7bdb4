"""Black-box: the real ``logstack serve`` process, real HTTP, real WAL files, a real receiver."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import trio

from logstack.testing import open_loki_receiver
from logstack.testing._process import TEST_TOKEN, LogstackProcess, make_test_config

INGEST = "/v1/logs:ingest"
HEADERS = {"Authorization": f"Bearer {TEST_TOKEN}", "Content-Type": "application/json"}

# The seed README's example batch, plus the secrets a careless client sends along.
SEED_BATCH: dict[str, Any] = {
    "entries": [
        {
            "timestamp": "2025-09-24T12:00:00.123456789Z",
            "level": "ERROR",
            "message": "Payment failed",
            "service": "payments-api",
            "env": "prod",
            "labels": {"region": "eu-west-1", "level": "DEBUG"},
            "metadata": {
                "order_id": "O-123",
                "amount": 12000,
                "password": "hunter2-very-secret",
                "customer": {"Api-Key": "ak_live_51HxSECRETKEY"},
            },
        }
    ]
}
SECRETS = [b"hunter2-very-secret", b"ak_live_51HxSECRETKEY"]


def wal_bytes(root: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file())


async def test_seed_example_reaches_loki_masked(tmp_path: Path) -> None:
    async with open_loki_receiver() as rx:
        server = LogstackProcess(tmp_path, make_test_config(tmp_path, rx.url))
        await trio.to_thread.run_sync(server.start)
        try:
            async with httpx.AsyncClient(base_url=server.url) as client:
                response = await client.post(INGEST, headers=HEADERS, json=SEED_BATCH)
            assert response.status_code == 202, response.text
            assert response.json()["entries_accepted"] == 1

            await rx.wait_for_entries(1, timeout=20)
            [(labels, entry)] = rx.entries()
            # Stream labels: service, env, level from the entry; the client's label
            # "level" never overrides the entry's own field.
            assert labels == {
                "service": "payments-api",
                "env": "prod",
                "level": "ERROR",
                "region": "eu-west-1",
            }
            assert entry.timestamp_ns == 1758715200_123456789
            line = json.loads(entry.line)
            assert line["message"] == "Payment failed"
            assert line["metadata"]["password"] == "****"
            assert line["metadata"]["customer"]["Api-Key"] == "****"
            assert line["metadata"]["order_id"] == "O-123"
            assert line["metadata"]["amount"] == 12000

            on_disk = wal_bytes(server.wal_root)
            assert b"Payment failed" in on_disk  # we are looking at the right bytes
            for secret in SECRETS:
                assert secret not in on_disk
            for secret in SECRETS:
                assert secret.decode() not in "".join(rx.lines())
            assert TEST_TOKEN.encode() not in on_disk
            assert not any(TEST_TOKEN in p.name for p in server.wal_root.rglob("*"))
            assert (server.wal_root / "payments-api").is_dir()

            # The receiver stores the entry before the forwarder has read its 204.
            forwarded = 'loki_entries_forwarded_total{token="payments-api"} 1.0'
            async with httpx.AsyncClient(base_url=server.url) as client:
                with trio.fail_after(10):
                    while forwarded not in (exposition := (await client.get("/metrics")).text):
                        await trio.sleep(0.05)
            for sample in (
                'logs_ingested_total{token="payments-api"} 1.0',
                forwarded,
                'masked_fields_total{key="password",token="payments-api"} 1.0',
                'http_requests_total{endpoint="/v1/logs:ingest",method="POST",status_code="202"}'
                " 1.0",
            ):
                assert sample in exposition, sample
        finally:
            await trio.to_thread.run_sync(server.stop)
        assert TEST_TOKEN not in server.log_text()


async def test_waits_in_wal_while_loki_is_down_then_delivers(tmp_path: Path) -> None:
    """No Loki at start: 202s still answer, readiness says why, delivery follows recovery."""
    async with open_loki_receiver() as rx:
        port = rx.port
        rx.stop()
    server = LogstackProcess(tmp_path, make_test_config(tmp_path, f"http://127.0.0.1:{port}"))
    await trio.to_thread.run_sync(server.start)
    try:
        async with httpx.AsyncClient(base_url=server.url) as client:
            for i in range(5):
                batch = {"entries": [{**SEED_BATCH["entries"][0], "message": f"m{i}"}]}
                response = await client.post(INGEST, headers=HEADERS, json=batch)
                assert response.status_code == 202, response.text
            ready = await client.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["checks"]["loki"]["ok"] is False
            async with open_loki_receiver(port=port) as rx:
                await rx.wait_for_entries(5, timeout=30)
                assert sorted(json.loads(line)["message"] for line in rx.lines()) == [
                    f"m{i}" for i in range(5)
                ]
                with trio.fail_after(15):
                    while (await client.get("/readyz")).status_code != 200:
                        await trio.sleep(0.2)
    finally:
        await trio.to_thread.run_sync(server.stop)
