"""Run LogStack (or the Loki receiver) as a real child process, for black-box tests.

Ports are never guessed: the child binds port 0 and writes the bound address to a file,
which ``start`` waits for. ``kill`` is SIGKILL, for crash tests; ``stop`` is SIGTERM with a
deadline, the way an orchestrator stops the service.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

TEST_TOKEN = "test_token_payments_0123456789"
TEST_TOKEN_2 = "test_token_users_0123456789ab"
TEST_ADMIN_TOKEN = "test_admin_token_0123456789abcd"


def deep_merge(base: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def make_test_config(workdir: Path, loki_url: str, **sections: Any) -> dict[str, Any]:
    """A config for tests: two keys, an admin token, the WAL under ``workdir``, fast batches.

    ``sections`` are merged in (``security={...}``, ``pipeline=[...]``): mappings key by
    key, anything else (a ``pipeline`` list) replaces the default.
    """
    base: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0, "shutdown_grace_s": 5},
        "security": {
            "rate_limit_rps": 1000,
            "rate_limit_burst": 1000,
            "admin_token": TEST_ADMIN_TOKEN,
            "api_keys": {
                TEST_TOKEN: {"name": "payments-api"},
                TEST_TOKEN_2: {"name": "user-service"},
            },
        },
        "wal": {"root_path": str(workdir / "wal")},
        "loki": {
            "base_url": loki_url,
            "batch_max_wait_s": 0.2,
            "backoff_min_s": 0.1,
            "backoff_max_s": 1.0,
            "ready_probe_interval_s": 1.0,
        },
    }
    return deep_merge(base, sections)


def inherited_environment() -> dict[str, str]:
    """This process's environment without its ``LOGSTACK_*`` variables: those are config
    overrides, and a child started from a config dict (by a test or the bench) must run
    that config, not whatever the shell exported (``LOGSTACK_SECURITY_RATE_LIMIT_RPS=100``
    once made the bench measure a rate limit). A child's own ``env`` still sets them."""
    return {k: v for k, v in os.environ.items() if not k.startswith("LOGSTACK_")}


class ChildProcess:
    """A child that announces its bound address in a file once it listens."""

    name = "child"

    def __init__(self, workdir: Path, env: Mapping[str, str] | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""
        self.starts = 0
        self.launcher: list[str] = []
        """A command the child runs under (``valgrind --tool=callgrind``, say)."""

    @property
    def port_file(self) -> Path:
        return self.workdir / f"{self.name}.port"

    @property
    def log_file(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def command(self) -> Sequence[str]:
        raise NotImplementedError

    def start(self, timeout: float = 30.0) -> str:
        """Start the child and wait until it listens; returns its base URL."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"{self.name} is already running")
        self.port_file.unlink(missing_ok=True)
        env = {**inherited_environment(), **self.env}
        env.setdefault("PYTHONUNBUFFERED", "1")
        with self.log_file.open("ab") as log:
            log.write(f"--- start #{self.starts + 1} ---\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [*self.launcher, *self.command()],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.workdir,
            )
        self.starts += 1
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.port_file.exists():
                text = self.port_file.read_text().strip()
                if text:
                    first = text.splitlines()[0]
                    self.url = first if first.startswith("http") else f"http://127.0.0.1:{first}"
                    return self.url
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode} before listening:\n"
                    + self.log_tail()
                )
            time.sleep(0.02)
        self.kill()
        raise TimeoutError(f"{self.name} did not listen within {timeout}s:\n" + self.log_tail())

    def kill(self) -> None:
        """SIGKILL: no cleanup, no flush, exactly like a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not stop in time. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def __enter__(self) -> ChildProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<{type(self).__name__} {state} {self.url or '-'} starts={self.starts}>"


class LogstackProcess(ChildProcess):
    """``logstack serve`` with a config written from a dict."""

    name = "logstack"

    def __init__(
        self, workdir: Path, config: Mapping[str, Any], env: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(workdir, env)
        self.config = dict(config)

    @property
    def config_path(self) -> Path:
        return self.workdir / "config.yaml"

    def write_config(self, config: Mapping[str, Any] | None = None) -> None:
        if config is not None:
            self.config = dict(config)
        doc = deep_merge(self.config, {"server": {"bound_ports_file": str(self.port_file)}})
        self.config_path.write_text(yaml.safe_dump(doc, sort_keys=False))

    def command(self) -> Sequence[str]:
        return [sys.executable, "-m", "logstack", "serve", "--config", str(self.config_path)]

    def start(self, timeout: float = 30.0) -> str:
        self.write_config()
        return super().start(timeout)

    @property
    def wal_root(self) -> Path:
        return Path(self.config["wal"]["root_path"])


class LokiReceiverProcess(ChildProcess):
    """``python -m logstack.testing.loki`` as its own process (survives the server's crashes)."""

    name = "loki"

    def __init__(self, workdir: Path, port: int = 0, extra_args: Sequence[str] = ()) -> None:
        super().__init__(workdir)
        self.port = port
        self.extra_args = list(extra_args)

    def command(self) -> Sequence[str]:
        return [
            sys.executable,
            "-m",
            "logstack.testing.loki",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--port-file",
            str(self.port_file),
            *self.extra_args,
        ]

    def start(self, timeout: float = 30.0) -> str:
        url = super().start(timeout)
        # Restarts reuse the port so the server's configured URL stays valid.
        self.port = int(url.rsplit(":", 1)[1])
        return url
