"""Fixtures for the tests of ``benchmarks/``: the scripts there are files, not a package."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"

RunScript = Callable[..., "subprocess.CompletedProcess[str]"]


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def load_script() -> Callable[[str], ModuleType]:
    """Import ``benchmarks/<name>.py`` as a module, afresh."""
    return _load


def _run(name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{name}.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture
def run_script() -> RunScript:
    """Run ``benchmarks/<name>.py`` with arguments (``timeout=`` seconds, 300 by default) and
    return the finished process, its output captured as text."""
    return _run
