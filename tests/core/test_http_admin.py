"""Admin endpoints: the auth matrix for every admin route, flush and status semantics, and the
answers matching their published types (the DLQ routes' included)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import trio

from logstack._api_types import (
    AdminStatus,
    DlqListing,
    DlqReplayReport,
    ErrorBody,
    FlushResult,
)
from logstack._config import Settings
from logstack._openapi import openapi_document
from logstack._service import Service, open_service
from logstack._wal import segment_name
from logstack.testing import LokiReceiver, open_loki_receiver
from logstack.testing._process import (
    TEST_ADMIN_TOKEN,
    TEST_TOKEN,
    TEST_TOKEN_2,
    make_test_config,
)

INGEST = "/v1/logs:ingest"
ADMIN = {"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"}
API_KEY = {"Authorization": f"Bearer {TEST_TOKEN}"}

ADMIN_ROUTES = sorted(
    (method.upper(), path)
    for path, item in openapi_document(Settings())["paths"].items()
    for method in item
    if path.startswith("/v1/admin/")
)
VALID_BODY = {
    "/v1/admin/dlq/replay": {"token": "payments-api"},
    "/v1/admin/dlq/drop": {"token": "payments-api", "ids": ["0123abcd"]},
}


def test_every_admin_route_is_in_the_matrix() -> None:
    assert ADMIN_ROUTES == [
        ("GET", "/v1/admin/dlq"),
        ("GET", "/v1/admin/status"),
        ("POST", "/v1/admin/dlq/drop"),
        ("POST", "/v1/admin/dlq/replay"),
        ("POST", "/v1/admin/flush"),
    ]


def entry(message: str = "hello") -> dict[str, Any]:
    return {
        "timestamp": "2025-09-24T12:00:00.000Z",
        "level": "INFO",
        "message": message,
        "service": "payments-api",
        "env": "prod",
    }


def conforms(response: httpx.Response, kind: type[msgspec.Struct]) -> Any:
    """The answer decodes as its published type and has exactly its fields."""
    value = msgspec.json.decode(response.content, type=kind)
    assert set(response.json()) == set(kind.__struct_fields__), response.json()
    return value


@asynccontextmanager
async def running(
    tmp_path: Path, rx: LokiReceiver, **sections: Any
) -> AsyncIterator[tuple[Service, httpx.AsyncClient]]:
    assert rx.url is not None
    settings = Settings.model_validate(make_test_config(tmp_path, rx.url, **sections))
    async with (
        open_service(settings) as service,
        httpx.AsyncClient(base_url=service.binds[0], timeout=10) as client,
    ):
        yield service, client


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with open_loki_receiver() as rx, running(tmp_path, rx) as (_, client):
        yield client


CREDENTIALS: list[tuple[str, dict[str, str], int, str]] = [
    ("no token", {}, 401, "authentication_error"),
    ("not bearer", {"Authorization": f"Basic {TEST_ADMIN_TOKEN}"}, 401, "authentication_error"),
    ("empty bearer", {"Authorization": "Bearer"}, 401, "authentication_error"),
    ("unknown token", {"Authorization": "Bearer nope_nope_12345678"}, 401, "authentication_error"),
    ("API key", API_KEY, 403, "forbidden"),
    ("other API key", {"Authorization": f"Bearer {TEST_TOKEN_2}"}, 403, "forbidden"),
    ("admin token", ADMIN, 200, ""),
]  # fmt: skip


@pytest.mark.parametrize(("method", "path"), ADMIN_ROUTES)
@pytest.mark.parametrize(
    ("who", "headers", "status", "code"), CREDENTIALS, ids=[c[0] for c in CREDENTIALS]
)
async def test_admin_auth_matrix(
    server: httpx.AsyncClient,
    method: str,
    path: str,
    who: str,
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    body = VALID_BODY.get(path) if method == "POST" else None
    response = await server.request(method, path, headers=headers, json=body)
    assert response.status_code == status, (who, response.text)
    if status == 200:
        return
    error = conforms(response, ErrorBody)
    assert error.error == code
    if status == 401:
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="logstack"'
    assert TEST_ADMIN_TOKEN not in response.text and TEST_TOKEN not in response.text


@pytest.mark.parametrize(("method", "path"), [r for r in ADMIN_ROUTES if r[0] == "POST"])
async def test_auth_is_checked_before_the_body(
    server: httpx.AsyncClient, method: str, path: str
) -> None:
    junk = {"Content-Type": "application/json"}
    assert (await server.request(method, path, headers=junk, content=b"{")).status_code == 401
    forbidden = await server.request(method, path, headers={**API_KEY, **junk}, content=b"{")
    assert forbidden.status_code == 403


async def test_the_admin_token_cannot_ingest(server: httpx.AsyncClient) -> None:
    response = await server.post(INGEST, headers=ADMIN, json={"entries": [entry()]})
    assert response.status_code == 401


async def flush(client: httpx.AsyncClient, body: Any = None) -> FlushResult:
    response = await client.post("/v1/admin/flush", headers=ADMIN, json=body)
    assert response.status_code == 200, response.text
    result: FlushResult = conforms(response, FlushResult)
    return result


async def status(client: httpx.AsyncClient) -> AdminStatus:
    response = await client.get("/v1/admin/status", headers=ADMIN)
    assert response.status_code == 200, response.text
    result: AdminStatus = conforms(response, AdminStatus)
    return result


async def test_flush_seals_and_forwards_now(tmp_path: Path) -> None:
    """With a 30 s batch wait, an entry would sit in the batcher; flush pushes it at once."""
    async with (
        open_loki_receiver() as rx,
        running(tmp_path, rx, loki={"batch_max_wait_s": 30}) as (service, client),
    ):
        response = await client.post(INGEST, headers=API_KEY, json={"entries": [entry()]})
        assert response.status_code == 202
        await trio.sleep(0.5)
        assert rx.entry_count == 0  # waiting for the batch window
        result = await flush(client)
        assert result.force is False
        assert result.sealed_segments == 1
        [key] = result.keys
        assert (key.token, key.action, key.sealed_segment) == ("payments-api", "sealed", 1)
        assert key.undelivered_bytes > 0
        await rx.wait_for_entries(1, timeout=5)
        registry = service.context.metrics.registry
        labels = {"token": "payments-api", "reason": "manual"}
        assert registry.get_sample_value("segment_rotations_total", labels) == 1

        # Everything delivered: nothing to flush, unless forced (which seals the
        # checkpoints written since and lets the delivered segment go).
        with trio.fail_after(5):
            while (await status(client)).keys[0].oldest_undelivered_age_s is not None:
                await trio.sleep(0.05)
        assert (await flush(client)).keys[0].action == "nothing_to_flush"
        forced = await flush(client, {"force": True})
        assert forced.force is True
        assert forced.keys[0].action in ("sealed", "nothing_to_flush")


async def test_a_flush_that_cannot_start_a_segment_is_a_503(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The WAL's own error escaped as a 500 (an "internal error" alert for a full disk).
    Then the 503 was its only trace: the log said "admin flush" at INFO, readiness
    nothing."""
    async with open_loki_receiver() as rx:
        rx.stop()  # Loki down: the entry stays undelivered, so a flush seals
        async with running(tmp_path, rx) as (service, client):
            await client.post(INGEST, headers=API_KEY, json={"entries": [entry()]})
            keylog = service.wal.logs["payments-api"]
            blocker = keylog.directory / segment_name(keylog.active.seq + 1)
            blocker.mkdir()  # the next segment cannot be created, as on a full disk
            response = await client.post("/v1/admin/flush", headers=ADMIN, json={})
            assert response.status_code == 503, response.text
            assert conforms(response, ErrorBody).error == "unavailable"
            assert "Retry-After" in response.headers
            [logged] = [r for r in caplog.records if "admin flush: could not" in r.message]
            assert logged.levelname == "ERROR"
            assert "payments-api" in service.context.health.wal_failing
            blocker.rmdir()
            assert (await flush(client)).keys[0].action in ("sealed", "pushed")


