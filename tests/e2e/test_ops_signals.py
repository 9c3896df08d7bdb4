"""Signals on a real ``logstack serve`` process: SIGHUP reloads, SIGTERM/SIGINT drain.

* SIGHUP: keys are added and removed, a rate limit changes, restart-only settings keep their
  running values (and the log says so); a bad new config keeps the old one and logs why.
* SIGTERM/SIGINT during a stream of requests: the process stops accepting, answers what is
  in flight, and exits within ``server.shutdown_grace_s``, cleanly; every request that got a
  ``202`` is delivered after a restart, none is lost. With Loki hanging, the grace period
  still bounds the stop.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from logstack.testing import open_loki_receiver
from logstack.testing._process import (
    TEST_ADMIN_TOKEN,
    TEST_TOKEN,
    TEST_TOKEN_2,
    LogstackProcess,
    make_test_config,
)

INGEST = "/v1/logs:ingest"
NEW_TOKEN = "test_token_newcomer_0123456789"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def batch(*messages: str) -> dict[str, Any]:
    return {
        "entries": [
            {
                "timestamp": "2026-01-01T00:00:00.000Z",
                "level": "INFO",
                "message": message,
                "service": "signals",
                "env": "ci",
            }
            for message in messages
        ]
    }


def log_docs(server: LogstackProcess) -> list[dict[str, Any]]:
    docs = []
    for line in server.log_text().splitlines():
        if line.startswith("{"):
            docs.append(json.loads(line))
    return docs


async def config_version(client: httpx.AsyncClient) -> int:
    response = await client.get("/v1/admin/status", headers=bearer(TEST_ADMIN_TOKEN))
    assert response.status_code == 200, response.text
    version: int = response.json()["config"]["version"]
    return version


async def wait_for_log(server: LogstackProcess, msg: str, count: int = 1) -> dict[str, Any]:
    with trio.fail_after(10):
        while True:
            found = [d for d in log_docs(server) if d["msg"] == msg]
            if len(found) >= count:
                return found[count - 1]
            await trio.sleep(0.05)


async def test_sighup_reloads_keys_and_limits_and_keeps_a_good_config(tmp_path: Path) -> None:
    async with open_loki_receiver() as rx:
        assert rx.url is not None
        config = make_test_config(tmp_path, rx.url)
        server = LogstackProcess(tmp_path, config)
        await trio.to_thread.run_sync(server.start)
        try:
            async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:

                async def post(token: str, message: str) -> int:
                    response = await client.post(INGEST, headers=bearer(token), json=batch(message))
                    return response.status_code

                assert await post(TEST_TOKEN, "before-1") == 202
                assert await post(TEST_TOKEN_2, "before-2") == 202
                assert await post(NEW_TOKEN, "before-3") == 401
                assert await config_version(client) == 1

                # Remove user-service, add a new key, throttle payments-api to a burst of 1,
                # and change a restart-only setting.
                new = json.loads(json.dumps(config))
                new["security"]["api_keys"] = {
                    TEST_TOKEN: {
                        "name": "payments-api",
                        "rate_limit_rps": 0.01,
                        "rate_limit_burst": 1,
                    },
                    NEW_TOKEN: {"name": "newcomer"},
                }
                new["wal"]["root_path"] = str(tmp_path / "elsewhere")
                server.write_config(new)
                server.signal(signal.SIGHUP)
                with trio.fail_after(10):
                    while await config_version(client) != 2:
                        await trio.sleep(0.05)
                assert await post(TEST_TOKEN_2, "removed") == 401
                assert await post(NEW_TOKEN, "added") == 202
                assert [await post(TEST_TOKEN, f"limited-{i}") for i in range(2)] == [202, 429]
                reloaded = await wait_for_log(server, "config reloaded")
                assert reloaded["keys_added"] == ["newcomer"]
                assert reloaded["keys_removed"] == ["user-service"]
                kept = await wait_for_log(
                    server,
                    "config reload: these settings need a restart; keeping their running values",
                )
                assert kept["settings"] == ["wal.root_path"]
                assert (tmp_path / "wal" / "newcomer").is_dir()  # the running WAL root
                assert not (tmp_path / "elsewhere").exists()

                # A bad config: the running one stays, the log and status say why.
                broken = json.loads(json.dumps(new))
                broken["server"]["colour"] = "red"
                broken["security"]["rate_limit_rps"] = -1
                server.write_config(broken)
                server.signal(signal.SIGHUP)
                failed = await wait_for_log(
                    server, "config reload failed; keeping the running config"
                )
                assert any("server.colour: unknown key" in p for p in failed["problems"])
                assert any("security.rate_limit_rps" in p for p in failed["problems"])
                status = await client.get("/v1/admin/status", headers=bearer(TEST_ADMIN_TOKEN))
                assert status.json()["config"]["version"] == 2
                assert status.json()["config"]["last_reload_error"] == failed["problems"]
                assert await post(NEW_TOKEN, "still-works") == 202
                assert await post(TEST_TOKEN_2, "still-removed") == 401

                # Not even YAML: same.
                server.config_path.write_text("security: {api_keys: [unclosed\n")
                server.signal(signal.SIGHUP)
                await wait_for_log(server, "config reload failed; keeping the running config", 2)
                assert await config_version(client) == 2
                assert await post(NEW_TOKEN, "after-yaml-error") == 202
                metrics = (await client.get("/metrics")).text
                assert 'logstack_config_reloads_total{result="failed"} 2.0' in metrics
                assert 'logstack_config_reloads_total{result="ok"} 1.0' in metrics
        finally:
            assert await trio.to_thread.run_sync(server.stop) == 0
        for token in (TEST_TOKEN, TEST_TOKEN_2, NEW_TOKEN, TEST_ADMIN_TOKEN):
            assert token not in server.log_text()


CONCURRENCY = 16


async def stream_until_stopped(
    url: str, acked: set[str], statuses: Counter[int], enough: trio.Event
) -> None:
    """Post one-entry batches from ``CONCURRENCY`` connections until the server is gone."""

    async def worker(n: int) -> None:
        token = TEST_TOKEN if n % 2 else TEST_TOKEN_2
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            for i in range(100_000):
                message = f"w{n}-{i}"
                try:
                    response = await client.post(INGEST, headers=bearer(token), json=batch(message))
                except httpx.TransportError:
                    return  # the listener is closed: the server stopped accepting
                statuses[response.status_code] += 1
                if response.status_code == 202:
                    acked.add(message)
                    if len(acked) >= 300:
                        enough.set()

    async with trio.open_nursery() as nursery:
        for n in range(CONCURRENCY):
            nursery.start_soon(worker, n)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_shutdown_under_load_answers_in_flight_and_loses_nothing(
    tmp_path: Path, signum: int
) -> None:
    grace = 5.0
    async with open_loki_receiver() as rx:
        assert rx.url is not None
        rx.delay_s = 0.3  # pushes are in flight when the signal comes
        server = LogstackProcess(
            tmp_path, make_test_config(tmp_path, rx.url, server={"shutdown_grace_s": grace})
        )
        await trio.to_thread.run_sync(server.start)
        acked: set[str] = set()
        statuses: Counter[int] = Counter()
        enough = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream_until_stopped, server.url, acked, statuses, enough)
            with trio.fail_after(30):
                await enough.wait()
            at_signal = len(acked)
            before = Counter(statuses)
            signalled = time.monotonic()
            server.signal(signum)
            assert server.proc is not None
            code = await trio.to_thread.run_sync(server.proc.wait)
            stop_s = time.monotonic() - signalled
        assert code == 0, server.log_tail()
        assert stop_s < grace, f"stopped after {stop_s:.1f}s"
        # In flight at the signal: answered (202 after the fsync) or refused with 503 —
        # never a 5xx of another kind, never a dropped 202.
        assert set(statuses) <= {202, 503}, statuses
        assert len(acked) >= at_signal
        after = statuses - before
        print(
            f"\n{signal.Signals(signum).name}: stopped in {stop_s:.2f}s; answered after the "
            f"signal: {dict(after)}; acknowledged in all: {len(acked)}"
        )
        docs = log_docs(server)
        assert any(d["msg"] == "shutdown requested" for d in docs)
        [stopped] = [d for d in docs if d["msg"] == "stopped"]
        assert stopped["clean"] is True
        # No lingering on idle keep-alive connections once the in-flight requests are done.
        assert stopped["stop_s"] < grace / 2, stopped

        rx.delay_s = 0
        await trio.to_thread.run_sync(server.start)
        try:
            with trio.fail_after(60):
                while not acked <= {json.loads(line)["message"] for line in rx.lines()}:
                    await trio.sleep(0.1)
        finally:
            assert await trio.to_thread.run_sync(server.stop) == 0


async def test_a_hanging_loki_cannot_stretch_the_grace_period(tmp_path: Path) -> None:
    grace = 2.0
    async with open_loki_receiver() as rx:
        assert rx.url is not None
        rx.delay_s = 60  # every push hangs
        server = LogstackProcess(
            tmp_path, make_test_config(tmp_path, rx.url, server={"shutdown_grace_s": grace})
        )
        await trio.to_thread.run_sync(server.start)
        async with httpx.AsyncClient(base_url=server.url) as client:
            for i in range(5):
                response = await client.post(
                    INGEST, headers=bearer(TEST_TOKEN), json=batch(f"h{i}")
                )
                assert response.status_code == 202
        with trio.fail_after(10):
            while rx.pushes == 0:
                await trio.sleep(0.05)
        signalled = time.monotonic()
        server.signal(signal.SIGTERM)
        assert server.proc is not None
        code = await trio.to_thread.run_sync(server.proc.wait)
        stop_s = time.monotonic() - signalled
        assert code == 0
        assert grace - 0.5 < stop_s < grace + 2.0, f"stopped after {stop_s:.1f}s"
        [stopped] = [d for d in log_docs(server) if d["msg"] == "stopped"]
        assert stopped["clean"] is False  # the deadline cancelled the hanging push
        rx.delay_s = 0
        await trio.to_thread.run_sync(server.start)
        try:
            await rx.wait_for_entries(5, timeout=30)
        finally:
            await trio.to_thread.run_sync(server.stop)


async def test_a_second_signal_stops_at_once(tmp_path: Path) -> None:
    grace = 20.0
    async with open_loki_receiver() as rx:
        assert rx.url is not None
        rx.delay_s = 60  # a push hangs: the graceful stop would take the whole grace period
        server = LogstackProcess(
            tmp_path, make_test_config(tmp_path, rx.url, server={"shutdown_grace_s": grace})
        )
        await trio.to_thread.run_sync(server.start)
        async with httpx.AsyncClient(base_url=server.url) as client:
            response = await client.post(INGEST, headers=bearer(TEST_TOKEN), json=batch("x"))
            assert response.status_code == 202
        with trio.fail_after(10):
            while rx.pushes == 0:
                await trio.sleep(0.05)
        signalled = time.monotonic()
        server.signal(signal.SIGTERM)
        await wait_for_log(server, "shutdown requested")
        server.signal(signal.SIGINT)
        assert server.proc is not None
        code = await trio.to_thread.run_sync(server.proc.wait)
        assert code == 0
        assert time.monotonic() - signalled < 5
        docs = log_docs(server)
        assert any(d["msg"] == "second stop request: cancelling the drain" for d in docs)
        [stopped] = [d for d in docs if d["msg"] == "stopped"]
        assert stopped["clean"] is False


class ConsoleScriptProcess(LogstackProcess):
    """``logstack serve`` through the installed console script, not ``python -m``."""

    def command(self) -> list[str]:
        script = Path(sys.executable).with_name("logstack")
        assert script.exists(), f"the console script is installed beside {sys.executable}"
        return [str(script), "serve", "--config", str(self.config_path)]


@pytest.mark.parametrize("kind", [ConsoleScriptProcess, LogstackProcess])
def test_sighups_while_the_process_starts_do_not_kill_it(
    tmp_path: Path, kind: type[LogstackProcess]
) -> None:
    """SIGHUP's default action killed ``logstack serve`` during its ~0.5 s of imports (the
    console script before any guard; ``python -m`` once the package had loaded): a
    ``systemctl reload`` right after a restart stopped the service without a log line."""
    config = make_test_config(tmp_path, "http://127.0.0.1:9")  # no Loki: not needed here
    server = kind(tmp_path / "server", config)
    stop = threading.Event()

    def importing(pid: int) -> bool:
        """The process is loading LogStack's dependencies (past the interpreter's own start,
        which no Python code can guard)."""
        try:
            maps = Path(f"/proc/{pid}/maps").read_text()
        except OSError:
            return False
        return "msgspec" in maps or "pydantic_core" in maps

    def hang_up_repeatedly() -> None:
        while not stop.wait(0.005):
            if server.proc is not None and importing(server.proc.pid):
                break
        while not stop.wait(0.02):
            if server.proc is not None and server.proc.poll() is None:
                server.proc.send_signal(signal.SIGHUP)

    sender = threading.Thread(target=hang_up_repeatedly)
    sender.start()
    try:
        url = server.start()
        time.sleep(0.3)  # SIGHUPs now reach the running service: reloads
    finally:
        stop.set()
        sender.join()
    try:
        answer = httpx.post(url + INGEST, headers=bearer(TEST_TOKEN), json=batch("alive"))
        assert answer.status_code == 202, answer.text
        assert server.running
    finally:
        assert server.stop() == 0, server.log_tail()
