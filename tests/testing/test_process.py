"""``logstack.testing._process``: children started from a config run exactly that config."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from logstack.bench._cli import body_factory
from logstack.testing._process import TEST_TOKEN, LogstackProcess, make_test_config

HEADERS = {"Authorization": f"Bearer {TEST_TOKEN}", "Content-Type": "application/json"}


def statuses_of(server: LogstackProcess, requests: int) -> list[int]:
    """Start ``server``, send it ``requests`` one-line requests, stop it: their statuses."""
    server.start()
    try:
        return [
            httpx.post(
                server.url + "/v1/logs:ingest", content=body_factory(1)(n), headers=HEADERS
            ).status_code
            for n in range(requests)
        ]
    finally:
        server.stop()


def test_the_shells_logstack_variables_do_not_reach_a_server_started_from_a_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Exported in the shell, these once made the bench measure a rate limit of 1 request/s.
    monkeypatch.setenv("LOGSTACK_SECURITY_RATE_LIMIT_RPS", "0.001")
    monkeypatch.setenv("LOGSTACK_SECURITY_RATE_LIMIT_BURST", "1")
    server = LogstackProcess(tmp_path, make_test_config(tmp_path, "http://127.0.0.1:9"))
    assert statuses_of(server, 3) == [202, 202, 202]


def test_a_childs_own_environment_still_sets_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LOGSTACK_SECURITY_RATE_LIMIT_BURST", "1000")
    server = LogstackProcess(
        tmp_path,
        make_test_config(tmp_path, "http://127.0.0.1:9"),
        env={
            "LOGSTACK_SECURITY_RATE_LIMIT_RPS": "0.001",
            "LOGSTACK_SECURITY_RATE_LIMIT_BURST": "1",
        },
    )
    assert statuses_of(server, 2) == [202, 429]
