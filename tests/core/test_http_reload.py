"""``Service.reload`` (what SIGHUP runs): what applies at once, what waits for a restart, and
a bad file changing nothing. The signal itself is tested on a real process in
``tests/e2e/test_ops_signals.py``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from logstack._config import Settings
from logstack._service import RESTART_ONLY, Service, keep_restart_only, open_service
from logstack.testing._process import TEST_ADMIN_TOKEN, TEST_TOKEN, TEST_TOKEN_2

NEW_TOKEN = "test_token_reloaded_0123456789"
ENTRY = {
    "timestamp": "2025-09-24T12:00:00.000Z",
    "level": "INFO",
    "message": "hello",
    "service": "payments-api",
    "env": "prod",
}


def config_for(tmp_path: Path, **security: Any) -> dict[str, Any]:
    return {
        "server": {"port": 0, "log_level": "INFO"},
        "security": {
            "admin_token": TEST_ADMIN_TOKEN,
            "api_keys": {TEST_TOKEN: {"name": "payments-api"}, TEST_TOKEN_2: {"name": "users"}},
            **security,
        },
        "wal": {"root_path": str(tmp_path / "wal")},
        "loki": {"base_url": "http://127.0.0.1:9"},
    }


def test_restart_only_settings_keep_their_running_values() -> None:
    old = Settings.model_validate({"server": {"port": 8000}, "wal": {"root_path": "/a"}})
    new = Settings.model_validate(
        {
            "server": {"port": 9000, "request_timeout_s": 5},
            "wal": {"root_path": "/b", "quota_bytes": 1000},
            "pipeline": [{"type": "auth"}],
        }
    )
    merged, kept = keep_restart_only(old, new)
    assert kept == ["server.port", "wal.root_path", "pipeline"]
    assert merged.server.port == 8000 and merged.server.request_timeout_s == 5
    assert str(merged.wal.root_path) == "/a" and merged.wal.quota_bytes == 1000
    assert merged.pipeline == old.pipeline
    assert keep_restart_only(old, old) == (old, [])
    assert set(RESTART_ONLY) == {"server", "wal"}


async def test_reload_applies_keys_and_log_level_at_once(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    config = config_for(tmp_path)
    path.write_text(yaml.safe_dump(config))
    root = logging.getLogger()
    level = root.level
    try:
        async with (
            open_service(Settings.model_validate(config), config_path=path) as service,
            httpx.AsyncClient(base_url=service.binds[0]) as client,
        ):

            async def ingest(token: str) -> int:
                response = await client.post(
                    "/v1/logs:ingest",
                    headers={"Authorization": f"Bearer {token}"},
                    json={"entries": [ENTRY]},
                )
                return response.status_code

            assert [await ingest(t) for t in (TEST_TOKEN, TEST_TOKEN_2, NEW_TOKEN)] == [
                202,
                202,
                401,
            ]
            config["security"]["api_keys"] = {
                TEST_TOKEN: {"name": "payments-api", "active": False},
                NEW_TOKEN: {"name": "reloaded"},
            }
            config["server"]["log_level"] = "DEBUG"
            path.write_text(yaml.safe_dump(config))
            assert await service.reload()
            assert service.config_version == 2
            assert [await ingest(t) for t in (TEST_TOKEN, TEST_TOKEN_2, NEW_TOKEN)] == [
                401,
                401,
                202,
            ]
            assert root.level == logging.DEBUG
    finally:
        root.setLevel(level)


async def test_a_bad_file_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    config = config_for(tmp_path)
    path.write_text(yaml.safe_dump(config))
    service = Service(Settings.model_validate(config), config_path=path)
    before = service.context.settings
    for broken in (
        "security: {api_keys: [",
        yaml.safe_dump({**config, "loki": {"base_url": None, "urls": []}}),
        yaml.safe_dump({**config, "pipeline": [{"type": "no_such_stage"}]}),
        # These stopped the service (exit 1) or replaced every key by the defaults:
        "server:\n  host: caf\xe9\n".encode("latin-1"),  # not UTF-8
        "a: " + "[" * 20_000 + "]" * 20_000,  # nested past the recursion limit
        "",  # a half-written file reads as empty
        "# only a comment\n",
        yaml.safe_dump(config) + "security: {}\n",  # a section given twice
    ):
        if isinstance(broken, bytes):
            path.write_bytes(broken)
        else:
            path.write_text(broken)
        assert not await service.reload()
        assert service.context.settings is before
        assert service.config_version == 1
        assert service.last_reload_error
    path.write_text(yaml.safe_dump(config))
    assert await service.reload()
    assert service.last_reload_error is None


async def test_a_stage_failing_to_reload_does_not_stop_the_others(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken:
        name = "broken"

        def reload(self, settings: Any) -> None:
            raise RuntimeError("bug")

    class Fine:
        name = "fine"
        seen: Any = None

        def reload(self, settings: Any) -> None:
            self.seen = settings

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config_for(tmp_path)))
    service = Service(Settings.model_validate(config_for(tmp_path)), config_path=path)
    fine = Fine()
    service.stages = [Broken(), fine]  # type: ignore[list-item]
    assert await service.reload()
    assert fine.seen is service.context.settings
    assert "stage failed to apply the reloaded config" in caplog.text
