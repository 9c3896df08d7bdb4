"""The real process's own logs: JSON lines, the request id on every line written while
serving a request, and no token ever printed — through every path that sees one."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import httpx
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
UNKNOWN = "not_a_configured_token_0123"
ENTRY = {
    "timestamp": "2025-09-24T12:00:00.000Z",
    "level": "INFO",
    "message": "hello",
    "service": "payments-api",
    "env": "prod",
    "metadata": {"authorization": f"Bearer {TEST_TOKEN}"},
}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_json_lines_with_request_ids_and_no_tokens(tmp_path: Path) -> None:
    async with open_loki_receiver() as rx:
        assert rx.url is not None
        config = make_test_config(tmp_path, rx.url, server={"log_level": "debug"})
        server = LogstackProcess(tmp_path, config)
        await trio.to_thread.run_sync(server.start)
        answers: list[httpx.Response] = []
        try:
            async with httpx.AsyncClient(base_url=server.url) as client:
                for n, token in enumerate((TEST_TOKEN, TEST_TOKEN_2, TEST_ADMIN_TOKEN, UNKNOWN)):
                    body = {"entries": [{**ENTRY, "message": f"hello {n}"}]}
                    answers.append(await client.post(INGEST, headers=bearer(token), json=body))
                    answers.append(
                        await client.post(
                            "/v1/admin/flush", headers=bearer(token), json={"force": True}
                        )
                    )
                    answers.append(await client.get("/v1/admin/status", headers=bearer(token)))
                answers.append(
                    await client.post(
                        INGEST,
                        headers={**bearer(TEST_TOKEN), "Content-Type": "application/json"},
                        content=b"{",
                    )
                )
                answers.append(await client.get("/missing"))
                await rx.wait_for_entries(2, timeout=10)
                # A reload whose file breaks on a line holding a token.
                text = server.config_path.read_text()
                server.config_path.write_text(text.replace(TEST_TOKEN, TEST_TOKEN + '": [', 1))
                server.signal(signal.SIGHUP)
                with trio.fail_after(10):
                    while "config reload failed" not in server.log_text():
                        await trio.sleep(0.05)
        finally:
            assert await trio.to_thread.run_sync(server.stop) == 0

    statuses = sorted({a.status_code for a in answers})
    assert statuses == [200, 202, 400, 401, 403, 404], statuses
    text = server.log_text()
    for token in (TEST_TOKEN, TEST_TOKEN_2, TEST_ADMIN_TOKEN, UNKNOWN):
        assert token not in text
    docs: list[dict[str, Any]] = []
    for line in text.splitlines():
        if line.startswith("--- start #"):
            continue  # the test harness's own marker
        docs.append(json.loads(line))  # every line of the service is one JSON object
    assert all({"ts", "level", "logger", "msg"} <= set(d) for d in docs)
    request_ids = {a.headers["X-Request-Id"] for a in answers}
    served = {d["request_id"] for d in docs if d["msg"] == "request served"}
    assert request_ids <= served
    for doc in docs:
        if doc["logger"] in ("logstack.http", "logstack.admin"):
            assert doc.get("request_id") in request_ids, doc
    assert any(d["msg"] == "config reload failed; keeping the running config" for d in docs)


async def test_the_wal_directory_is_logged_as_an_absolute_path(tmp_path: Path) -> None:
    """A relative ``wal.root_path`` is the working directory's: the start-up line says
    where that put the WAL (it differs between a shell, a unit file and a container)."""
    config = make_test_config(tmp_path, "http://127.0.0.1:9", wal={"root_path": "./rel-wal"})
    server = LogstackProcess(tmp_path, config)  # its working directory is tmp_path
    await trio.to_thread.run_sync(server.start)
    assert await trio.to_thread.run_sync(server.stop) == 0
    [opened] = [
        json.loads(line) for line in server.log_text().splitlines() if '"WAL opened"' in line
    ]
    assert opened["root"] == str(tmp_path / "rel-wal")
