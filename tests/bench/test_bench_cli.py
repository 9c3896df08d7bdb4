"""``python -m logstack.bench`` runs end to end (short), and its report is what it says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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


def test_short_run_reports_every_figure_and_delivers_everything() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "logstack.bench",
            "--scenario",
            "batch-100",
            "--scenario",
            "workers-2",
            "--duration",
            "1",
            "--pairs",
            "1",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    report = json.loads(out[out.index("{\n") :])
    rows = {row["scenario"]: row for row in report["scenarios"]}
    assert set(rows) == {"batch-100", "workers-2"}
    for row in rows.values():
        assert row["all_delivered"] is True
        assert row["5xx"] == 0 and row["lines_per_s"] > 0
        assert row["cpu_s_per_100k_lines"] > 0 and row["peak_rss_mib"] > 0
        assert row["receiver_cpu_s_per_100k_lines"] > 0
        assert row["ack_p99_ms"] >= row["ack_p50_ms"] > 0
    assert rows["workers-2"]["workers"] == 2
    assert 0 < rows["batch-100"]["ceiling_ratio_median"] < 1.5
    assert rows["workers-2"]["over_one_worker_median"] > 0


def test_target_mode_drives_any_endpoint_and_claims_no_server_figures(tmp_path: Path) -> None:
    server = LogstackProcess(tmp_path, make_test_config(tmp_path, "http://127.0.0.1:9"))
    server.start()
    try:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "logstack.bench",
                "--target",
                server.url + "/v1/logs:ingest",
                "--lines",
                "10",
                "--duration",
                "1",
                "--connections",
                "2",
                "--json",
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        ).stdout
    finally:
        server.stop()
    [row] = json.loads(out[out.index("{\n") :])["scenarios"]
    assert row["scenario"] == "target" and row["lines_per_request"] == 10
    # Only 202s: the test config's key allows 1,000 requests/s, more than two connections send.
    assert row["lines_per_s"] > 0 and set(row["statuses"]) == {"202"}
    # It cannot see the target's processes or its Loki: those figures are absent, not zero.
    assert row["cpu_s_per_100k_lines"] is None and row["peak_rss_mib"] is None
    assert row["all_delivered"] is None