async def test_flush_selects_keys_and_reports_each(tmp_path: Path) -> None:
    async with open_loki_receiver() as rx:
        rx.stop()  # Loki down: entries stay undelivered
        async with running(tmp_path, rx) as (_, client):
            for _ in range(2):
                await client.post(INGEST, headers=API_KEY, json={"entries": [entry()]})
            first = await flush(client, {"token": "payments-api"})
            assert [(k.token, k.action) for k in first.keys] == [("payments-api", "sealed")]
            # The undelivered entries are in a sealed segment now: ask again, push again.
            again = await flush(client)
            assert [(k.token, k.action) for k in again.keys] == [("payments-api", "pushed")]
            assert again.sealed_segments == 0
            # A configured key that never wrote, and an empty body.
            other = await flush(client, {"token": "user-service"})
            assert [(k.token, k.action) for k in other.keys] == [("user-service", "no_wal")]
            empty = await client.post("/v1/admin/flush", headers=ADMIN, content=b"")
            assert empty.status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b'{"token": "nobody"}', 404, "not_found"),
        (b'{"force": "yes"}', 400, "validation_error"),
        (b'{"tokens": "payments-api"}', 400, "validation_error"),
        (b'{"token": ""}', 400, "validation_error"),
        (b"{", 400, "validation_error"),
        (b"[]", 400, "validation_error"),
    ],
)
async def test_flush_refuses_bad_requests(
    server: httpx.AsyncClient, body: bytes, status: int, code: str
) -> None:
    response = await server.post(
        "/v1/admin/flush", headers={**ADMIN, "Content-Type": "application/json"}, content=body
    )
    assert response.status_code == status, response.text
    assert conforms(response, ErrorBody).error == code


