"""``benchmarks/server_instructions.py``: a real count under callgrind, the dump's total read
right, arguments refused with a reason; and what it relies on: the bare endpoint's plain
ASGI variant answers as the Quart one does, and a child process runs under its launcher."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from logstack.bench._cli import _CeilingProcess, body_factory
from logstack.testing._process import LokiReceiverProcess

COUNT_LINE = re.compile(
    r"asgi: ([0-9.]+) M instructions per 100-line request \(([0-9,]+) requests, 4 connections"
)


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_a_count_under_callgrind_gives_instructions_per_request(
    run_script: Callable[..., Any],
) -> None:
    args = ("--target", "asgi", "--connections", "4", "--warmup", "1", "--duration", "2")
    out = run_script("server_instructions", *args, timeout=600)
    assert out.returncode == 0, out.stderr
    found = COUNT_LINE.search(out.stdout)
    assert found is not None, out.stdout
    # A plain ASGI function under Hypercorn: ~3 M per 100-line request on x86-64 (2026-11-27).
    assert 0.5 < float(found[1]) < 30
    assert int(found[2].replace(",", "")) > 0


def test_the_total_comes_from_the_dumps_summary_line(
    load_script: Callable[[str], ModuleType],
) -> None:
    module = load_script("server_instructions")
    dump = "version: 1\ncreator: callgrind-3.19.0\nevents: Ir\nsummary: 2336920837\ntotals: 1\n"
    assert module.summary_instructions(dump) == 2_336_920_837
    with pytest.raises(ValueError, match="summary"):
        module.summary_instructions("events: Ir\ntotals: 5\n")
    launcher = module.valgrind_launcher(Path("/tmp/x/callgrind.out"))
    assert launcher == ["valgrind", "--tool=callgrind", "--callgrind-out-file=/tmp/x/callgrind.out"]


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["--target", "nginx"], "invalid choice: 'nginx'"),
        (["--target", "ceiling", "--no-loki"], "--no-loki applies to --target logstack only"),
        (["--connections", "0"], "--connections must be at least 1"),
        (["--duration", "0"], "--duration and --warmup above 0"),
    ],
)
def test_bad_arguments_are_refused_with_the_reason(
    run_script: Callable[..., Any], args: list[str], reason: str
) -> None:
    out = run_script("server_instructions", *args)
    assert out.returncode == 2
    assert reason in out.stderr


@pytest.mark.parametrize("plain_asgi", [False, True])
def test_the_bare_endpoint_answers_alike_with_and_without_quart(
    tmp_path: Path, plain_asgi: bool
) -> None:
    ceiling = _CeilingProcess(tmp_path)
    ceiling.plain_asgi = plain_asgi
    url = ceiling.start()
    try:
        answer = httpx.post(
            url + "/v1/logs:ingest",
            content=body_factory(3)(7),
            headers={"Content-Type": "application/json"},
        )
    finally:
        ceiling.stop()
    assert answer.status_code == 202
    assert answer.headers["content-type"] == "application/json"
    assert json.loads(answer.content) == {
        "message": "Logs accepted for processing",
        "entries_accepted": 3,
    }


def test_a_child_runs_under_its_launcher(tmp_path: Path) -> None:
    child = LokiReceiverProcess(tmp_path)
    child.launcher = ["nice", "-n", "7"]
    child.start()
    try:
        assert child.proc is not None
        stat = Path(f"/proc/{child.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        assert int(stat[16]) == 7  # field 19 of stat: the nice value
    finally:
        child.stop()
