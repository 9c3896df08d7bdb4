"""``/readyz``: each check with its detail, 200/503, and Loki never probed per call."""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from logstack._api_types import Readiness
from logstack._config import Settings
from logstack._service import Service, build_asgi_app, open_service
from logstack.testing import open_loki_receiver

Message = MutableMapping[str, Any]


class CountingLoki:
    """The smallest Loki: ``/ready`` (counted) and a push endpoint answering 204."""

    def __init__(self) -> None:
        self.ready_calls = 0
        self.ready = True

    async def __call__(
        self,
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[Message]],
        send: Callable[[Message], Awaitable[None]],
    ) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].replace("lifespan.", "")
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        if scope["path"] == "/ready":
            self.ready_calls += 1
            status = 200 if self.ready else 503
        else:
            status = 204
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})


@asynccontextmanager
async def counting_loki() -> AsyncIterator[tuple[CountingLoki, str]]:
    loki = CountingLoki()
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.graceful_timeout = 0.1
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            partial(hypercorn_serve, loki, config, shutdown_trigger=stop.wait)
        )
        try:
            yield loki, binds[0]
        finally:
            stop.set()


TOKEN = "readiness_test_token_0123456789"
ENTRY = {
    "timestamp": "2026-01-01T00:00:00Z",
    "level": "INFO",
    "message": "hello",
    "service": "svc",
    "env": "prod",
}


def settings_for(tmp_path: Path, loki_url: str, **loki: Any) -> Settings:
    return Settings.model_validate(
        {
            "server": {"port": 0},
            "wal": {"root_path": str(tmp_path / "wal")},
            "loki": {"base_url": loki_url, **loki},
            "security": {"api_keys": {TOKEN: {"name": "readiness"}}},
        }
    )


async def readyz(client: httpx.AsyncClient) -> tuple[int, Readiness]:
    response = await client.get("/readyz")
    return response.status_code, msgspec.json.decode(response.content, type=Readiness)


async def test_loki_is_probed_in_the_background_not_per_call(tmp_path: Path) -> None:
    async with counting_loki() as (loki, url):
        settings = settings_for(tmp_path, url, ready_probe_interval_s=30)
        async with (
            open_service(settings) as service,
            httpx.AsyncClient(base_url=service.binds[0]) as client,
        ):
            with trio.fail_after(5):
                while (await readyz(client))[0] != 200:
                    await trio.sleep(0.02)
            calls = loki.ready_calls
            assert calls >= 1
            for _ in range(200):
                status, body = await readyz(client)
                assert status == 200 and body.status == "ready"
            assert loki.ready_calls == calls  # 200 /readyz calls, not one more probe
            assert body.checks.loki.detail.startswith("Loki answered")


