"""End to end: the installed plugin inside the real ``logstack serve`` pipeline.

A real server child process with ``acme_mask_iban`` in its ``pipeline:``, real HTTP, the
real WAL on disk and the Loki-compatible receiver: the account numbers reach neither the
disk nor Loki. Needs the plugin installed (``make install`` does it), as any plugin does.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import trio
import yaml

from logstack.testing import TEST_TOKEN, LogstackProcess, make_test_config, open_loki_receiver

INGEST = "/v1/logs:ingest"
HEADERS = {"Authorization": f"Bearer {TEST_TOKEN}", "Content-Type": "application/json"}

PIPELINE: list[dict[str, Any]] = [
    {"type": "auth"},
    {"type": "acme_mask_iban", "options": {"keep_last": 4}},
    {"type": "mask"},
    {"type": "validate"},
    {"type": "wal_append"},
    {"type": "batch"},
    {"type": "forward_loki"},
]

IBANS = [
    "DE89370400440532013000",
    "GB82WEST12345698765432",
    "NL91ABNA0417164300",
    "PL61109010140000071219812874",
]
PL = "PL61 1090 1014 0000 0712 1981 2874"
"""Sixteen of its digits pass the Luhn check: ``mask``'s card detector, run first, would
mask those alone and leave ``PL61 ****0712 1981 2874``, no IBAN any more, with ten of the
account's digits in clear (what placing this stage before ``mask`` avoids)."""
BATCH = {
    "entries": [
        {
            "timestamp": "2025-09-24T12:00:00.000Z",
            "level": "ERROR",
            "message": "Refund to DE89 3704 0044 0532 0130 00 failed",
            "service": "payments-api",
            "env": "prod",
            "labels": {"region": "eu-west-1", "tenant": "NL91ABNA0417164300"},
            "metadata": {
                "order_id": "O-123",
                "payee": {"iban": "GB82WEST12345698765432", "password": "hunter2-secret"},
                "reference": "DE00123456781234567890",  # check digits 00: never an IBAN
                "refund_to": PL,
            },
        }
    ]
}


def logstack(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "logstack", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_the_plugin_masks_in_the_live_pipeline(tmp_path: Path) -> None:
    async with open_loki_receiver() as rx:
        config = make_test_config(tmp_path, rx.url, pipeline=PIPELINE)
        server = LogstackProcess(tmp_path, config)
        await trio.to_thread.run_sync(server.start)
        try:
            async with httpx.AsyncClient(base_url=server.url) as client:
                response = await client.post(INGEST, headers=HEADERS, json=BATCH)
                assert response.status_code == 202, response.text
                await rx.wait_for_entries(1, timeout=20)
                [(labels, entry)] = rx.entries()
                line = json.loads(entry.line)
                assert labels["tenant"] == "NL****4300"
                assert line["message"] == "Refund to DE****3000 failed"
                assert line["metadata"] == {
                    "order_id": "O-123",
                    "payee": {"iban": "GB****5432", "password": "****"},
                    "reference": "DE00123456781234567890",
                    "refund_to": "PL****2874",
                }
                wal = b"".join(p.read_bytes() for p in server.wal_root.rglob("*") if p.is_file())
                assert b"O-123" in wal  # the right bytes
                for iban in IBANS:
                    assert iban.encode() not in wal
                    assert iban[4:12].encode() not in wal
                    assert iban not in entry.line
                assert b"3704 0044" not in wal
                assert b"0712 1981" not in wal
                with trio.fail_after(10):
                    while 'key="detector:iban"' not in (
                        metrics := (await client.get("/metrics")).text
                    ):
                        await trio.sleep(0.05)
                assert 'masked_fields_total{key="detector:iban",token="payments-api"} 4.0' in (
                    metrics
                )
                assert 'masked_fields_total{key="password",token="payments-api"} 1.0' in metrics
        finally:
            await trio.to_thread.run_sync(server.stop)


def test_stages_list_shows_the_plugin_and_its_options(tmp_path: Path) -> None:
    result = logstack("stages", "list", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [row] = [r for r in json.loads(result.stdout) if r["name"] == "acme_mask_iban"]
    assert row["distribution"] == "logstack-acme-iban"
    assert row["version"] == "0.1.0"
    assert row["summary"].startswith("Mask IBANs")
    assert set(row["options"]) == {"keep_last", "keep_country", "scan_labels"}
    assert row["options"]["keep_last"]["default"] == 4
    text = logstack("stages", "list", cwd=tmp_path).stdout
    assert "    option keep_last (int, default 4): Characters kept" in text


def test_check_config_names_the_plugins_bad_options(tmp_path: Path) -> None:
    pipeline = [dict(stage) for stage in PIPELINE]
    pipeline[1] = {"type": "acme_mask_iban", "options": {"keep_last": 12, "keep_contry": True}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"pipeline": pipeline}))
    result = logstack("check-config", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "logstack: invalid configuration:",
        "  - pipeline[1] (acme_mask_iban): keep_last: Input should be less than or equal to 8",
        "  - pipeline[1] (acme_mask_iban): unknown field 'keep_contry'",
    ]
    path.write_text(yaml.safe_dump({"pipeline": PIPELINE}))
    result = logstack("check-config", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "pipeline: auth -> acme_mask_iban -> mask -> validate" in result.stdout
