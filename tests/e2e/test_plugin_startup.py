"""Broken plugins on the real start-up path: ``logstack serve`` and ``logstack check-config``.

Each throwaway plugin is a real distribution, found the way pip-installed ones are: a
``*.dist-info`` directory (``METADATA`` + ``entry_points.txt``) and its module in a
directory on ``PYTHONPATH``. Nothing is installed into the shared environment.

Every case must fail start-up with exit status 2 and ONE clear message naming the culprit
as ``distribution[name]``, before anything is opened (no WAL directory, no port).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from logstack._config import DEFAULT_PIPELINE
from logstack.testing import make_test_config

GOOD_PLUGIN = '''
from pydantic import Field

from logstack import Envelope, Stage, StageConfig


class TmpConfig(StageConfig):
    keep_last: int = Field(4, ge=0, description="Characters kept.")


class TmpStage(Stage):
    """A well-behaved throwaway stage."""

    Config = TmpConfig

    def process(self, envelope: Envelope) -> None:
        pass
'''

BAD_CONFIG_PLUGIN = '''
from logstack import Envelope, Stage


class BadConfigStage(Stage):
    """Declares its options as a plain dict instead of a StageConfig."""

    Config = dict

    def process(self, envelope: Envelope) -> None:
        pass
'''

RAISES_AT_IMPORT_PLUGIN = """
import os

