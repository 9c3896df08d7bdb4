"""``python -m logstack check-config`` and ``stages list`` as real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from logstack import _cli
from logstack._config import DEFAULT_PIPELINE

REPO = Path(__file__).resolve().parents[2]
SHIPPED_CONFIG = REPO / "config.yaml"
SECRET = "logstack_secret_0123456789abcdef"


def logstack(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LOGSTACK_")}
    return subprocess.run(
        [sys.executable, "-m", "logstack", *args],
        cwd=cwd,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_shipped_config_passes(tmp_path: Path) -> None:
    result = logstack("check-config", str(SHIPPED_CONFIG), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "config OK" in result.stdout
    assert "api keys: 2 (2 active)" in result.stdout
    assert "workers: 1" in result.stdout
    assert "pipeline: " + " -> ".join(DEFAULT_PIPELINE) in result.stdout
    assert result.stderr == ""
    # Nothing was created: check-config only reads.
    assert list(tmp_path.iterdir()) == []


def test_warnings_are_printed_but_the_config_passes(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
security:
  api_keys:
    "{SECRET}": {{name: billing}}
masking:
  overrides:
    biling: {{keys: [iban]}}
""",
    )
    result = logstack("check-config", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "config OK" in result.stdout
    assert "  warning: masking.overrides.biling: no API key is named 'biling'" in result.stdout


def test_config_option_and_environment_variable(tmp_path: Path) -> None:
    by_option = logstack("check-config", "--config", str(SHIPPED_CONFIG), cwd=tmp_path)
    assert by_option.returncode == 0, by_option.stderr
    by_env = logstack("check-config", cwd=tmp_path, LOGSTACK_CONFIG=str(SHIPPED_CONFIG))
    assert by_env.returncode == 0, by_env.stderr
    assert "api keys: 2 (2 active)" in by_env.stdout
    # It names the file it read (it said "(defaults)" for one from $LOGSTACK_CONFIG).
    assert f"config OK: {SHIPPED_CONFIG}" in by_env.stdout


def test_two_files_at_once_are_refused(tmp_path: Path) -> None:
    """``check-config --config A B`` checked B and said nothing of A."""
    other = write(tmp_path, "server: {port: 8001}\n")
    both = logstack("check-config", "--config", str(SHIPPED_CONFIG), str(other), cwd=tmp_path)
    assert both.returncode == 2
    assert "two files given" in both.stderr and str(other) in both.stderr


def test_importing_logstack_leaves_other_programs_signals_alone(tmp_path: Path) -> None:
    """``logstack serve`` ignores SIGHUP from the package's first lines while it starts;
    ``python -m myapp serve``, whose package imports ``logstack``, was taken for it (its
    ``argv[0]`` is ``-m`` too) and lost SIGHUP, it and every program it started."""
    app = tmp_path / "myapp"
    app.mkdir()
    (app / "__init__.py").write_text("import logstack\n")
    (app / "__main__.py").write_text(
        "import signal\nprint(signal.getsignal(signal.SIGHUP) == signal.SIG_DFL)\n"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LOGSTACK_")}
    clean["PYTHONPATH"] = os.pathsep.join([str(tmp_path), clean.get("PYTHONPATH", "")])
    for args in (["-m", "myapp", "serve"], ["-m", "myapp", "run"]):
        result = subprocess.run(
            [sys.executable, *args],
            cwd=tmp_path,
            env=clean,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.stdout.strip() == "True", (args, result.stdout, result.stderr)


def test_a_reader_that_goes_away_ends_the_output_quietly(tmp_path: Path) -> None:
    """``logstack stages list | head -1`` ended with a ``BrokenPipeError`` traceback."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LOGSTACK_")}
    child = subprocess.Popen(
        [sys.executable, "-m", "logstack", "stages", "list", "--json"],
        cwd=tmp_path,
        env=clean,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert child.stdout is not None and child.stderr is not None
    child.stdout.close()  # before it writes: its first write finds no reader
    stderr = child.stderr.read().decode()
    assert child.wait(timeout=60) == 1
    assert "Traceback" not in stderr, stderr


def test_defaults_without_a_file(tmp_path: Path) -> None:
    result = logstack("check-config", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "(defaults)" in result.stdout


def test_bad_config_exits_2_naming_the_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        f"""
server:
  prot: 8000
wal:
  segment_max_bytes: 12
security:
  api_keys:
    "{SECRET}":
      name: "has spaces"
""",
    )
    result = logstack("check-config", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "server.prot: unknown key" in result.stderr
    assert "wal.segment_max_bytes" in result.stderr
    assert "security.api_keys.<token" in result.stderr
    assert SECRET not in result.stderr
    assert "Traceback" not in result.stderr


def test_environment_override_error_names_the_variable(tmp_path: Path) -> None:
    result = logstack(
        "check-config", str(SHIPPED_CONFIG), cwd=tmp_path, LOGSTACK_LOKI_TIMEOUT_S="soon"
    )
    assert result.returncode == 2
    assert "loki.timeout_s" in result.stderr
    assert "LOGSTACK_LOKI_TIMEOUT_S" in result.stderr


def test_missing_file_exits_2(tmp_path: Path) -> None:
    result = logstack("check-config", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert result.returncode == 2
    assert "no such file" in result.stderr


def test_bad_pipeline_exits_2_listing_every_problem(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
pipeline:
  - type: auth
  - type: acme_nope
  - type: mask
    options: {patern: "x"}
  - type: auth
""",
    )
    result = logstack("check-config", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert "pipeline[1] (acme_nope): unknown stage type 'acme_nope'" in result.stderr
    assert "pipeline[2] (mask): unknown field 'patern'" in result.stderr
    assert "pipeline[3] (auth): duplicate stage name 'auth'" in result.stderr
    assert "pipeline: the built-in stages must each be there once" in result.stderr
    assert "(missing: validate, wal_append, batch, forward_loki; listed more than once: auth)" in (
        result.stderr
    )
    assert "Traceback" not in result.stderr


def test_a_settings_problem_does_not_hide_the_pipeline_problems(tmp_path: Path) -> None:
    """A plugin author's bad timeout once hid the misspelt stage until the timeout was fixed."""
    path = write(
        tmp_path,
        """
loki:
  timeout_s: -1
pipeline:
  - auth
  - mask
  - {type: acme_dorp}
  - validate
  - wal_append
  - batch
  - forward_loki
""",
    )
    for command in (["check-config", str(path)], ["serve", "--config", str(path)]):
        result = logstack(*command, cwd=tmp_path)
        assert result.returncode == 2
        assert "loki.timeout_s: Input should be greater than 0" in result.stderr
        assert "pipeline[2] (acme_dorp): unknown stage type 'acme_dorp'" in result.stderr
        assert "Traceback" not in result.stderr


def test_stages_list_shows_the_builtins(tmp_path: Path) -> None:
    result = logstack("stages", "list", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "DISTRIBUTION", "VERSION", "SUMMARY"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    for name in DEFAULT_PIPELINE:
        assert rows[name][1] == "logstack", rows[name]
        assert rows[name][2] == "0.1.0"
        assert "ERROR" not in rows[name][3:]


def test_stages_list_json(tmp_path: Path) -> None:
    result = logstack("stages", "list", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    for name in DEFAULT_PIPELINE:
        assert rows[name]["distribution"] == "logstack"
        assert rows[name]["summary"]
        assert isinstance(rows[name]["options"], dict)
        assert "error" not in rows[name]


def test_stages_list_rows_without_summary_or_with_errors(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [
        {"name": "acme_quiet", "distribution": "logstack-acme", "version": "1.0", "summary": ""},
        {"name": "acme_bad", "distribution": "logstack-acme", "version": "1.0", "error": "boom"},
        {"name": "?", "error": "logstack-b[acme_dup]: stage name 'acme_dup' is already ..."},
    ]
    monkeypatch.setattr(_cli, "describe_stages", lambda: rows)
    assert _cli.main(["stages", "list"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["acme_quiet", "logstack-acme", "1.0"]  # no "ERROR: None"
    assert out[2].split()[3:] == ["ERROR:", "boom"]
    assert out[3].split()[:3] == ["?", "?", "?"]
    assert "ERROR: logstack-b[acme_dup]" in out[3]


def test_serve_runtime_tuning() -> None:
    """What ``logstack serve`` sets before it starts: a young-generation threshold of
    20,000 with start-up objects frozen, and a 0.5 ms GIL switch interval (in a subprocess:
    both are process-wide)."""
    probe = (
        "import gc, sys; from logstack import _cli; _cli._tune_runtime(); "
        "print(gc.get_threshold()[0], gc.get_freeze_count() > 0, sys.getswitchinterval())"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    threshold, frozen, interval = out.stdout.split()
    assert int(threshold) == 20_000 and frozen == "True"
    assert float(interval) == _cli.GIL_SWITCH_INTERVAL_S < sys.getswitchinterval()


def test_the_config_file_is_named_also_when_it_comes_from_the_environment() -> None:
    """Started with ``$LOGSTACK_CONFIG``, the admin status showed ``config.path: null`` and
    the reload log ``"path": "None"``."""
    assert _cli.config_path(None, {"LOGSTACK_CONFIG": "/etc/logstack.yaml"}) == "/etc/logstack.yaml"
    assert _cli.config_path("given.yaml", {"LOGSTACK_CONFIG": "/etc/logstack.yaml"}) == "given.yaml"
    assert _cli.config_path(None, {}) is None
    assert _cli.config_path(None, {"LOGSTACK_CONFIG": ""}) is None
