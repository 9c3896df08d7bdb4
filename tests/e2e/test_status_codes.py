"""Every ingest status code of SPEC §3.2, through real HTTP, each with the one error shape."""

from __future__ import annotations

import gzip
import json
from typing import Any

import httpx
import pytest

from logstack.testing._process import TEST_TOKEN, TEST_TOKEN_2, LogstackProcess

INGEST = "/v1/logs:ingest"
ENTRY = {
    "timestamp": "2025-09-24T12:00:00.000Z",
    "level": "INFO",
    "message": "hello",
    "service": "payments-api",
    "env": "prod",
}
JSON = {"Content-Type": "application/json"}


def body(*entries: dict[str, Any]) -> bytes:
    return json.dumps({"entries": list(entries) or [ENTRY]}).encode()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **JSON}


CASES: list[tuple[str, dict[str, str], bytes, int, str]] = [
    ("missing Authorization", JSON, body(), 401, "authentication_error"),
    (
        "malformed Authorization",
        {"Authorization": "Basic abc", **JSON},
        body(),
        401,
        "authentication_error",
    ),
    ("unknown token", bearer("not_a_real_token_0123456789"), body(), 401, "authentication_error"),
    ("malformed JSON", bearer(TEST_TOKEN), b'{"entries": [', 400, "validation_error"),
    (
        "invalid UTF-8 in a string",
        bearer(TEST_TOKEN),
        body({**ENTRY, "message": "@"}).replace(b"@", b"bad \xff\xfe"),
        400,
        "validation_error",
    ),
    (
        "invalid UTF-8 in a key",
        bearer(TEST_TOKEN),
        body({**ENTRY, "metadata": {"@": 1}}).replace(b'"@"', b'"\xc0\xaf"'),
        400,
        "validation_error",
    ),
    (
        "schema violation",
        bearer(TEST_TOKEN),
        body({**ENTRY, "level": "LOUD"}),
        400,
        "validation_error",
    ),
    (
        "unknown field",
        bearer(TEST_TOKEN),
        body({**ENTRY, "colour": "red"}),
        400,
        "validation_error",
    ),
    (
        "body over 1 MiB",
        bearer(TEST_TOKEN),
        b"{" + b" " * (1024 * 1024 + 10) + b"}",
        413,
        "payload_too_large",
    ),
    (
        "gzip inflating over 1 MiB",
        {**bearer(TEST_TOKEN), "Content-Encoding": "gzip"},
        gzip.compress(b'{"entries": [' + b" " * (2 * 1024 * 1024) + b"]}"),
        413,
        "payload_too_large",
    ),
    (
        "not JSON",
        {"Authorization": f"Bearer {TEST_TOKEN}", "Content-Type": "text/plain"},
        b"hello",
        415,
        "unsupported_media_type",
    ),
]