async def test_a_failing_loki_probe_makes_the_service_not_ready(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    settings = settings_for(tmp_path, f"http://127.0.0.1:{closed_port}")
    async with (
        open_service(settings) as service,
        httpx.AsyncClient(base_url=service.binds[0]) as client,
    ):
        with trio.fail_after(5):
            while "/ready" not in (await readyz(client))[1].checks.loki.detail:
                await trio.sleep(0.02)
        status, body = await readyz(client)
        assert status == 503 and body.status == "not_ready"
        assert body.checks.loki.ok is False
        assert body.checks.loki.detail.startswith("Loki not reached yet")
        assert body.checks.wal.ok and body.checks.disk.ok and body.checks.forwarder.ok


async def test_loki_refusing_every_push_is_not_ready_though_its_ready_says_200(
    tmp_path: Path,
) -> None:
    """Pushes answered 401 (a gateway's expired credentials), 429 or 503 while ``/ready``
    said 200 kept the service "ready": nothing was delivered, and readiness said "Loki
    answered 0s ago"."""
    async with open_loki_receiver() as rx:
        rx.fail_next(503)  # every push, until cleared; /ready still says 200
        settings = settings_for(tmp_path, rx.url, ready_window_s=1, ready_probe_interval_s=0.1)
        async with (
            open_service(settings) as service,
            httpx.AsyncClient(base_url=service.binds[0]) as client,
        ):
            response = await client.post(
                "/v1/logs:ingest",
                headers={"Authorization": f"Bearer {TOKEN}"},
                json={"entries": [ENTRY]},
            )
            assert response.status_code == 202
            with trio.fail_after(10):
                while (await readyz(client))[0] == 200:
                    await trio.sleep(0.1)
            status, body = await readyz(client)
            assert status == 503 and body.checks.loki.ok is False
            assert body.checks.loki.detail.startswith("no push taken for")
            assert "HTTP 503" in body.checks.loki.detail
            rx.clear_failures()  # the retried push goes through: ready again
            with trio.fail_after(10):
                while (await readyz(client))[0] != 200:
                    await trio.sleep(0.1)
            await rx.wait_for_entries(1, timeout=5)


@pytest.fixture
def service(tmp_path: Path) -> Service:
    """A service that is not running: readiness reads the facts the stages would set."""
    settings = settings_for(tmp_path, "http://127.0.0.1:9")
    (tmp_path / "wal").mkdir()
    service = Service(settings)
    health = service.context.health
    health.forwarder_running = True
    health.loki_last_ok = time.monotonic()
    return service


async def ask(service: Service) -> tuple[int, Readiness]:
    transport = httpx.ASGITransport(app=build_asgi_app(service))
    async with httpx.AsyncClient(transport=transport, base_url="http://logstack") as client:
        return await readyz(client)


async def test_every_check_passing_is_ready(service: Service) -> None:
    status, body = await ask(service)
    assert status == 200 and body.status == "ready"
    assert body.checks.disk.detail.endswith("free (minimum 20%)")
    assert body.checks.wal.detail == "writable"
    assert body.checks.forwarder.detail == "running"


async def test_stale_loki_answer_is_not_ready(service: Service) -> None:
    assert service.context.health.loki_last_ok is not None
    service.context.health.loki_last_ok -= 61
    service.context.health.loki_last_error = "http://loki:3100: 503"
    status, body = await ask(service)
    assert status == 503
    assert body.checks.loki.detail == "no answer from Loki for 61s: http://loki:3100: 503"


async def test_pushes_refused_while_asked_are_not_ready_and_say_the_push_error(
    service: Service,
) -> None:
    health = service.context.health
    now = time.monotonic()
    health.loki_failing_since = now - 61
    health.loki_last_failure = now - 1
    health.loki_push_error = "http://loki:3100: HTTP 401"
    health.loki_last_error = "http://loki:3100/ready: HTTP 503"  # a probe's, since
    status, body = await ask(service)
    assert status == 503
    assert body.checks.loki.detail == "no push taken for 61s: http://loki:3100: HTTP 401"


async def test_a_refused_push_long_ago_with_nothing_to_push_does_not_keep_it_not_ready(
    service: Service,
) -> None:
    """One push refused (a 401, dead-lettered) and nothing since: readiness stayed 503 for
    good, so a load balancer never sent the traffic that would have shown Loki fixed."""
    health = service.context.health
    now = time.monotonic()
    health.loki_failing_since = health.loki_last_failure = now - 120
    health.loki_push_error = "http://loki:3100: HTTP 401"
    status, body = await ask(service)
    assert status == 200 and body.checks.loki.detail.startswith("Loki answered")


async def test_wal_write_failure_is_not_ready(service: Service) -> None:
    service.context.health.wal_writable = False
    service.context.health.wal_last_error = "fsync of WAL segment of x failed: EIO"
    status, body = await ask(service)
    assert status == 503 and body.checks.wal.ok is False
    assert "EIO" in body.checks.wal.detail


async def test_a_wal_root_that_is_no_longer_a_directory_is_not_ready(
    service: Service, tmp_path: Path
) -> None:
    """``os.access(root, W_OK)`` alone said writable for a plain file put in its place."""
    (tmp_path / "wal").rmdir()
    (tmp_path / "wal").write_text("not a directory")
    status, body = await ask(service)
    assert status == 503 and body.checks.wal.ok is False
    assert body.checks.wal.detail == f"WAL directory {tmp_path / 'wal'} is not a writable directory"


async def test_stopped_forwarder_is_not_ready(service: Service) -> None:
    service.context.health.forwarder_running = False
    status, body = await ask(service)
    assert status == 503 and body.checks.forwarder.detail == "not running"


async def test_low_disk_is_not_ready(tmp_path: Path) -> None:
    settings = Settings.model_validate(
        {"wal": {"root_path": str(tmp_path), "min_free_disk_ratio": 0.999}}
    )
    service = Service(settings)
    service.context.health.forwarder_running = True
    status, body = await ask(service)
    assert status == 503 and body.checks.disk.ok is False
    assert "minimum 100%" in body.checks.disk.detail


async def test_stopping_is_not_ready(service: Service) -> None:
    service.stopping = True
    status, body = await ask(service)
    assert status == 503 and body.status == "stopping"
    assert body.checks.loki.ok  # the checks still say what they see
