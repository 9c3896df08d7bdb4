"""Worker roles and WAL shards (``logstack._workers``); the processes themselves are tested
in ``tests/e2e/test_workers.py``."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Any

import pytest
import trio
import yaml

from logstack._config import Settings, load_settings
from logstack._entry import LogEntry
from logstack._errors import ConfigError
from logstack._metrics import Metrics
from logstack._service import Service, _late_stop_signals, open_service
from logstack._wal import WalStore
from logstack._wal_format import EntryBatch
from logstack._wal_inspect import inspect_wal
from logstack._workers import (
    Supervisor,
    WorkerRole,
    needs_supervisor,
    orphan_shards,
    parse_worker,
    retire_shard,
    shard_root,
    worker_command,
)
from logstack.testing._process import TEST_TOKEN, TEST_TOKEN_2, make_test_config

REPO = Path(__file__).resolve().parents[2]

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


def test_the_only_worker_of_a_supervisor_is_not_single(tmp_path: Path) -> None:
    """Fewer workers than last time (1, with a shard left over): worker 0 of 1 still has
    the shared port and the private ports file, and watches its supervisor."""
    base = settings(tmp_path)
    only = WorkerRole(0, 1, port=4321, ports_file="/tmp/p", supervisor=1234)
    assert not only.single
    applied = only.apply(base)
    assert applied.server.bound_ports_file == "/tmp/p" and applied.server.port == 4321
    assert applied.wal.root_path == tmp_path / "wal"
    assert not WorkerRole(1, 1, drain=True).single


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
    role = WorkerRole(2, 3, drain=True, port=8123, ports_file="/run/w2", supervisor=77)
    command = worker_command(role, "/etc/logstack.yaml")
    assert command[:4] == [sys.executable, "-m", "logstack", "serve"]
    assert command[command.index("--worker") + 1] == "2/3"
    assert parse_worker("2/3") == (2, 3)
    assert "--drain" in command and command[command.index("--port") + 1] == "8123"
    assert command[command.index("--config") + 1] == "/etc/logstack.yaml"
    assert command[command.index("--supervisor") + 1] == "77"
    assert "--settings-stdin" in command  # the settings themselves never touch the disk
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


def round_trip(settings: Settings) -> Settings:
    """What a worker makes of the settings its supervisor writes on its stdin."""
    document = Supervisor(settings, None).settings_document()
    return load_settings(data=json.loads(document), env={})


def test_settings_survive_the_trip_to_a_worker(tmp_path: Path) -> None:
    shipped = load_settings(REPO / "config.yaml", env={})
    assert round_trip(shipped) == shipped
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(make_test_config(tmp_path, "http://127.0.0.1:9")))
    tested = load_settings(path, env={})
    assert round_trip(tested) == tested


def test_environment_overrides_apply_to_settings_given_as_data() -> None:
    env = {"LOGSTACK_SERVER_PORT": "9123"}
    assert load_settings(data={"server": {"port": 1}}, env=env).server.port == 9123
    with pytest.raises(ConfigError, match=r"server\.colour: unknown key"):
        load_settings(data={"server": {"colour": "red"}}, env={})


async def test_the_supervisor_keeps_the_settings_its_workers_run(tmp_path: Path) -> None:
    """A SIGHUP is checked by the supervisor too: a worker it starts again gets what the
    others run, not a broken file or a restart-only value they did not take."""
    path = tmp_path / "config.yaml"
    doc: dict[str, Any] = {
        "security": {"rate_limit_rps": 100, "api_keys": {TEST_TOKEN: {"name": "payments"}}},
        "wal": {"root_path": str(tmp_path / "wal")},
    }
    path.write_text(yaml.safe_dump(doc))
    started = load_settings(path, env={})
    cli = started.server.model_copy(update={"workers": 3})  # what --workers 3 does
    supervisor = Supervisor(started.model_copy(update={"server": cli}), str(path))
    doc["security"]["rate_limit_rps"] = 300
    doc["wal"]["root_path"] = str(tmp_path / "elsewhere")
    path.write_text(yaml.safe_dump(doc))
    assert await supervisor.reload()
    assert supervisor.settings.security.rate_limit_rps == 300
    assert supervisor.settings.wal.root_path == tmp_path / "wal"  # restart-only: kept
    assert supervisor.settings.server.workers == 3  # the command line still counts
    path.write_text("security: [")
    assert not await supervisor.reload()
    assert supervisor.settings.security.rate_limit_rps == 300


async def test_a_refused_port_leaves_no_directory_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        base = settings(tmp_path, host="127.0.0.1", port=port, workers=2)
        with pytest.raises(ConfigError, match="cannot listen"):
            await Supervisor(base, None).run()
    assert list(temp.iterdir()) == []


FAKE_WORKER = textwrap.dedent(
    """
    import pathlib, sys, time
    ports_file, crashed = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    ports_file.write_text("listening\\n")
    if not crashed.exists():
        crashed.touch()
        sys.exit(1)  # got going, then crashed: the supervisor starts it again
    time.sleep(60)  # until SIGTERM
    """
)


async def test_a_stop_while_a_worker_is_being_restarted_reaches_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM while the supervisor is inside ``open_process`` for a restart: the new
    process must get it too, or the stop waits for it forever."""
    script = tmp_path / "worker.py"
    script.write_text(FAKE_WORKER)

    def command(role: WorkerRole, config_path: str | None) -> list[str]:
        assert role.ports_file is not None
        return [sys.executable, str(script), role.ports_file, str(tmp_path / "crashed")]

    base = settings(tmp_path, host="127.0.0.1")
    supervisor = Supervisor(base, None, command=command)
    real_open_process = trio.lowlevel.open_process
    spawned: list[trio.Process] = []

    async def open_process(*args: Any, **kwargs: Any) -> trio.Process:
        process = await real_open_process(*args, **kwargs)
        spawned.append(process)
        if len(spawned) == 2:
            supervisor._stop_all()  # the signal arrives while the restart is being spawned
        return process

    monkeypatch.setattr(trio.lowlevel, "open_process", open_process)
    with trio.fail_after(20):
        assert await supervisor.run() == 0
    assert len(spawned) == 2 and spawned[1].returncode is not None


