"""The ingest endpoint's transport behaviour at the ASGI level (``logstack._ingest``): what
Quart did for the route before, it still does: 405 with ``Allow``, 413 before the body is
read, 408 for a body that stops arriving, 500 in the error shape, header spellings."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import trio

from logstack import _ingest
from logstack._config import Settings
from logstack._service import Service, open_service
from logstack.testing import make_entry, open_loki_receiver
from logstack.testing._process import TEST_TOKEN, make_test_config

INGEST = "/v1/logs:ingest"
ENTRY = make_entry()
AUTH = {"Authorization": f"Bearer {TEST_TOKEN}"}


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Service, httpx.AsyncClient]]:
    async with open_loki_receiver() as rx:
        assert rx.url is not None
        config = make_test_config(tmp_path, rx.url, server={"max_body_bytes": 4096})
        settings = Settings.model_validate(config)
        async with (
            open_service(settings) as service,
            httpx.AsyncClient(base_url=service.binds[0]) as client,
        ):
            yield service, client


def sample(service: Service, name: str, **labels: str) -> float:
    value = service.context.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


async def raw_exchange(service: Service, request: bytes, *, wait_s: float = 5.0) -> bytes:
    """Write ``request`` as is on a fresh connection and read until the server closes it or
    ``wait_s`` passes."""
    address = urlsplit(service.binds[0])
    assert address.hostname is not None and address.port is not None
    stream = await trio.open_tcp_stream(address.hostname, address.port)
    received = b""
    async with stream:
        await stream.send_all(request)
        with trio.move_on_after(wait_s):
            while chunk := await stream.receive_some(65536):
                received += chunk
                if b"\r\n\r\n" in received:
                    head, _, body = received.partition(b"\r\n\r\n")
                    length = [
                        int(line.split(b":", 1)[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ]
                    if length and len(body) >= length[0]:
                        break
    return received


def raw_post(content_length: int, body: bytes = b"") -> bytes:
    """An authenticated ingest request as bytes: headers announcing ``content_length``, then
    ``body`` (which may be shorter: the rest never comes)."""
    head = (
        f"POST {INGEST} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TEST_TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {content_length}\r\n\r\n"
    )
    return head.encode() + body


def parse(answer: bytes) -> tuple[int, dict[str, str], dict[str, object]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, json.loads(body)


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH", "OPTIONS"])
async def test_other_methods_are_405_with_allow(
    served: tuple[Service, httpx.AsyncClient], method: str
) -> None:
    service, client = served
    answer = await client.request(method, INGEST, headers=AUTH)
    assert answer.status_code == 405
    assert answer.headers["Allow"] == "POST"
    assert answer.json()["error"] == "method_not_allowed"
    assert set(answer.json()) == {"error", "message", "details"}
    assert answer.headers["X-Request-Id"]
    assert sample(service, "logs_ingested_total", token="payments-api") == 0


async def test_header_names_and_media_type_spellings(
    served: tuple[Service, httpx.AsyncClient],
) -> None:
    service, client = served
    answer = await client.post(
        INGEST,
        headers={
            "authorization": f"Bearer {TEST_TOKEN}",
            "CONTENT-TYPE": "Application/JSON; charset=utf-8",
        },
        content=json.dumps({"entries": [ENTRY]}),
    )
    assert answer.status_code == 202, answer.text
    assert answer.headers["Content-Type"] == "application/json"
    assert int(answer.headers["Content-Length"]) == len(answer.content)
    assert answer.json()["entries_accepted"] == 1
    assert sample(service, "logs_ingested_total", token="payments-api") == 1


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ('application/json; charset="UTF-8"', 202),
        ("application/json;charset=utf8;foo=bar", 202),
        ("application/json; foo=bar", 202),
        ("application/json; charset=utf-16", 415),
        ("application/json; charset=ISO-8859-1", 415),
    ],
)
async def test_a_charset_other_than_utf8_is_415(
    served: tuple[Service, httpx.AsyncClient], content_type: str, status: int
) -> None:
    """RFC 8259 §8.1: such a body was read as UTF-8 anyway (400, or stored garbled)."""
    _, client = served
    answer = await client.post(
        INGEST,
        headers={"Authorization": f"Bearer {TEST_TOKEN}", "Content-Type": content_type},
        content=json.dumps({"entries": [ENTRY]}),
    )
    assert answer.status_code == status, answer.text
    if status == 415:
        assert answer.json()["error"] == "unsupported_media_type"
        assert answer.json()["details"]["charset"] == content_type.rpartition("=")[2]  # as sent


async def test_announced_oversize_body_is_413_before_it_is_sent(
    served: tuple[Service, httpx.AsyncClient],
) -> None:
    service, _ = served
    status, headers, body = parse(await raw_exchange(service, raw_post(5000)))
    assert status == 413
    assert headers["content-type"] == "application/json"
    assert body["error"] == "payload_too_large"
    assert body["details"] == {"max_body_bytes": 4096}
    labels = {"token": "payments-api", "reason": "payload_too_large"}  # its key was valid
    assert sample(service, "logs_rejected_total", **labels) == 1


@pytest.fixture
async def rate_limited(tmp_path: Path) -> AsyncIterator[Service]:
    """A service whose keys take 2 requests at once, then 1 every 100 s."""
    async with open_loki_receiver() as rx:
        assert rx.url is not None
        config = make_test_config(
            tmp_path,
            rx.url,
            server={"max_body_bytes": 4096},
            security={"rate_limit_rps": 0.01, "rate_limit_burst": 2},
        )
        async with open_service(Settings.model_validate(config)) as service:
            yield service


async def test_a_key_over_its_rate_is_429_before_its_body_is_sent(
    rate_limited: Service,
) -> None:
    """Its upload, body memory and pipeline steps would be spent on a refusal: a flooding key
    cost ~87% of an accepted request per ``429``, and starved a modest key of the rest."""
    service = rate_limited
    async with httpx.AsyncClient(base_url=service.binds[0]) as client:
        for _ in range(2):  # the burst; each request takes one token, not two
            answer = await client.post(INGEST, headers=AUTH, json={"entries": [ENTRY]})
            assert answer.status_code == 202, answer.text
    status, headers, body = parse(await raw_exchange(service, raw_post(1000)))
    assert status == 429
    assert headers["retry-after"] == "100"
    assert body["error"] == "rate_limit_exceeded"
    assert body["details"] == {"rate_limit_rps": 0.01, "rate_limit_burst": 2}
    assert sample(service, "rate_limit_exceeded_total", token="payments-api") == 1
    labels = {"token": "payments-api", "reason": "rate_limit_exceeded"}
    assert sample(service, "logs_rejected_total", **labels) == 1
    assert sample(service, "logs_ingested_total", token="payments-api") == 2


@pytest.mark.parametrize(
    ("extra_headers", "status"),
    [
        ({"Authorization": "Bearer unknown_token_0123456789"}, 401),
        ({"Content-Type": "text/plain"}, 415),
        ({"Content-Length": "5000"}, 413),
        ({"X-Idempotency-Key": "k" * 129}, 400),
        ({}, 429),
    ],
)
async def test_header_checks_come_before_the_rate_limit(
    rate_limited: Service, extra_headers: dict[str, str], status: int
) -> None:
    """A request the headers already refuse costs its key no token; one the rate limit
    refuses is not read (SPEC §3: rate-limited before validated: the body is not JSON)."""
    service = rate_limited
    async with httpx.AsyncClient(base_url=service.binds[0]) as client:
        for _ in range(2):
            answer = await client.post(INGEST, headers=AUTH, json={"entries": [ENTRY]})
            assert answer.status_code == 202, answer.text
        headers = {**AUTH, "Content-Type": "application/json", **extra_headers}
        content = b"x" * int(extra_headers.get("Content-Length", "10"))
        answer = await client.post(INGEST, headers=headers, content=content)
        assert answer.status_code == status, answer.text
    limited = sample(service, "rate_limit_exceeded_total", token="payments-api")
    assert limited == (1 if status == 429 else 0)


async def test_only_the_services_own_refusals_give_the_token_back(
    rate_limited: Service,
) -> None:
    """The token is taken on the headers. A request the service then refuses before the
    pipeline (503) gives it back: under overload those 503s burned the key's tokens and
    the key got 429s for requests the pipeline could have taken (a third as many accepted).
    One refused for its own body (413, 408) keeps it: given back, stalled bodies could hold
    the body budget again and again, unbounded by the key's rate (an audit)."""
    service = rate_limited

    async def chunked_oversize() -> AsyncIterator[bytes]:
        yield b"x" * 5000  # no Content-Length: found too large while it is read

    class Full:
        def send_nowait(self, value: object) -> None:
            raise trio.WouldBlock

    async with httpx.AsyncClient(base_url=service.binds[0]) as client:
        real_head = service.head
        service.head = Full()  # type: ignore[assignment]
        try:
            for _ in range(3):
                answer = await client.post(INGEST, headers=AUTH, json={"entries": [ENTRY]})
                assert answer.status_code == 503, answer.text
        finally:
            service.head = real_head
        answer = await client.post(INGEST, headers=AUTH, json={"entries": [ENTRY]})
        assert answer.status_code == 202, answer.text  # the burst of 2 was whole
        headers = {**AUTH, "Content-Type": "application/json"}
        answer = await client.post(INGEST, headers=headers, content=chunked_oversize())
        assert answer.status_code == 413, answer.text  # the burst's second token
        answer = await client.post(INGEST, headers=AUTH, json={"entries": [ENTRY]})
        assert answer.status_code == 429
    assert sample(service, "rate_limit_exceeded_total", token="payments-api") == 1


