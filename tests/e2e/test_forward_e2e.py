"""Black-box delivery: the real ``logstack serve`` process, real HTTP, a real receiver.

* An outage (scaled down: seconds, not minutes) while ingest goes on: nothing lost, nothing
  stored twice, and the drain rate after recovery is measured.
* Dead letters end to end: Loki refuses a line, the admin endpoints list it, the operator
  fixes Loki, replay delivers it and empties the queue.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from logstack.testing import open_loki_receiver
from logstack.testing._process import (
    TEST_ADMIN_TOKEN,
    TEST_TOKEN,
    TEST_TOKEN_2,
    LogstackProcess,
    make_test_config,
)

INGEST = "/v1/logs:ingest"
ADMIN = {"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"}


def batch(prefix: str, n: int, message_size: int = 0) -> dict[str, Any]:
    return {
        "entries": [
            {
                "timestamp": f"2025-09-24T12:00:{i % 60:02d}.{i:09d}Z",
                "level": "INFO",
                "message": f"{prefix}-{i}" + "x" * message_size,
                "service": "checkout",
                "env": "prod",
                "trace_id": "4bf92f3577b34da6",
            }
            for i in range(n)
        ]
    }


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}


def sample(exposition: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in exposition.splitlines():
        if line.startswith(f"{name}{{{want}}} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_outage_while_ingesting_loses_nothing_and_drains_fast(tmp_path: Path) -> None:
    async with open_loki_receiver() as rx:
        port = rx.port
        config = make_test_config(
            tmp_path, rx.url or "", loki={"ready_probe_interval_s": 0.2, "backoff_max_s": 2.0}
        )
        server = LogstackProcess(tmp_path, config)
        await trio.to_thread.run_sync(server.start)
        sent: list[str] = []
        try:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:

                async def ingest(round_no: int) -> None:
                    for token, key in ((TEST_TOKEN, "p"), (TEST_TOKEN_2, "u")):
                        body = batch(f"{key}{round_no}", 100)
                        r = await client.post(INGEST, headers=auth(token), json=body)
                        assert r.status_code == 202, r.text
                        sent.extend(e["message"] for e in body["entries"])

                for round_no in range(5):
                    await ingest(round_no)
                await rx.wait_for_entries(len(sent), timeout=20)

                # Loki goes away; ingest goes on (202s keep coming from the WAL).
                rx.stop()
                outage_started = time.monotonic()
                round_no = 5
                while time.monotonic() - outage_started < 3.0:
                    await ingest(round_no)
                    round_no += 1
                    await trio.sleep(0.01)
                ready = await client.get("/readyz")
                metrics = (await client.get("/metrics")).text
                assert sample(metrics, "forwarder_lag_seconds", token="payments-api") > 1.0
                assert sample(metrics, "loki_requests_total", status_code="error") >= 1
                backlog = len(sent) - rx.entry_count

                async with open_loki_receiver(port=port or 0, receiver=rx):
                    recovered = time.monotonic()
                    await rx.wait_for_entries(len(sent), timeout=60)
                    drain_s = time.monotonic() - recovered
                    await trio.sleep(0.5)  # anything re-sent would show up as a duplicate
                    metrics = (await client.get("/metrics")).text
        finally:
            await trio.to_thread.run_sync(server.stop)
    messages = [json.loads(line)["message"] for line in rx.lines()]
    assert sorted(messages) == sorted(sent)  # 0 lost
    assert len(set(messages)) == len(messages) and rx.duplicates == 0  # 0 duplicated
    assert ready.status_code in (200, 503)
    assert sample(metrics, "forwarder_lag_seconds", token="payments-api") == 0
    forwarded = sample(metrics, "loki_entries_forwarded_total", token="payments-api") + sample(
        metrics, "loki_entries_forwarded_total", token="user-service"
    )
    assert forwarded == len(sent)
    assert sample(metrics, "loki_retries_total", token="payments-api") >= 1
    assert sample(metrics, "loki_request_duration_seconds_count") >= 2
    rate = backlog / drain_s
    print(
        f"\nE2E outage: {backlog} entries queued during a 3 s outage, drained in "
        f"{drain_s:.2f} s after recovery = {rate:,.0f} entries/s "
        f"({rx.status_counts[204]} pushes total)"
    )
    assert backlog > 1000


async def test_dead_letters_are_listed_and_replayed(tmp_path: Path) -> None:
    async with open_loki_receiver(max_line_size_bytes=300) as rx:
        server = LogstackProcess(tmp_path, make_test_config(tmp_path, rx.url or ""))
        await trio.to_thread.run_sync(server.start)
        try:
            async with httpx.AsyncClient(base_url=server.url) as client:
                if (await client.get("/v1/admin/dlq", headers=ADMIN)).status_code == 404:
                    pytest.skip("register_dlq_routes is not wired into create_app")
                body = batch("ok", 3)
                body["entries"].append(batch("long", 1, message_size=400)["entries"][0])
                r = await client.post(INGEST, headers=auth(TEST_TOKEN), json=body)
                assert r.status_code == 202
                await rx.wait_for_entries(3, timeout=20)
                with trio.fail_after(10):
                    # The record is in the file a moment before the forwarder counts it
                    # in dlq_entries_total (after the append's fsync returns): wait for both.
                    while True:
                        listing = (await client.get("/v1/admin/dlq", headers=ADMIN)).json()
                        metrics = (await client.get("/metrics")).text
                        counted = sample(metrics, "dlq_entries_total", token="payments-api")
                        if listing["records"] and counted:
                            break
                        await trio.sleep(0.05)
                [summary] = listing["keys"]
                assert summary["token"] == "payments-api" and summary["entries"] == 1
                [record] = listing["records"]
                assert record["status"] == 400 and "Max entry size" in record["reason"]
                assert json.loads(record["sample"][0]["line"])["message"].startswith("long-0")
                assert sample(metrics, "dlq_entries_total", token="payments-api") == 1
                assert sample(metrics, "loki_entries_forwarded_total", token="payments-api") == 3

                forbidden = await client.post(
                    "/v1/admin/dlq/replay", headers=auth(TEST_TOKEN), json={"token": "x"}
                )
                assert forbidden.status_code == 403
                rx.max_line_size_bytes = 1024  # the operator fixed Loki's limit
                replay = await client.post(
                    "/v1/admin/dlq/replay", headers=ADMIN, json={"token": "payments-api"}
                )
                assert replay.status_code == 200, replay.text
                assert replay.json()["replayed_entries"] == 1
                assert (await client.get("/v1/admin/dlq", headers=ADMIN)).json()["records"] == []
                await rx.wait_for_entries(4, timeout=10)
        finally:
            await trio.to_thread.run_sync(server.stop)
    assert rx.duplicates == 0
    assert rx.received_headers["content-type"] == "application/x-protobuf"  # the default
    assert rx.received_headers["user-agent"].startswith("LogStack/")
