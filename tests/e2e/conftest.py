"""Fixtures that run the real server (and receiver) as child processes on loopback."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from logstack.testing._process import TEST_TOKEN, TEST_TOKEN_2, LogstackProcess, make_test_config


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def no_loki_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LogstackProcess]:
    """A server whose Loki URL points at a closed port: ingest works, delivery waits."""
    workdir: Path = tmp_path_factory.mktemp("server")
    config = make_test_config(
        workdir,
        f"http://127.0.0.1:{free_port()}",
        security={
            "api_keys": {
                TEST_TOKEN: {"name": "payments-api"},
                # The second key is the rate-limited one: a burst of 3 at 0.5 requests/s.
                TEST_TOKEN_2: {
                    "name": "user-service",
                    "rate_limit_rps": 0.5,
                    "rate_limit_burst": 3,
                },
            }
        },
    )
    server = LogstackProcess(workdir, config)
    server.start()
    yield server
    server.stop()
