"""``python -m logstack.bench`` runs end to end (short), and its report is what it says."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from logstack._workers import bind_socket
from logstack.bench._cli import (
    SETTLE_S,
    ScenarioResult,
    _CeilingProcess,
    body_factory,
    drain_figures,
    outage_summary,
    render,
)
from logstack.bench._load import LoadResult
from logstack.bench._procstat import process_tree, tree_cpu_seconds, tree_rss_mib
from logstack.testing._process import LogstackProcess, make_test_config


def test_process_tree_sums_a_parent_and_its_children() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        tree = process_tree(os.getpid())
        assert tree[0] == os.getpid() and child.pid in tree
        assert tree_cpu_seconds(os.getpid()) > 0
        assert tree_rss_mib(os.getpid()) > 0
    finally:
        child.kill()
        child.wait()


def _listening_sockets(port: int) -> int:
    """How many sockets listen on 127.0.0.1:``port`` (``/proc/net/tcp``: state 0A)."""
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    local = f"0100007F:{port:04X}"
    return sum(1 for row in rows if row.split()[1] == local and row.split()[3] == "0A")


def test_bare_endpoints_share_one_port_as_workers_do(tmp_path: Path) -> None:
    reserved = bind_socket("127.0.0.1", 0, reuse_port=True)
    port = reserved.getsockname()[1]
    procs = [_CeilingProcess(tmp_path / str(i)) for i in range(2)]
    try:
        for proc in procs:
            proc.reuse_port = port
        urls = [proc.start() for proc in procs]
        assert urls == [f"http://127.0.0.1:{port}"] * 2
        assert _listening_sockets(port) == 2  # each process listens; the held one does not
        for _ in range(4):
            answer = httpx.post(
                urls[0] + "/v1/logs:ingest",
                content=body_factory(2)(1),
                headers={"Content-Type": "application/json"},
            )
            assert answer.status_code == 202
    finally:
        for proc in procs:
            proc.stop()
        reserved.close()


def bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python -m logstack.bench ARGS --json`` as a subprocess; fails on a non-zero exit."""
    run = bench_status(*args, "--json", timeout=timeout)
    assert run.returncode == 0, run.stderr
    return run


