"""``benchmarks/hot_path_instructions.py``: each step's workload runs on the bench's bodies,
and step names are checked before valgrind is started."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).parents[2] / "benchmarks" / "hot_path_instructions.py"


LoadScript = Callable[[str], ModuleType]


@pytest.mark.parametrize("step", ["mask", "validate", "wal", "read", "delivery", "receiver"])
def test_each_step_runs_its_workload(step: str, load_script: LoadScript) -> None:
    module = load_script("hot_path_instructions")
    assert step in module.STEPS
    module.workload(step, 1)  # asserts inside: the bodies take the validation fast path


def test_timed_steps_report_a_time_per_entry_and_leave_no_backlog_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, load_script: LoadScript
) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    module = load_script("hot_path_instructions")
    module.tempfile.tempdir = None  # take TMPDIR from the environment again
    try:
        per_entry = module.workload("read", 1, timed=True)
    finally:
        module.tempfile.tempdir = None
    assert 0 < per_entry < 0.01  # seconds per entry: well under 10 ms on any machine
    assert list(tmp_path.iterdir()) == []


def test_unknown_steps_are_refused_with_the_list_of_steps() -> None:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "deliveri"], capture_output=True, text=True, check=False
    )
    assert out.returncode == 2
    assert "unknown step(s): deliveri" in out.stderr and "receiver" in out.stderr