async def test_a_second_stop_request_at_once_is_the_same_request(tmp_path: Path) -> None:
    """A SIGTERM to the process group reaches a worker directly and through the supervisor:
    the second must not cancel the drain. A later one still does; one process is as was."""
    worker = Service(settings(tmp_path), role=WorkerRole(1, 2))
    worker._stop_scope = trio.CancelScope()
    worker.request_stop("SIGTERM")
    worker.request_stop("SIGTERM")
    assert not worker._stop_scope.cancel_called
    assert worker._stop_requested_at is not None
    worker._stop_requested_at -= 2  # a second later
    worker.request_stop("SIGTERM")
    assert worker._stop_scope.cancel_called
    single = Service(settings(tmp_path))
    single._stop_scope = trio.CancelScope()
    single.request_stop("SIGTERM")
    single.request_stop("SIGTERM")
    assert single._stop_scope.cancel_called


async def test_a_late_copy_of_the_stop_signal_does_not_end_a_worker(tmp_path: Path) -> None:
    """Once the signal loop has ended, trio puts back the handlers it found and raises the
    signals still queued: a worker's copy of a process-group stop arriving then must not
    kill it before it says it stopped clean. A later signal does what it did before."""
    before: list[int] = []
    original = signal.signal(signal.SIGTERM, lambda signum, frame: before.append(signum))
    try:
        worker = Service(settings(tmp_path), role=WorkerRole(1, 2))
        with _late_stop_signals(worker):
            worker.request_stop("SIGTERM")
            signal.raise_signal(signal.SIGTERM)  # the copy through the supervisor
            assert before == []
            assert worker._stop_requested_at is not None
            worker._stop_requested_at -= 2  # a second later
            signal.raise_signal(signal.SIGTERM)
            assert before == [signal.SIGTERM]
        signal.raise_signal(signal.SIGTERM)
        assert before == [signal.SIGTERM] * 2  # the handler found is back
    finally:
        signal.signal(signal.SIGTERM, original)


PROBE = textwrap.dedent(
    """
    import os, runpy, signal, sys

    class Probe:
        # Reports SIGHUP's disposition when the command line's imports begin.
        def find_spec(self, name, path=None, target=None):
            if name == "logstack._cli":
                print(signal.getsignal(signal.SIGHUP) is signal.SIG_IGN, flush=True)
                os._exit(0)
            return None

    sys.meta_path.insert(0, Probe())
    sys.argv = ["logstack", "serve"]
    runpy.run_module("logstack", run_name="__main__", alter_sys=True)
    """
)


def test_serve_ignores_sighup_before_its_imports(tmp_path: Path) -> None:
    """A SIGHUP to a worker still starting (to the process group, say) must not kill it:
    SIGHUP's default action is to terminate, and trio's handler comes much later."""
    result = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.stdout.strip() == "True", result.stderr


def test_a_worker_without_its_settings_on_stdin_refuses_to_start(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from logstack._cli import main

    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # the supervisor died first
    assert main(["serve", "--worker", "0/2", "--settings-stdin"]) == 2
    assert "--settings-stdin: no settings from the supervisor" in capsys.readouterr().err