def check_error_shape(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    doc = response.json()
    assert set(doc) == {"error", "message", "details"}, doc
    assert doc["error"] == code
    assert isinstance(doc["message"], str) and doc["message"]
    assert isinstance(doc["details"], dict)
    return doc


@pytest.mark.parametrize(
    ("case", "headers", "content", "status", "code"), CASES, ids=[c[0] for c in CASES]
)
def test_ingest_rejections(
    no_loki_server: LogstackProcess,
    case: str,
    headers: dict[str, str],
    content: bytes,
    status: int,
    code: str,
) -> None:
    response = httpx.post(no_loki_server.url + INGEST, headers=headers, content=content)
    doc = check_error_shape(response, status, code)
    if status == 401:
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    if code == "validation_error" and case != "malformed JSON":
        assert doc["details"]["errors"], doc


def test_validation_lists_every_problem(no_loki_server: LogstackProcess) -> None:
    bad = [ENTRY, {**ENTRY, "level": "LOUD"}, {**ENTRY, "service": "Bad Name", "extra": 1}]
    response = httpx.post(
        no_loki_server.url + INGEST, headers=bearer(TEST_TOKEN), content=body(*bad)
    )
    doc = check_error_shape(response, 400, "validation_error")
    fields = {e["field"] for e in doc["details"]["errors"]}
    assert {"entries[1].level", "entries[2].service", "entries[2].extra"} <= fields, fields


def test_rate_limit_429_with_retry_after(no_loki_server: LogstackProcess) -> None:
    # This server allows a burst of 3 at 0.5 requests/s for each key.
    answers = [
        httpx.post(no_loki_server.url + INGEST, headers=bearer(TEST_TOKEN_2), content=body())
        for _ in range(6)
    ]
    statuses = [a.status_code for a in answers]
    assert 202 in statuses and 429 in statuses, statuses
    limited = next(a for a in answers if a.status_code == 429)
    check_error_shape(limited, 429, "rate_limit_exceeded")
    assert int(limited.headers["Retry-After"]) >= 1


def test_accepts_compatibility_forms(no_loki_server: LogstackProcess) -> None:
    """PHP's empty arrays, a double slash from a trailing-slash base URL, gzip bodies."""
    entry = {**ENTRY, "labels": [], "metadata": []}
    response = httpx.post(
        no_loki_server.url + "/" + INGEST,
        headers={**bearer(TEST_TOKEN), "Content-Encoding": "gzip"},
        content=gzip.compress(body(entry)),
    )
    assert response.status_code == 202, response.text
    doc = response.json()
    assert doc["entries_accepted"] == 1
    assert doc["message"] == "Logs accepted for processing"
    assert set(doc) == {"message", "entries_accepted", "request_id", "timestamp"}


def test_a_gzip_body_of_several_members_is_read_whole(no_loki_server: LogstackProcess) -> None:
    """RFC 1952 allows members one after another (a client that appends, ``cat a.gz b.gz``)."""
    raw = body(ENTRY, {**ENTRY, "message": "second"})
    response = httpx.post(
        no_loki_server.url + INGEST,
        headers={**bearer(TEST_TOKEN), "Content-Encoding": "gzip"},
        content=gzip.compress(raw[:40]) + gzip.compress(raw[40:]),
    )
    assert response.status_code == 202, response.text
    assert response.json()["entries_accepted"] == 2


def test_an_idempotency_key_reused_for_other_entries_is_422(
    no_loki_server: LogstackProcess,
) -> None:
    url, key = no_loki_server.url + INGEST, {"X-Idempotency-Key": "order-7"}
    first = httpx.post(url, headers={**bearer(TEST_TOKEN), **key}, content=body())
    assert first.status_code == 202, first.text
    # The same entries re-encoded and gzipped are a retry: the first answer.
    retry = httpx.post(
        url,
        headers={**bearer(TEST_TOKEN), **key, "Content-Encoding": "gzip"},
        content=gzip.compress(json.dumps({"entries": [ENTRY]}, indent=2).encode()),
    )
    assert retry.status_code == 202 and retry.json()["request_id"] == first.json()["request_id"]
    other = httpx.post(
        url, headers={**bearer(TEST_TOKEN), **key}, content=body({**ENTRY, "message": "new"})
    )
    assert other.status_code == 422
    assert other.json() == {
        "error": "idempotency_key_reused",
        "message": "X-Idempotency-Key was used within the last 15 minutes for a request with "
        "other entries; use a new key for new entries",
        "details": {"request_id": first.json()["request_id"], "entries_accepted": 1},
    }


def test_unknown_route_and_method(no_loki_server: LogstackProcess) -> None:
    check_error_shape(httpx.get(no_loki_server.url + "/nope"), 404, "not_found")
    wrong_method = httpx.get(no_loki_server.url + INGEST)
    check_error_shape(wrong_method, 405, "method_not_allowed")
    assert wrong_method.headers["Allow"] == "POST"
    for method, path, allowed in [
        ("POST", "/healthz", {"GET", "HEAD"}),
        ("POST", "/metrics", {"GET", "HEAD"}),
        ("GET", "/v1/admin/flush", {"POST"}),
        ("DELETE", "/v1/admin/dlq", {"GET", "HEAD"}),
    ]:
        answer = httpx.request(method, no_loki_server.url + path)
        check_error_shape(answer, 405, "method_not_allowed")
        assert set(answer.headers["Allow"].split(", ")) == allowed, (method, path)


def test_readyz_says_loki_is_unreachable(no_loki_server: LogstackProcess) -> None:
    response = httpx.get(no_loki_server.url + "/readyz")
    assert response.status_code == 503
    checks = response.json()["checks"]
    assert set(checks) == {"loki", "disk", "wal", "forwarder"}
    assert checks["loki"]["ok"] is False
    assert checks["wal"]["ok"] and checks["forwarder"]["ok"]
    assert httpx.get(no_loki_server.url + "/healthz").status_code == 200