async def test_status_reports_wal_forwarder_loki_dlq_and_config(tmp_path: Path) -> None:
    async with open_loki_receiver() as rx:
        port = rx.port
        rx.stop()
        async with running(tmp_path, rx, loki={"backoff_max_s": 0.2}) as (service, client):
            await client.post(
                INGEST, headers=API_KEY, json={"entries": [entry(f"m{i}") for i in range(3)]}
            )
            await trio.sleep(0.6)
            state = await status(client)
            assert state.service == "logstack"
            assert state.status == "not_ready"
            assert state.checks.loki.ok is False
            assert state.pipeline == [
                "auth",
                "mask",
                "validate",
                "wal_append",
                "batch",
                "forward_loki",
            ]
            assert state.config.version == 1 and state.config.api_keys == 2
            assert state.forwarder.running is True
            [endpoint] = state.forwarder.endpoints
            assert endpoint.url == f"http://127.0.0.1:{port}"
            assert endpoint.failures >= 1 and endpoint.healthy is False
            keys = {k.token: k for k in state.keys}
            assert set(keys) == {"payments-api", "user-service"}
            payments = keys["payments-api"]
            assert payments.configured and payments.active
            assert payments.wal_bytes > 0 and payments.wal_segments == 1
            assert payments.undelivered_bytes > 0
            assert payments.oldest_undelivered_age_s is not None
            assert payments.oldest_undelivered_age_s >= 0.5
            assert keys["user-service"].wal_bytes == 0

            async with open_loki_receiver(port=port, receiver=rx):
                await rx.wait_for_entries(3, timeout=10)
                rx.fail_next(400, 1)
                await client.post(INGEST, headers=API_KEY, json={"entries": [entry("bad")]})
                with trio.fail_after(10):
                    while (await status(client)).keys[0].dlq_entries < 1:
                        await trio.sleep(0.05)
                state = await status(client)
                assert state.keys[0].dlq_records == 1
                assert state.forwarder.loki_last_ok_age_s is not None
                del service


async def test_dlq_routes_answer_their_published_types(tmp_path: Path) -> None:
    async with open_loki_receiver() as rx, running(tmp_path, rx) as (_, client):
        rx.fail_next(400, 1)
        await client.post(
            INGEST, headers=API_KEY, json={"entries": [entry("refused-1"), entry("refused-2")]}
        )
        with trio.fail_after(10):
            while True:
                listing = await client.get("/v1/admin/dlq", headers=ADMIN)
                assert listing.status_code == 200
                if conforms(listing, DlqListing).total_records:
                    break
                await trio.sleep(0.05)
        page = conforms(listing, DlqListing)
        [summary] = page.keys
        assert summary.token == "payments-api" and summary.entries == 2
        [record] = page.records
        assert record.status == 400 and record.sample
        for record_doc in listing.json()["records"]:
            assert set(record_doc) == set(type(record).__struct_fields__)

        replay = await client.post(
            "/v1/admin/dlq/replay", headers=ADMIN, json={"token": "payments-api"}
        )
        assert replay.status_code == 200, replay.text
        report = conforms(replay, DlqReplayReport)
        assert report.replayed_entries == 2 and report.remaining_records == 0
        await rx.wait_for_entries(2, timeout=5)
        bad = await client.post("/v1/admin/dlq/replay", headers=ADMIN, json={"token": "a b"})
        assert bad.status_code == 400
        assert conforms(bad, ErrorBody).error == "validation_error"


async def test_status_gives_the_age_of_the_oldest_undelivered_entry_not_of_its_segment(
    tmp_path: Path,
) -> None:
    """A key that logs little keeps one segment for hours (rotation by age needs 64 KiB):
    its creation time once read as the age of an entry received a moment ago."""
    async with open_loki_receiver() as rx, running(tmp_path, rx) as (_, client):
        await client.post(INGEST, headers=API_KEY, json={"entries": [entry("first")]})
        await rx.wait_for_entries(1)
        await trio.sleep(1.5)  # the segment ages; nothing is waiting
        rx.fail_next(503)  # until cleared: the next entry stays undelivered
        await client.post(INGEST, headers=API_KEY, json={"entries": [entry("second")]})
        [payments] = [k for k in (await status(client)).keys if k.token == "payments-api"]
        assert payments.wal_segments == 1 and payments.undelivered_bytes > 0
        assert payments.oldest_undelivered_age_s is not None
        assert payments.oldest_undelivered_age_s < 1.0