raise RuntimeError("acme licence server unreachable")
"""

MISSING_DEPENDENCY_PLUGIN = """
import acme_iban_tables_not_installed
"""

RAISES_IN_INIT_PLUGIN = '''
from logstack import Envelope, Stage


class NeedsAFileStage(Stage):
    """Opens a file its options do not name."""

    def __init__(self, config, context):
        super().__init__(config, context)
        raise FileNotFoundError("/etc/acme/patterns.txt")

    def process(self, envelope: Envelope) -> None:
        pass
'''


CRASHES_WHILE_RUNNING_PLUGIN = '''
import trio

from logstack import Stage


class CrashingStage(Stage):
    """Passes requests on until its bug bites."""

    async def run(self, inbox, outbox):
        await trio.sleep(0.2)
        raise RuntimeError("acme bug in run")
'''


@dataclass
class Site:
    """A directory on ``PYTHONPATH`` holding throwaway distributions."""

    path: Path

    def add(self, dist: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
        info = self.path / f"{dist.replace('-', '_')}-0.0.1.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.0.1\n", encoding="utf-8"
        )
        lines = [f"{name} = {target}" for name, target in entry_points.items()]
        (info / "entry_points.txt").write_text(
            "[logstack.stages]\n" + "\n".join(lines) + "\n", encoding="utf-8"
        )
        for module, source in modules.items():
            (self.path / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")


@pytest.fixture
def site(tmp_path: Path) -> Site:
    path = tmp_path / "site"
    path.mkdir()
    return Site(path)


def pipeline_with(*extra: dict[str, Any], at: int = 2) -> list[dict[str, Any]]:
    stages: list[dict[str, Any]] = [{"type": name} for name in DEFAULT_PIPELINE]
    stages[at:at] = list(extra)
    return stages


def write_config(tmp_path: Path, pipeline: list[dict[str, Any]] | None) -> Path:
    sections: dict[str, Any] = {} if pipeline is None else {"pipeline": pipeline}
    config = make_test_config(tmp_path, "http://127.0.0.1:9", **sections)
    config["server"]["bound_ports_file"] = str(tmp_path / "port")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def run(site: Site, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOGSTACK_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site.path), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "logstack", *args],
        cwd=site.path.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def start_up_problem(site: Site, config: Path, *, check_config: bool = True) -> str:
    """Run ``serve`` (and ``check-config``): both must fail with the same single problem."""
    commands: list[tuple[str, ...]] = [("serve", "--config", str(config))]
    if check_config:
        commands.append(("check-config", str(config)))
    problems = []
    for command in commands:
        result = run(site, *command)
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr
        # The service's own JSON log lines (``serve`` opens the WAL before it instantiates
        # the stages) are not the message.
        lines = [line for line in result.stderr.splitlines() if not line.startswith("{")]
        assert lines[0] == "logstack: invalid configuration:", result.stderr
        assert len(lines) == 2, f"not one problem: {result.stderr}"
        assert lines[1].startswith("  - ")
        problems.append(lines[1][4:])
    assert len(set(problems)) == 1, problems
    tmp_path = config.parent
    assert not (tmp_path / "port").exists()
    return problems[0]


def test_a_good_plugin_passes_check_config(tmp_path: Path, site: Site) -> None:
    """The control case: the same throwaway mechanism with a correct plugin starts."""
    site.add("logstack-acme-tmp", {"acme_tmp": "lstmp_good:TmpStage"}, {"lstmp_good": GOOD_PLUGIN})
    config = write_config(tmp_path, pipeline_with({"type": "acme_tmp"}))
    result = run(site, "check-config", str(config))
    assert result.returncode == 0, result.stderr
    assert "pipeline: auth -> mask -> acme_tmp -> validate" in result.stdout
    listing = run(site, "stages", "list")
    assert "acme_tmp" in listing.stdout
    assert "logstack-acme-tmp" in listing.stdout


def test_bad_options_for_a_plugin(tmp_path: Path, site: Site) -> None:
    site.add("logstack-acme-tmp", {"acme_tmp": "lstmp_good:TmpStage"}, {"lstmp_good": GOOD_PLUGIN})
    config = write_config(tmp_path, pipeline_with({"type": "acme_tmp", "options": {"keep": 2}}))
    assert start_up_problem(site, config) == "pipeline[2] (acme_tmp): unknown field 'keep'"
    assert not (tmp_path / "wal").exists()  # failed before the WAL was opened


def test_a_plugin_whose_config_is_not_a_stage_config(tmp_path: Path, site: Site) -> None:
    site.add(
        "logstack-acme-bad",
        {"acme_bad": "lstmp_bad:BadConfigStage"},
        {"lstmp_bad": BAD_CONFIG_PLUGIN},
    )
    config = write_config(tmp_path, pipeline_with({"type": "acme_bad"}))
    assert start_up_problem(site, config) == (
        "pipeline[2] (acme_bad): logstack-acme-bad[acme_bad]: "
        "Config must be a subclass of logstack.StageConfig"
    )
    assert not (tmp_path / "wal").exists()


def test_two_distributions_registering_one_name(tmp_path: Path, site: Site) -> None:
    modules = {"lstmp_good": GOOD_PLUGIN}
    site.add("logstack-acme-one", {"acme_dup": "lstmp_good:TmpStage"}, modules)
    site.add("logstack-acme-two", {"acme_dup": "lstmp_good:TmpStage"}, {})
    config = write_config(tmp_path, pipeline_with({"type": "acme_dup"}))
    problem = start_up_problem(site, config)
    assert problem == (
        "stage name 'acme_dup' is registered 2 times: "
        "logstack-acme-one[acme_dup] (lstmp_good:TmpStage), "
        "logstack-acme-two[acme_dup] (lstmp_good:TmpStage); "
        "uninstall all but one of these distributions (or have one rename its stage)"
    )
    # Also when the pipeline does not use the name: a clash is never silently resolved.
    assert start_up_problem(site, write_config(tmp_path, None)) == problem
    assert not (tmp_path / "wal").exists()


def test_a_plugin_taking_a_built_in_name(tmp_path: Path, site: Site) -> None:
    site.add("logstack-evil", {"mask": "lstmp_good:TmpStage"}, {"lstmp_good": GOOD_PLUGIN})
    problem = start_up_problem(site, write_config(tmp_path, None))
    assert problem.startswith("stage name 'mask' is registered 2 times: ")
    assert "logstack[mask] (stages.mask:MaskStage)" in problem
    assert "logstack-evil[mask] (lstmp_good:TmpStage)" in problem


def test_a_plugin_that_fails_to_import(tmp_path: Path, site: Site) -> None:
    site.add(
        "logstack-acme-broken",
        {"acme_broken": "lstmp_broken:Stage"},
        {"lstmp_broken": RAISES_AT_IMPORT_PLUGIN},
    )
    config = write_config(tmp_path, pipeline_with({"type": "acme_broken"}))
    problem = start_up_problem(site, config)
    module = site.path / "lstmp_broken.py"
    assert problem == (
        "pipeline[2] (acme_broken): logstack-acme-broken[acme_broken]: cannot import "
        "lstmp_broken:Stage: RuntimeError: acme licence server unreachable "
        f"(at {module}:4)"
    )
    assert not (tmp_path / "wal").exists()
    # Installed but not in the pipeline: never imported, start-up is not affected.
    result = run(site, "check-config", str(write_config(tmp_path, None)))
    assert result.returncode == 0, result.stderr


def test_a_plugin_missing_a_dependency(tmp_path: Path, site: Site) -> None:
    site.add(
        "logstack-acme-deps",
        {"acme_deps": "lstmp_deps:Stage"},
        {"lstmp_deps": MISSING_DEPENDENCY_PLUGIN},
    )
    config = write_config(tmp_path, pipeline_with({"type": "acme_deps"}))
    problem = start_up_problem(site, config)
    assert problem.startswith(
        "pipeline[2] (acme_deps): logstack-acme-deps[acme_deps]: cannot import lstmp_deps:Stage: "
        "ModuleNotFoundError: No module named 'acme_iban_tables_not_installed'"
    )


def test_a_plugin_whose_constructor_raises(tmp_path: Path, site: Site) -> None:
    """Only ``serve`` instantiates stages (``check-config`` opens nothing), and it fails
    the same way: one message naming the culprit."""
    site.add(
        "logstack-acme-init",
        {"acme_init": "lstmp_init:NeedsAFileStage"},
        {"lstmp_init": RAISES_IN_INIT_PLUGIN},
    )
    config = write_config(tmp_path, pipeline_with({"type": "acme_init"}))
    assert start_up_problem(site, config, check_config=False) == (
        "pipeline[2] (acme_init): logstack-acme-init[acme_init]: failed to start: "
        "FileNotFoundError: /etc/acme/patterns.txt"
    )
    assert not (tmp_path / "wal").exists()  # stages are built before the WAL is opened


def test_an_unusable_wal_root_is_one_message(tmp_path: Path, site: Site) -> None:
    """It was a screen of traceback (FileExistsError from mkdir), exit status 1."""
    config = write_config(tmp_path, None)
    settings = yaml.safe_load(config.read_text())
    (tmp_path / "a-file").write_text("not a directory")
    settings["wal"]["root_path"] = str(tmp_path / "a-file")
    config.write_text(yaml.safe_dump(settings))
    problem = start_up_problem(site, config, check_config=False)
    assert problem.startswith(f"wal.root_path: cannot open the WAL in {tmp_path / 'a-file'}: ")
    assert "File exists" in problem


def test_a_stage_that_crashes_is_said_in_one_json_log_line(tmp_path: Path, site: Site) -> None:
    """A bug stops the service (exit status 1, for the supervisor or systemd to restart
    it), said like every other log line: JSON, with the traceback inside."""
    site.add(
        "logstack-acme-crash",
        {"acme_crash": "lstmp_crash:CrashingStage"},
        {"lstmp_crash": CRASHES_WHILE_RUNNING_PLUGIN},
    )
    result = run(
        site,
        "serve",
        "--config",
        str(write_config(tmp_path, pipeline_with({"type": "acme_crash"}))),
    )
    assert result.returncode == 1, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines()]  # every line is JSON
    [crash] = [line for line in lines if line["msg"] == "stopped by an unexpected error"]
    assert crash["level"] == "ERROR"
    assert "RuntimeError: acme bug in run" in json.dumps(crash)