async def test_a_body_that_stops_arriving_is_408(
    served: tuple[Service, httpx.AsyncClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    service, client = served
    monkeypatch.setattr(_ingest, "BODY_TIMEOUT_S", 0.5)
    request = raw_post(100, b'{"entries":')
    status, _, body = parse(await raw_exchange(service, request))
    assert status == 408
    assert body["error"] == "http_error"
    assert "did not arrive within 0.5 s" in str(body["message"])
    # Nothing was half-taken, and the server goes on serving.
    answer = await client.post(INGEST, headers=AUTH, json={"entries": [ENTRY]})
    assert answer.status_code == 202
    assert sample(service, "logs_ingested_total", token="payments-api") == 1


async def test_a_client_gone_mid_body_costs_nothing(
    served: tuple[Service, httpx.AsyncClient],
) -> None:
    service, client = served
    request = raw_post(100, b'{"entries":')
    assert await raw_exchange(service, request, wait_s=0.3) == b""  # then hangs up
    with trio.fail_after(5):
        while service.requests_in_flight:
            await trio.sleep(0.02)
    answer = await client.post(INGEST, headers=AUTH, json={"entries": [ENTRY]})
    assert answer.status_code == 202
    assert sample(service, "logs_ingested_total", token="payments-api") == 1


async def test_an_unexpected_failure_is_500_in_the_error_shape(
    served: tuple[Service, httpx.AsyncClient], caplog: pytest.LogCaptureFixture
) -> None:
    service, client = served

    class Broken:
        def send_nowait(self, value: object) -> None:
            raise RuntimeError("boom")

    real_head = service.head
    service.head = Broken()  # type: ignore[assignment]
    try:
        answer = await client.post(INGEST, headers=AUTH, json={"entries": [ENTRY]})
    finally:
        service.head = real_head
    assert answer.status_code == 500
    assert answer.json() == {
        "error": "internal_error",
        "message": "internal error",
        "details": {},
    }
    assert "boom" not in answer.text
    assert "unhandled error while serving a request" in caplog.text
    status = {"method": "POST", "endpoint": INGEST, "status_code": "500"}
    assert sample(service, "http_requests_total", **status) == 1


async def test_a_client_gone_while_its_request_is_written_breaks_nothing(
    served: tuple[Service, httpx.AsyncClient], caplog: pytest.LogCaptureFixture
) -> None:
    service, client = served
    body = json.dumps({"entries": [ENTRY]}).encode()
    request = raw_post(len(body), body)
    await raw_exchange(service, request, wait_s=0)  # hangs up before the answer
    # The whole request had arrived: it is written all the same (nobody hears the 202).
    with trio.fail_after(5):
        while sample(service, "logs_ingested_total", token="payments-api") < 1:
            await trio.sleep(0.02)
        while service.requests_in_flight:
            await trio.sleep(0.02)
    answer = await client.post(INGEST, headers=AUTH, json={"entries": [ENTRY]})
    assert answer.status_code == 202
    assert sample(service, "logs_ingested_total", token="payments-api") == 2
    assert not [r for r in caplog.records if r.levelno >= 40], caplog.text


def test_5xx_refusals_are_logged_once_a_second_per_key_and_reason(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under overload every 503 wrote a warning (4,148 lines in 25 s in an audit)."""
    seen: dict[tuple[str, str, str], tuple[float, int]] = {}
    monkeypatch.setattr(_ingest, "_last_refusal_log", seen)
    with caplog.at_level(logging.WARNING, logger="logstack.http"):
        for _ in range(5):
            _ingest._log_refusal("ingest unavailable", "payments-api", "pipeline_full")
        _ingest._log_refusal("ingest unavailable", "user-service", "pipeline_full")
        _ingest._log_refusal("ingest unavailable", "payments-api", "bodies_in_flight")
        # A second later, the next one says how many were left out.
        key = ("ingest unavailable", "payments-api", "pipeline_full")
        seen[key] = (seen[key][0] - _ingest.REFUSAL_LOG_INTERVAL_S, seen[key][1])
        _ingest._log_refusal("ingest unavailable", "payments-api", "pipeline_full")
    lines = [(r.token, r.reason, getattr(r, "suppressed", 0)) for r in caplog.records]  # type: ignore[attr-defined]
    assert lines == [
        ("payments-api", "pipeline_full", 0),
        ("user-service", "pipeline_full", 0),
        ("payments-api", "bodies_in_flight", 0),
        ("payments-api", "pipeline_full", 4),
    ]
