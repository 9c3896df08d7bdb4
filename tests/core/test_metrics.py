"""Every metric of SPEC §8 moves when its event happens (``token`` = the key's name).

The service runs in this test's trio loop (``open_service``: real Hypercorn on a loopback
port, real WAL, the real pipeline) against the Loki-compatible receiver, so each test drives
an event over HTTP and reads the service's own registry.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import trio
import yaml

from logstack._config import Settings
from logstack._http import create_app
from logstack._service import Service, build_asgi_app, open_service
from logstack.testing import LokiReceiver, open_loki_receiver
from logstack.testing._process import TEST_ADMIN_TOKEN, TEST_TOKEN, make_test_config

LIMITED_TOKEN = "test_token_limited_0123456789"
INGEST = "/v1/logs:ingest"


def settings_for(tmp_path: Path, loki_url: str, **sections: Any) -> Settings:
    config = make_test_config(tmp_path, loki_url, **sections)
    config["security"]["api_keys"][LIMITED_TOKEN] = {
        "name": "limited",
        "rate_limit_rps": 0.001,
        "rate_limit_burst": 1,
    }
    config["loki"]["batch_max_wait_s"] = 0.05
    return Settings.model_validate(config)


def entry(message: str = "hello", **extra: Any) -> dict[str, Any]:
    return {
        "timestamp": "2025-09-24T12:00:00.000Z",
        "level": "INFO",
        "message": message,
        "service": "payments-api",
        "env": "prod",
        **extra,
    }


def auth(token: str = TEST_TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


class Probe:
    """Reads one service's registry."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.registry = service.context.metrics.registry

    def __call__(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    async def until(self, check: Callable[[], bool], what: str, limit_s: float = 10) -> None:
        with trio.move_on_after(limit_s):
            while not check():
                await trio.sleep(0.02)
            return
        raise AssertionError(f"waited {limit_s}s for {what}")


@asynccontextmanager
async def running(
    tmp_path: Path, rx: LokiReceiver, **sections: Any
) -> AsyncIterator[tuple[Service, httpx.AsyncClient, Probe]]:
    assert rx.url is not None
    settings = settings_for(tmp_path, rx.url, **sections)
    async with (
        open_service(settings) as service,
        httpx.AsyncClient(base_url=service.binds[0], timeout=10) as client,
    ):
        yield service, client, Probe(service)


async def test_ingest_side_metrics_move(tmp_path: Path) -> None:
    async with open_loki_receiver() as rx, running(tmp_path, rx) as (_, client, m):
        # Accepted, with a masked field: ingested, masked, fsynced, WAL gauges, HTTP.
        response = await client.post(
            INGEST, headers=auth(), json={"entries": [entry(metadata={"password": "x"})] * 3}
        )
        assert response.status_code == 202
        assert m("logs_ingested_total", token="payments-api") == 3
        assert m("masked_fields_total", token="payments-api", key="password") == 3
        assert m("wal_fsyncs_total") >= 1
        assert m("wal_fsync_duration_seconds_count") >= 1
        assert m("wal_segments_active", token="payments-api") >= 1
        assert m("wal_disk_usage_bytes", token="payments-api") > 0
        labels = {"method": "POST", "endpoint": INGEST}
        assert m("http_requests_total", **labels, status_code="202") == 1
        assert m("http_request_duration_seconds_count", **labels) == 1

        # Refusals, each with its reason; unauthenticated ones under "unauthenticated",
        # the others under their key, also those refused on the headers.
        bad = await client.post(INGEST, headers=auth(), json={"entries": [entry(level="LOUD")]})
        assert bad.status_code == 400
        assert m("logs_rejected_total", token="payments-api", reason="schema") == 1
        await client.post(INGEST, json={"entries": [entry()]})
        assert m("logs_rejected_total", token="unauthenticated", reason="missing_credentials") == 1
        await client.post(INGEST, headers={**auth(), "Content-Type": "text/plain"}, content=b"x")
        media = "unsupported_media_type"
        assert m("logs_rejected_total", token="payments-api", reason=media) == 1
        assert m("logs_rejected_total", token="unauthenticated", reason=media) == 0
        await client.post(
            INGEST, headers={**auth(), "Content-Type": "application/json"}, content=b"{"
        )
        assert m("logs_rejected_total", token="payments-api", reason="malformed_json") == 1

        # The token bucket: burst 1 for "limited".
        for _ in range(2):
            await client.post(INGEST, headers=auth(LIMITED_TOKEN), json={"entries": [entry()]})
        assert m("rate_limit_exceeded_total", token="limited") == 1
        assert m("logs_rejected_total", token="limited", reason="rate_limit_exceeded") == 1

        # A double slash routes (and counts) like one.
        before = m("http_requests_total", **labels, status_code="202")
        url = f"{client.base_url}".rstrip("/") + "/" + INGEST
        double = await client.post(url, headers=auth(), json={"entries": [entry()]})
        assert double.status_code == 202
        assert m("http_requests_total", **labels, status_code="202") == before + 1

        # Unknown paths and methods share bounded labels.
        await client.get("/no/such/path")
        await client.request("PUT", "/healthz")
        assert m("http_requests_total", method="GET", endpoint="other", status_code="404") == 1
        assert m("http_requests_total", method="other", endpoint="/healthz", status_code="405") == 1

        # Delivery: pushes, their duration, entries confirmed.
        await m.until(
            lambda: m("loki_entries_forwarded_total", token="payments-api") >= 4, "delivery"
        )
        assert m("loki_requests_total", status_code="204") >= 1
        assert m("loki_request_duration_seconds_count") >= 1


async def test_rotation_metrics_move_for_size_and_manual(tmp_path: Path) -> None:
    async with (
        open_loki_receiver() as rx,
        running(tmp_path, rx, wal={"segment_max_bytes": 4096}) as (_, client, m),
    ):
        for i in range(6):
            big = entry(message="x" * 1000 + str(i))
            assert (await client.post(INGEST, headers=auth(), json={"entries": [big]})).is_success
        assert m("segment_rotations_total", token="payments-api", reason="size") >= 1
        await client.post(INGEST, headers=auth(), json={"entries": [entry()]})
        flushed = await client.post("/v1/admin/flush", headers=auth(TEST_ADMIN_TOKEN))
        assert flushed.status_code == 200, flushed.text
        assert m("segment_rotations_total", token="payments-api", reason="manual") == 1


async def test_loki_failure_metrics_move(tmp_path: Path) -> None:
    async with open_loki_receiver() as rx, running(tmp_path, rx) as (_, client, m):
        rx.fail_next(500, 2)
        await client.post(INGEST, headers=auth(), json={"entries": [entry("retry me")]})
        await m.until(lambda: m("loki_retries_total", token="payments-api") >= 2, "2 retries")
        await m.until(lambda: m("loki_entries_forwarded_total", token="payments-api") == 1, "ok")
        assert m("loki_requests_total", status_code="500") >= 2

        rx.fail_next(400, 1)
        await client.post(INGEST, headers=auth(), json={"entries": [entry("refused")] * 2})
        await m.until(lambda: m("dlq_entries_total", token="payments-api") >= 1, "dead letters")
        assert m("loki_requests_total", status_code="400") == 1


async def test_lag_and_readiness_follow_a_loki_outage(tmp_path: Path) -> None:
    rx = LokiReceiver()
    async with open_loki_receiver(receiver=rx):
        pass  # learn a free port, then leave Loki down
    assert rx.url is not None
    settings = settings_for(
        tmp_path,
        rx.url,
        loki={"ready_window_s": 0.5, "ready_probe_interval_s": 0.2, "backoff_max_s": 0.3},
    )
    async with open_service(settings) as service, httpx.AsyncClient(base_url=service.binds[0]) as c:
        m = Probe(service)
        assert (await c.post(INGEST, headers=auth(), json={"entries": [entry()]})).is_success
        await trio.sleep(1.2)
        await c.get("/metrics")  # gauges computed on scrape
        assert m("forwarder_lag_seconds", token="payments-api") >= 1.0
        assert m("logstack_ready", check="loki") == 0
        assert m("logstack_ready", check="wal") == 1
        async with open_loki_receiver(port=rx.port, receiver=rx):
            await rx.wait_for_entries(1, timeout=10)

            async def caught_up() -> bool:
                await c.get("/metrics")
                return (
                    m("forwarder_lag_seconds", token="payments-api") == 0
                    and m("logstack_ready", check="loki") == 1
                )

            with trio.fail_after(10):
                while not await caught_up():
                    await trio.sleep(0.05)


async def test_quota_rejections_are_counted(tmp_path: Path) -> None:
    async with open_loki_receiver() as rx:
        rx.stop()  # Loki down: the backlog grows to the quota
        async with running(tmp_path, rx, wal={"quota_bytes": 2048}) as (_, client, m):
            statuses = []
            for i in range(8):
                body = {"entries": [entry("q" * 400 + str(i))]}
                statuses.append((await client.post(INGEST, headers=auth(), json=body)).status_code)
            assert 429 in statuses, statuses
            assert m("logs_rejected_total", token="payments-api", reason="quota_exceeded") >= 1


async def test_masking_failure_is_counted(tmp_path: Path) -> None:
    class Broken:
        def for_key(self, name: str) -> Any:
            raise RuntimeError("masking bug")

    async with open_loki_receiver() as rx, running(tmp_path, rx) as (service, client, m):
        [mask] = [s for s in service.stages if s.name == "mask"]
        mask.masker = Broken()  # type: ignore[attr-defined]
        response = await client.post(INGEST, headers=auth(), json={"entries": [entry()]})
        assert response.status_code == 500
        assert response.json()["error"] == "internal_error"
        assert m("masking_errors_total") == 1
        assert m("logs_rejected_total", token="payments-api", reason="internal_error") == 1


async def test_recovery_damage_is_counted(tmp_path: Path) -> None:
    async with open_loki_receiver() as rx:
        rx.stop()
        async with running(tmp_path, rx) as (_, client, _m):
            await client.post(INGEST, headers=auth(), json={"entries": [entry()]})
        [segment] = sorted((tmp_path / "wal" / "payments-api").glob("*.seg"))
        with segment.open("ab") as handle:
            handle.write(b"\x30\x00\x00\x00torn")  # a frame header promising more bytes
        async with running(tmp_path, rx) as (_, _client, m):
            assert (
                sum(
                    m("wal_corrupt_records_total", token="payments-api", kind=kind)
                    for kind in ("torn_tail", "corrupt_tail", "unreadable", "corrupt_record")
                )
                >= 1
            ), m.registry.get_sample_value


async def test_reload_metrics_move(tmp_path: Path) -> None:
    async with open_loki_receiver() as rx:
        assert rx.url is not None
        config = make_test_config(tmp_path, rx.url)
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        settings = Settings.model_validate(config)
        async with open_service(settings, config_path=path) as service:
            m = Probe(service)
            assert m("logstack_config_version") == 1
            assert await service.reload()
            assert m("logstack_config_reloads_total", result="ok") == 1
            assert m("logstack_config_version") == 2
            path.write_text("server: [not, a, mapping]\n")
            assert not await service.reload()
            assert m("logstack_config_reloads_total", result="failed") == 1
            assert m("logstack_config_version") == 2
            assert m("logstack_build_info", version="0.1.0") == 1


async def test_registry_survives_app_re_creation(tmp_path: Path) -> None:
    """The registry belongs to the service, not the Quart app: building the app again (as
    tests and a future hot-reload do) keeps every counter and registers nothing twice."""
    settings = Settings.model_validate({"wal": {"root_path": str(tmp_path / "wal")}})
    service = Service(settings)
    registry = service.context.metrics.registry
    for round_no in range(1, 4):
        create_app(service)  # a bare app too: must not re-register anything
        transport = httpx.ASGITransport(app=build_asgi_app(service))
        async with httpx.AsyncClient(transport=transport, base_url="http://logstack") as c:
            assert (await c.get("/healthz")).status_code == 200
            exposition = (await c.get("/metrics")).text
        labels = {"method": "GET", "endpoint": "/healthz", "status_code": "200"}
        assert registry.get_sample_value("http_requests_total", labels) == round_no
        sample = 'http_requests_total{endpoint="/healthz",method="GET",status_code="200"}'
        assert f"{sample} {round_no}.0" in exposition
    # Two services in one process: separate registries, no "duplicated timeseries".
    other = Service(settings)
    assert other.context.metrics.registry is not registry


def test_every_spec_metric_is_exposed() -> None:
    """SPEC §8's list, by name and label names."""
    service = Service(Settings())
    families = {metric.name: metric for metric in service.context.metrics.registry.collect()}
    expected = {
        "logs_ingested": {"token"},
        "logs_rejected": {"token", "reason"},
        "http_requests": {"method", "endpoint", "status_code"},
        "http_request_duration_seconds": {"method", "endpoint"},
        "rate_limit_exceeded": {"token"},
        "masked_fields": {"token", "key"},
        "wal_segments_active": {"token"},
        "wal_disk_usage_bytes": {"token"},
        "segment_rotations": {"token", "reason"},
        "loki_requests": {"status_code"},
        "loki_request_duration_seconds": set(),
        "loki_entries_forwarded": {"token"},
        "loki_retries": {"token"},
        "dlq_entries": {"token"},
        "forwarder_lag_seconds": {"token"},
    }
    metrics = service.context.metrics
    declared = {
        m._name: set(m._labelnames)  # type: ignore[attr-defined]
        for m in vars(metrics).values()
        if hasattr(m, "_labelnames")
    }
    for name, labels in expected.items():
        assert name in families, name
        assert declared[name] == labels, name


def test_merged_expositions_label_every_sample_with_its_worker() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from logstack._metrics import Metrics, merge_expositions

    first, second = Metrics(), Metrics()
    first.logs_ingested.labels(token="payments").inc(3)
    second.logs_ingested.labels(token="payments").inc(4)
    second.logs_ingested.labels(token="users").inc(1)
    merged = merge_expositions({"0": first.exposition(), "1": second.exposition()})
    families = {f.name: f for f in text_string_to_metric_families(merged.decode())}
    ingested = {
        (s.labels["worker"], s.labels["token"]): s.value
        for s in families["logs_ingested"].samples
        if s.name == "logs_ingested_total"
    }
    assert ingested == {("0", "payments"): 3, ("1", "payments"): 4, ("1", "users"): 1}
    # Unlabelled samples get the worker label too; each family is described once.
    builds = [s for s in families["logstack_build_info"].samples]
    assert sorted(s.labels["worker"] for s in builds) == ["0", "1"]
    assert merged.count(b"# TYPE logs_ingested_total counter") == 1
    assert merged.count(b"# HELP process_cpu_seconds_total") == 1
