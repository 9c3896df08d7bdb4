"""Worker roles and WAL shards (``logstack._workers``); the processes themselves are tested
in ``tests/e2e/test_workers.py``."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
import yaml

from logstack._config import Settings
from logstack._entry import LogEntry
from logstack._metrics import Metrics
from logstack._service import open_service
from logstack._wal import WalStore
from logstack._wal_format import EntryBatch
from logstack._wal_inspect import inspect_wal
from logstack._workers import (
    WorkerRole,
    needs_supervisor,
    orphan_shards,
    parse_worker,
    retire_shard,
    shard_root,
    worker_command,
)
from logstack.testing._process import TEST_TOKEN, TEST_TOKEN_2

RECEIVED_NS = 1_764_000_000_000_000_000


def settings(tmp_path: Path, **server: object) -> Settings:
    return Settings.model_validate(
        {
            "server": {"port": 0, **server},
            "security": {
                "rate_limit_rps": 100,
                "rate_limit_burst": 1,
                "api_keys": {
                    TEST_TOKEN: {"name": "payments", "rate_limit_rps": 50, "rate_limit_burst": 9},
                    TEST_TOKEN_2: {"name": "users"},
                },
            },
            "wal": {"root_path": str(tmp_path / "wal"), "quota_bytes": 1001},
            "loki": {"base_url": "http://127.0.0.1:9"},
        }
    )


def test_a_single_worker_runs_the_settings_unchanged(tmp_path: Path) -> None:
    base = settings(tmp_path)
    assert WorkerRole().apply(base) is base


def test_a_worker_gets_its_shard_and_its_share_of_limits_and_quota(tmp_path: Path) -> None:
    base = settings(tmp_path)
    applied = WorkerRole(1, 2, port=4321, ports_file="/tmp/p").apply(base)
    assert applied.wal.root_path == tmp_path / "wal" / "_shard-1"
    assert applied.wal.quota_bytes == 500
    assert applied.security.rate_limit_rps == 50
    # A bucket smaller than one request would refuse everything: at least 1.
    assert applied.security.rate_limit_burst == 1
    payments = applied.security.api_keys[TEST_TOKEN]
    assert (payments.rate_limit_rps, payments.rate_limit_burst) == (25, 4.5)
    users = applied.security.api_keys[TEST_TOKEN_2]
    assert (users.rate_limit_rps, users.rate_limit_burst) == (None, None)
    assert applied.server.port == 4321 and applied.server.workers == 2
    assert applied.server.bound_ports_file == "/tmp/p"
    # Worker 0 keeps the root itself: going from 1 to N workers keeps the existing WAL.
    assert WorkerRole(0, 2).apply(base).wal.root_path == tmp_path / "wal"
    assert base.security.rate_limit_rps == 100  # the original is untouched


def make_shard(root: Path, index: int, key: str = "payments", dead_letters: bool = False) -> Path:
    shard = shard_root(root, index)
    (shard / key).mkdir(parents=True)
    (shard / key / "0000000000000001.seg").write_bytes(b"x")
    if dead_letters:
        (shard / key / "dead-letters.jsonl").write_text("{}\n")
    return shard


def test_orphan_shards_are_the_ones_beyond_the_worker_count_with_segments(
    tmp_path: Path,
) -> None:
    root = tmp_path / "wal"
    make_shard(root, 0)
    make_shard(root, 1)
    make_shard(root, 3)
    (root / "_shard-2").mkdir()  # empty: nothing to drain
    (root / "_shard-x").mkdir()  # not a shard name
    assert orphan_shards(root, 1) == [1, 3]
    assert orphan_shards(root, 2) == [3]
    assert orphan_shards(root, 4) == []
    assert orphan_shards(tmp_path / "missing", 1) == []


def test_needs_supervisor_for_several_workers_or_a_shard_left_behind(tmp_path: Path) -> None:
    assert not needs_supervisor(settings(tmp_path))
    assert needs_supervisor(settings(tmp_path, workers=2))
    make_shard(tmp_path / "wal", 1)
    assert needs_supervisor(settings(tmp_path))


def test_retire_shard_removes_segments_and_keeps_dead_letters(tmp_path: Path) -> None:
    root = tmp_path / "wal"
    gone = make_shard(root, 1)
    retire_shard(gone)
    assert not gone.exists()
    kept = make_shard(root, 2, dead_letters=True)
    retire_shard(kept)
    assert [p.name for p in kept.glob("*/*")] == ["dead-letters.jsonl"]


async def test_wal_store_and_inspect_tell_keys_from_shards(tmp_path: Path) -> None:
    root = tmp_path / "wal"
    for shard in (root, shard_root(root, 1)):
        store = WalStore(shard, 1 << 20, Metrics())
        store.open()
        keylog = store.log_for("payments")
        keylog.append(
            [EntryBatch("r", RECEIVED_NS, [LogEntry(RECEIVED_NS, "INFO", "m", "s", "e")])]
        )
        await keylog.sync()
        store.close()
    reopened = WalStore(root, 1 << 20, Metrics())
    reopened.open()
    assert list(reopened.logs) == ["payments"]  # not a key called "_shard-1"
    reopened.close()
    out = io.StringIO()
    assert inspect_wal(str(root), show_records=False, out=out) == 0
    report = out.getvalue()
    assert "key payments: 1 segment(s)" in report
    assert "key _shard-1/payments: 1 segment(s)" in report


def test_worker_command_round_trips_the_role() -> None:
    role = WorkerRole(2, 3, drain=True, port=8123, ports_file="/run/w2")
    command = worker_command(role, "/etc/logstack.yaml")
    assert command[:4] == [sys.executable, "-m", "logstack", "serve"]
    assert command[command.index("--worker") + 1] == "2/3"
    assert parse_worker("2/3") == (2, 3)
    assert "--drain" in command and command[command.index("--port") + 1] == "8123"
    assert command[command.index("--config") + 1] == "/etc/logstack.yaml"
    assert "--config" not in worker_command(WorkerRole(0, 2), None)


async def test_reload_keeps_the_worker_share(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    doc = {
        "server": {"port": 0},
        "security": {"rate_limit_rps": 100, "api_keys": {TEST_TOKEN: {"name": "payments"}}},
        "wal": {"root_path": str(tmp_path / "wal")},
        "loki": {"base_url": "http://127.0.0.1:9"},
    }
    path.write_text(yaml.safe_dump(doc))
    role = WorkerRole(1, 2)
    async with open_service(Settings.model_validate(doc), config_path=path, role=role) as service:
        assert service.context.settings.security.rate_limit_rps == 50
        assert service.wal.root == tmp_path / "wal" / "_shard-1"
        doc["security"]["rate_limit_rps"] = 300  # type: ignore[index]
        path.write_text(yaml.safe_dump(doc))
        assert await service.reload()
        assert service.context.settings.security.rate_limit_rps == 150
        assert service.context.settings.wal.root_path == tmp_path / "wal" / "_shard-1"


@pytest.mark.parametrize("bad", ["0", "65"])
def test_cli_refuses_a_worker_count_out_of_range(
    bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from logstack._cli import main

    assert main(["serve", "--workers", bad]) == 2
    assert "--workers: must be between 1 and 64" in capsys.readouterr().err
