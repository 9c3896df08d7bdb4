"""``benchmarks/event_loop_tasks.py``: a real server timed task by task, the table read
right, and arguments refused with a reason."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROW = re.compile(r"^(\S+) +([0-9.]+) +([0-9.]+) +([0-9.]+) +([0-9.]+)%$", re.MULTILINE)


def test_a_short_run_times_the_stages_and_the_http_tasks_of_a_real_server(
    run_script: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    args = ("--lines", "10", "--connections", "2", "--warmup", "0.5", "--duration", "1")
    out = run_script("event_loop_tasks", *args)
    assert out.returncode == 0, out.stderr
    assert list(tmp_path.iterdir()) == []  # its work directory (WAL, counters) removed
    head = r"LogStack, delivery included: [0-9,]+ requests of 10 lines, 2 connections"
    assert re.search(head, out.stdout)
    rows = {row[0]: row for row in ROW.findall(out.stdout)}
    for task in ("stage:validate", "stage:wal_append", "BatchStage._follow"):
        assert task in rows, out.stdout
        assert float(rows[task][2]) > 0  # µs per request
    # A simple stage takes at most two steps per batch of requests (its work, and passing
    # the batch on), whether or not requests were merged into it.
    assert 0 < float(rows["stage:validate"][1]) <= 2
    assert sum(float(row[4]) for row in rows.values()) <= 100.5
    assert re.search(r"^all tasks +[0-9.]+ +[0-9.]+$", out.stdout, re.MULTILINE)


def test_a_paced_run_says_so_and_offers_no_more_than_its_rate(
    run_script: Callable[..., Any],
) -> None:
    args = ("--lines", "10", "--connections", "2", "--warmup", "0.5", "--duration", "2")
    out = run_script("event_loop_tasks", *args, "--rate", "40")
    assert out.returncode == 0, out.stderr
    head = re.search(r"([0-9,]+) requests/s \(paced at 40\)", out.stdout)
    assert head, out.stdout
    assert 20 <= int(head.group(1).replace(",", "")) <= 41


def test_a_drain_is_timed_per_push(
    run_script: Callable[..., Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    out = run_script("event_loop_tasks", "--drain", "--connections", "4", "--duration", "1")
    assert out.returncode == 0, out.stderr
    assert list(tmp_path.iterdir()) == []
    head = r"LogStack draining [0-9,]+ lines in [0-9.]+ s \([0-9,]+ lines/s; ingest with Loki down"
    assert re.search(head, out.stdout), out.stdout
    rows = {row[0]: row for row in ROW.findall(out.stdout)}
    assert float(rows["BatchStage._follow"][2]) > 0
    # One push per 1000 entries, each answered once: about one forwarder task per push.
    assert 0.5 <= float(rows["LokiForwarder.deliver_guarded"][1]) / 10 <= 2
    assert "stage:validate" not in rows  # nothing is ingested while it drains


def test_the_table_ranks_tasks_by_time_and_leaves_io_waits_out_of_the_shares(
    load_script: Callable[[str], ModuleType],
) -> None:
    module = load_script("event_loop_tasks")
    counts = {
        "steps": {
            "stage:validate": 10,
            "TCPServer.run": 40,
            module.IO_WAIT: 30,
            module.IO_POLL: 20,
        },
        "ns": {
            "stage:validate": 3_000_000,
            "TCPServer.run": 600_000,
            module.IO_WAIT: 9_000_000,
            module.IO_POLL: 400_000,
        },
    }
    lines = module.table(counts, units=100, top=10).splitlines()
    assert lines[0].split()[1:3] == ["steps/req", "µs/req"]
    assert lines[1].split() == ["<I/O", "wait>", "0.30", "90.0", "300.0"]
    assert lines[2].split() == ["stage:validate", "0.10", "30.0", "300.0", "75.0%"]
    assert lines[3].split() == ["TCPServer.run", "0.40", "6.0", "15.0", "15.0%"]
    assert lines[4].split() == ["<I/O", "poll>", "0.20", "4.0", "20.0", "10.0%"]
    assert lines[5].split() == ["all", "tasks", "0.50", "36.0"]


def test_the_timer_tells_idle_waits_from_polls(load_script: Callable[[str], ModuleType]) -> None:
    module = load_script("event_loop_tasks")
    timer = module.StepTimer(Path("unused"))
    for timeout in (0.0, 0.0, 0.5):
        timer.before_io_wait(timeout)
        timer.after_io_wait(timeout)
    assert timer.steps == {module.IO_POLL: 2, module.IO_WAIT: 1}
    assert set(timer.ns) == {module.IO_POLL, module.IO_WAIT}


@pytest.mark.parametrize(
    ("name", "label"),
    [
        ("hypercorn.trio.tcp_server.TCPServer._read_data", "TCPServer._read_data"),
        ("stage:validate", "stage:validate"),
        ("logstack._service.Service.serve.<locals>.run_hypercorn", "serve.run_hypercorn"),
    ],
)
def test_tasks_are_named_without_their_module(
    load_script: Callable[[str], ModuleType], name: str, label: str
) -> None:
    assert load_script("event_loop_tasks").task_label(name) == label


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["--target", "nginx"], "invalid choice: 'nginx'"),
        (["--connections", "0"], "--lines and --connections must be at least 1"),
        (["--duration", "0"], "--duration and --warmup above 0"),
        (["--drain", "--target", "asgi"], "--drain applies to --target logstack only"),
        (["--rate", "0"], "--rate must be above 0"),
        (["--drain", "--rate", "100"], "a drain is not paced"),
    ],
)
def test_bad_arguments_are_refused_with_the_reason(
    run_script: Callable[..., Any], args: list[str], reason: str
) -> None:
    out = run_script("event_loop_tasks", *args)
    assert out.returncode == 2
    assert reason in out.stderr


def test_the_server_side_refuses_a_command_it_cannot_run(
    load_script: Callable[[str], ModuleType],
) -> None:
    with pytest.raises(SystemExit, match="not a '<python> -m <module>' command"):
        load_script("event_loop_tasks").serve_with_step_timer(["python", "server.py"])
