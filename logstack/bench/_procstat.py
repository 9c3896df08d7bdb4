"""Per-process CPU and memory from /proc (Linux), for the benchmark report."""

from __future__ import annotations

import os
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int, field: str = "VmRSS") -> float:
    """Resident memory (``VmRSS``) or its peak (``VmHWM``) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (``logstack serve --workers N`` is a supervisor with
    worker children), whichever thread started them."""
    found = [pid]
    for parent in found:
        try:
            tasks = list(Path(f"/proc/{parent}/task").iterdir())
        except FileNotFoundError:
            continue
        for task in tasks:
            try:
                found += [int(child) for child in (task / "children").read_text().split()]
            except FileNotFoundError:
                continue
    return found


def tree_cpu_seconds(pid: int) -> float:
    """CPU time of ``pid`` and its live descendants (including what reaped children used):
    user, system, and the children's user and system fields of ``/proc/<pid>/stat``."""
    total = 0.0
    for member in process_tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += sum(int(f) for f in fields[11:15]) / _TICKS
    return total


def tree_rss_mib(pid: int, field: str = "VmHWM") -> float:
    """Sum over ``pid`` and its descendants of ``field`` (peak RSS by default), in MiB."""
    total = 0.0
    for member in process_tree(pid):
        try:
            total += rss_mib(member, field)
        except FileNotFoundError:
            continue
    return total
