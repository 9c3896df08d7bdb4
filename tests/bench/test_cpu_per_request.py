"""``benchmarks/cpu_per_request.py``: real server runs, one line of figures each, the A/B
summary, and a run that could not keep up with its rate flagged as saturated."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).parents[2]
RUN_LINE = re.compile(r"cpu/request +([0-9.]+) ms +requests +([0-9,]+) +ack p50")


def run(run_script: Callable[..., Any], *args: str) -> str:
    out = run_script("cpu_per_request", *args, timeout=180)
    assert out.returncode == 0, out.stderr
    stdout: str = out.stdout
    return stdout


def test_an_ab_run_measures_each_tree_and_compares_them(run_script: Callable[..., Any]) -> None:
    tree = str(ROOT)
    args = ("--rate", "40", "--duration", "1.5", "--pairs", "1", "--code", tree, "--code", tree)
    out = run(run_script, *args)
    runs = RUN_LINE.findall(out)
    assert len(runs) == 2, out
    for cpu_ms, requests in runs:
        assert 0 < float(cpu_ms) < 1000
        assert int(requests.replace(",", "")) >= 40  # 40/s for 1.5 s, all answered
    assert "SATURATED" not in out and "NOT ALL DELIVERED" not in out
    assert out.count("median cpu/request") == 2
    assert re.search(r"second/first per pair: [0-9.]+ \(median [0-9.]+; lower in [01] of 1\)", out)


def test_a_rate_beyond_the_server_is_flagged(run_script: Callable[..., Any]) -> None:
    out = run(run_script, "--rate", "100000", "--duration", "1")
    assert len(RUN_LINE.findall(out)) == 1, out
    assert "SATURATED: lower --rate" in out


def test_nonsense_arguments_are_refused(run_script: Callable[..., Any]) -> None:
    out = run_script("cpu_per_request", "--pairs", "0")
    assert out.returncode == 2
    assert "--pairs must be at least 1" in out.stderr