def bench_status(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m logstack.bench ARGS`` as a subprocess, whatever its exit status."""
    return subprocess.run(
        [sys.executable, "-m", "logstack.bench", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@contextmanager
def ingest_target(tmp_path: Path) -> Iterator[str]:
    """A LogStack server of its own (no Loki) to point ``--target`` at: its ingest URL."""
    server = LogstackProcess(tmp_path, make_test_config(tmp_path, "http://127.0.0.1:9"))
    server.start()
    try:
        yield server.url + "/v1/logs:ingest"
    finally:
        server.stop()


def test_short_run_reports_every_figure_and_delivers_everything() -> None:
    run = bench(
        "--scenario", "batch-100", "--scenario", "workers-2", "--duration", "1", "--pairs", "1"
    )
    # Progress goes to stderr, so that --json's standard output is the report alone.
    report = json.loads(run.stdout)
    assert "scenario batch-100" in run.stderr and "lines/s" in run.stderr
    rows = {row["scenario"]: row for row in report["scenarios"]}
    assert set(rows) == {"batch-100", "workers-1", "workers-2"}
    for row in rows.values():
        assert row["all_delivered"] is True
        assert row["5xx"] == 0 and row["lines_per_s"] > 0
        assert row["cpu_s_per_100k_lines"] > 0 and row["peak_rss_mib"] > 0
        assert row["receiver_cpu_s_per_100k_lines"] > 0
        assert row["ack_p99_ms"] >= row["ack_p50_ms"] > 0
        assert 0 < row["sustained_lines_per_s"] <= row["lines_per_s"]
        cores = row["cores_during_load"]
        assert set(cores) == {"server", "receiver", "load"}
        assert all(0 < c <= os.cpu_count() for c in cores.values())
    assert rows["workers-1"]["workers"] == 1 and rows["workers-2"]["workers"] == 2
    assert 0 < rows["batch-100"]["ceiling_ratio_median"] < 1.5
    assert rows["workers-2"]["over_one_worker_median"] > 0
    assert rows["workers-2"]["ceiling_two_over_one_median"] > 0
    assert rows["workers-2"]["cpu_per_line_over_one_worker_median"] > 0
    # Both rows delivered everything, so the sustained ratio is there, from the same pair.
    one, two = rows["workers-1"], rows["workers-2"]
    assert two["sustained_over_one_worker"] == [
        pytest.approx(two["sustained_lines_per_s"] / one["sustained_lines_per_s"], rel=0.01)
    ]
    assert "ceiling-100-2 " in run.stderr


def test_half_load_repeats_its_paced_run_and_reports_the_median_p99() -> None:
    run = bench("--scenario", "half-load", "--duration", "1", "--pairs", "3")
    [row] = json.loads(run.stdout)["scenarios"]
    assert row["scenario"] == "half-load" and row["all_delivered"] is True
    runs = row["ack_p99_ms_runs"]
    assert len(runs) == 3 and all(p > 0 for p in runs)
    assert row["ack_p99_ms_median"] == sorted(runs)[1]
    assert row["ack_p99_ms"] == runs[-1]  # the rest of the row is the last paced run's
    assert 0 < row["offered_requests_per_s"] <= row["probe_sustained_requests_per_s"]


def test_the_table_shows_every_goal_figure_under_its_row() -> None:
    goals = {
        "batch-100": {"ceiling_ratio_median": 0.7},
        "half-load": {"ack_p99_ms_median": 12.5, "offered_requests_per_s": 400},
        "outage-recovery": {"drain_over_ingest_median": 2.1},
        "workers-2": {
            "over_one_worker_median": 1.2,
            "sustained_over_one_worker_median": 1.3,
            "cpu_per_line_over_one_worker_median": 1.1,
            "ceiling_two_over_one_median": 1.6,
        },
    }
    report = {
        "machine": {"cores": 2},
        "date": "2026-11-27",
        "command": "python -m logstack.bench",
        "scenarios": [{"scenario": name, **figures} for name, figures in goals.items()],
    }
    text = render(report)
    for name, figures in goals.items():
        for key, value in figures.items():
            assert f"  {name}: {key} = {value}" in text


def test_target_mode_drives_any_endpoint_and_claims_no_server_figures(tmp_path: Path) -> None:
    with ingest_target(tmp_path) as url:
        out = bench(
            "--target", url, "--lines", "10", "--duration", "1", "--connections", "2", timeout=120
        ).stdout
    [row] = json.loads(out)["scenarios"]
    assert row["scenario"] == "target" and row["lines_per_request"] == 10
    # Only 202s: the test config's key allows 1,000 requests/s, more than two connections send.
    assert row["lines_per_s"] > 0 and set(row["statuses"]) == {"202"}
    # It cannot see the target's processes or its Loki: those figures are absent, not zero.
    assert row["cpu_s_per_100k_lines"] is None and row["peak_rss_mib"] is None
    assert row["all_delivered"] is None and row["sustained_lines_per_s"] is None


def result(accepted_lines: int, duration_s: float, wait_s: float | None) -> ScenarioResult:
    load = LoadResult(duration_s=duration_s, accepted_lines=accepted_lines)
    return ScenarioResult(
        "x", 100, load, delivered=accepted_lines, delivered_all=True, delivery_wait_s=wait_s
    )


def test_sustained_rate_counts_the_delivery_backlog_beyond_the_batching_delay() -> None:
    # Delivery kept up: the last lines only waited for their batch and the next look.
    assert result(80_000, 8.0, SETTLE_S).sustained_lines_per_s == 10_000
    assert result(80_000, 8.0, 0.1).sustained_lines_per_s == 10_000
    # Delivery needed 2 s more than that after the load: those seconds count.
    assert result(80_000, 8.0, SETTLE_S + 2.0).sustained_lines_per_s == pytest.approx(8_000)
    # Not measured (the outage scenario, --target) or not everything delivered: no figure.
    assert result(80_000, 8.0, None).sustained_lines_per_s is None
    undelivered = result(80_000, 8.0, 1.0)
    undelivered.delivered_all = False
    assert undelivered.sustained_lines_per_s is None


def test_drain_rate_counts_the_pushes_after_the_first_over_their_own_window() -> None:
    load = LoadResult(duration_s=10.0, accepted_lines=500_000)
    second = 1_000_000_000
    stats = {
        "entries": 500_000,
        "first_stored_ns": 7 * second,
        "first_stored_entries": 1_000,
        "last_stored_ns": 9 * second + second // 2,
    }
    figures = drain_figures(stats, up_ns=6 * second + second // 2, drain_s=3.3, load=load)
    # Receiver up at 6.5 s, first push stored at 7 s, last at 9.5 s: 499,000 lines in 2.5 s.
    assert figures == {
        "drain_s": 3.3,
        "recovery_s": 0.5,
        "drain_window_s": 2.5,
        "drain_lines_per_s": 199_600,
        "drain_over_ingest": 3.99,
    }
    # Nothing stored, or everything in one push: no rate to give, only the total time.
    for first, last in ((None, None), (7 * second, 7 * second)):
        alone = drain_figures(
            stats | {"first_stored_ns": first, "last_stored_ns": last}, 0, 3.3, load
        )
        assert alone == {
            "drain_s": 3.3,
            "recovery_s": None,
            "drain_lines_per_s": None,
            "drain_over_ingest": None,
        }


def test_outage_reports_the_recovery_and_the_drain() -> None:
    run = bench("--scenario", "outage", "--duration", "1", "--pairs", "2")
    [row] = json.loads(run.stdout)["scenarios"]
    assert row["scenario"] == "outage-recovery" and row["all_delivered"] is True
    assert row["4xx"] == 0 and row["5xx"] == 0
    assert 0 <= row["recovery_s"] <= row["drain_s"]
    assert 0 < row["drain_window_s"] <= row["drain_s"]
    assert row["drain_lines_per_s"] > 0 and row["drain_over_ingest"] > 0
    # Repeated --pairs times: every run's ratio, their median; the row is the last run's.
    ratios = row["drain_over_ingest_runs"]
    assert len(ratios) == 2 and ratios[-1] == row["drain_over_ingest"]
    assert row["drain_over_ingest_median"] == round((ratios[0] + ratios[1]) / 2, 2)
    assert [r["drain_lines_per_s"] for r in row["outage_runs"]][-1] == row["drain_lines_per_s"]
    assert all(r["all_delivered"] and r["5xx"] == 0 for r in row["outage_runs"])


def test_outage_summary_holds_delivery_to_every_run() -> None:
    runs = [result(100_000, 10.0, None) for _ in range(3)]
    for run, drain in zip(runs, (20_000, 30_000, 25_000), strict=True):
        run.extra = {"drain_lines_per_s": drain, "drain_over_ingest": drain / 10_000}
    row = outage_summary(runs)
    assert row["drain_over_ingest_runs"] == [2.0, 3.0, 2.5]
    assert row["drain_over_ingest_median"] == 2.5 and row["all_delivered"] is True
    runs[0].delivered_all = False  # one run lost lines: the row must say so
    assert outage_summary(runs)["all_delivered"] is False


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--duration", "0"], "argument --duration: must be greater than 0: '0'"),
        (["--connections", "-3"], "argument --connections: must be greater than 0"),
        (["--pairs", "0"], "argument --pairs: must be greater than 0"),
        (["--workers", "0"], "argument --workers: must be greater than 0"),
        (["--workers", "65"], "argument --workers: at most 64"),
        (["--lines", "x"], "argument --lines: not a number: 'x'"),
        (["--target", "127.0.0.1:8000"], "not an http:// URL with a host"),
        (["--target", "https://loki:443/x"], "the load generator speaks plain HTTP"),
        (["--target", "http://h:99999/x"], "not a usable URL"),
        (["--target", "http://h/x", "--header", "X-Foo"], "expected 'Name: value'"),
        (["--target", "http://h/x", "--workers", "2"], "do not apply to --target"),
    ],
)
def test_bad_arguments_are_refused_before_anything_starts(args: list[str], message: str) -> None:
    """They were tracebacks (ZeroDivisionError, IndexError, RuntimeError with the
    receiver left running) or runs of nothing that exited 0."""
    run = bench_status(*args)
    assert run.returncode == 2, run.stderr
    assert message in run.stderr
    assert "Traceback" not in run.stderr


def test_a_target_where_nothing_listens_is_one_line() -> None:
    sock = bind_socket("127.0.0.1", 0, reuse_port=False)  # bound, never listening
    port = sock.getsockname()[1]
    run = bench_status("--target", f"http://127.0.0.1:{port}/x", "--duration", "0.3")
    assert run.returncode == 1
    sock.close()
    assert f"no connection could be opened to 127.0.0.1:{port}" in run.stderr
    assert "Traceback" not in run.stderr


def test_a_target_that_accepts_nothing_fails_and_its_json_is_strict(tmp_path: Path) -> None:
    """A report of 401s exited 0, with NaN latencies (not JSON) in --json."""
    with ingest_target(tmp_path) as url:
        run = bench_status(
            "--target",
            url,
            "--header",
            "authorization: Bearer not_a_key_0123456789",  # replaces the default, any case
            "--duration",
            "0.5",
            "--connections",
            "1",
            "--json",
        )
    assert run.returncode == 1
    assert "target: no request was accepted {401:" in run.stderr
    [row] = json.loads(run.stdout, parse_constant=pytest.fail)["scenarios"]
    assert row["ack_p50_ms"] is None and set(row["statuses"]) == {"401"}
    assert row["errors"] == 0


def test_sigterm_stops_the_bench_and_every_process_it_started() -> None:
    """SIGTERM (a CI cancel, timeout(1)) left the server and the receiver running."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "logstack.bench", "--scenario", "batch-100", "--duration", "20"],
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith("  batch-100") and "lines/s" in line:  # server, receiver up
            break
    children = process_tree(proc.pid)[1:]
    assert len(children) >= 2
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    assert "terminated; its processes are stopped" in proc.stderr.read()
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or _zombie(pid), pid


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True
