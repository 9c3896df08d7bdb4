"""The delivery half (``batch`` + ``forward_loki``) over a real WAL, against real receivers.

The harness opens a WAL in ``tmp_path``, runs the two stages between channels exactly as the
service does, and "ingests" by appending the records and sending the key hint ``wal_append``
would send (``prefill`` writes a backlog as an earlier version did). Receivers are
``logstack.testing``'s Loki-compatible server over HTTP, or (on trio's autojump clock) the
same receiver behind ``ReceiverTransport``.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from logstack._config import load_settings
from logstack._context import StageContext
from logstack._delivery import LokiAnswer
from logstack._dlq import DeadLetter, dead_letter_queue
from logstack._entry import LogEntry
from logstack._errors import WalError
from logstack._loki_line import line_batch
from logstack._loki_proto import (
    decode_json_push,
    decode_push_request,
    decompress_snappy,
)
from logstack._pipeline import serve_pipeline
from logstack._stage import StageConfig
from logstack._wal import WalStore
from logstack._wal_format import EntryBatch
from logstack.testing import LokiReceiver, ReceiverTransport, open_loki_receiver
from stages.batch import BatchStage
from stages.forward_loki import ForwardLokiStage, LokiForwarder

T0 = 1_758_715_200_000_000_000
HOUR = 3600 * 10**9
TOKENS = {"payments-api": "tok_payments_0123456789", "user-service": "tok_users_0123456789ab"}


async def fsync_inline(fds: list[int]) -> None:
    for fd in fds:
        os.fdatasync(fd)


def entry(i: int, service: str = "api", **kw: Any) -> LogEntry:
    fields: dict[str, Any] = {
        "timestamp_ns": T0 + i * 1000,
        "level": "INFO",
        "message": f"m{i}",
        "service": service,
        "env": "prod",
    }
    fields.update(kw)
    return LogEntry(**fields)


class Harness:
    def __init__(
        self,
        context: StageContext,
        store: WalStore,
        head: trio.MemorySendChannel[Any],
        forward: ForwardLokiStage,
    ) -> None:
        self.context = context
        self.store = store
        self.head = head
        self.forward = forward

    async def ingest(self, key: str, entries: list[LogEntry], *, age_s: float = 0.0) -> None:
        """Append one request's entries durably and hint the batcher, as wal_append does."""
        keylog = self.store.log_for(key)
        received = time.time_ns() - int(age_s * 1e9)
        keylog.append([line_batch(uuid.uuid4().hex, received, entries)])
        await keylog.sync()
        await self.head.send([key])

    def metric(self, name: str, **labels: str) -> float:
        value = self.context.metrics.registry.get_sample_value(name, labels)
        return value or 0.0

    @property
    def forwarder(self) -> LokiForwarder:
        forwarder = self.context.services["forwarder"]
        assert isinstance(forwarder, LokiForwarder)
        return forwarder

    async def dead_letters(self, key: str) -> list[DeadLetter]:
        return await dead_letter_queue(self.context.services, self.store.root).read(key)

    async def wait_delivered(self, key: str, timeout: float = 10.0) -> None:  # noqa: ASYNC109
        """Until the key's checkpoint covers everything written so far."""
        keylog = self.store.log_for(key)
        with trio.fail_after(timeout):
            while keylog.has_unread_entries(keylog.delivered):
                await trio.sleep(0.01)


async def prefill(tmp_path: Path, key: str, batches: list[list[LogEntry]], age_s: float) -> None:
    """Write a backlog into the WAL before the stages start (as after a restart), in the
    record kind of a version before ``LineBatch`` (as after an upgrade, too)."""
    from logstack._metrics import Metrics

    store = WalStore(tmp_path / "wal", 128 << 20, Metrics(), fsync_runner=fsync_inline)
    store.open()
    keylog = store.log_for(key)
    received = time.time_ns() - int(age_s * 1e9)
    for entries in batches:
        keylog.append([EntryBatch(uuid.uuid4().hex, received, entries)])
    await keylog.sync()
    store.close()


def settings_env(
    tmp_path: Path, urls: list[str], tenants: dict[str, str], **loki: Any
) -> dict[str, str]:
    keys = {
        TOKENS[name]: {"name": name, **({"loki_tenant": tenants[name]} if name in tenants else {})}
        for name in TOKENS
    }
    env = {
        "LOGSTACK_WAL_ROOT_PATH": str(tmp_path / "wal"),
        "LOGSTACK_SECURITY_API_KEYS": json.dumps(keys),
        "LOGSTACK_LOKI_URLS": json.dumps(urls),
        "LOGSTACK_LOKI_BATCH_MAX_WAIT_S": "0.05",
        "LOGSTACK_LOKI_BACKOFF_MIN_S": "0.05",
        "LOGSTACK_LOKI_BACKOFF_MAX_S": "0.5",
        "LOGSTACK_LOKI_ENDPOINT_COOLDOWN_S": "0.2",
        "LOGSTACK_LOKI_READY_PROBE_INTERVAL_S": "0.1",
        "LOGSTACK_LOKI_TIMEOUT_S": "5",
    }
    for key, value in loki.items():
        env[f"LOGSTACK_LOKI_{key.upper()}"] = value if isinstance(value, str) else json.dumps(value)
    return env


@asynccontextmanager
async def delivering(
    tmp_path: Path,
    urls: list[str],
    *,
    transport: Any = None,
    tenants: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
    **loki: Any,
) -> AsyncIterator[Harness]:
    all_env = settings_env(tmp_path, urls, tenants or {}, **loki)
    all_env.update(env or {})
    settings = load_settings(env=all_env)
    context = StageContext(settings)
    store = WalStore(
        tmp_path / "wal", settings.wal.segment_max_bytes, context.metrics, fsync_runner=fsync_inline
    )
    store.open()
    context.services["wal"] = store
    if transport is not None:
        context.services["loki_transport"] = transport
    batch = BatchStage(StageConfig(), context)
    forward = ForwardLokiStage(StageConfig(), context)
    try:
        async with trio.open_nursery() as nursery:
            head = await nursery.start(partial(serve_pipeline, [batch, forward], head_capacity=64))
            harness = Harness(context, store, head, forward)
            try:
                yield harness
            finally:
                context.shutdown.set()
                await head.aclose()
    finally:
        store.close()


async def stop_serving(rx: LokiReceiver) -> None:
    """Stop ``rx`` and wait until its port refuses connections."""
    port = rx.port
    rx.stop()
    with trio.fail_after(5):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port or 0)
            except OSError:
                return
            await stream.aclose()
            await trio.sleep(0.02)


def received_messages(rx: LokiReceiver) -> list[str]:
    return [json.loads(line)["message"] for line in rx.lines()]


# ============================================================================ 1. protocol


class Recorder:
    """Keeps the raw bodies and headers of every push the receiver answers."""

    def __init__(self, rx: LokiReceiver) -> None:
        self.bodies: list[tuple[dict[str, str], bytes]] = []
        inner = rx.handle_push

        async def handle(headers: dict[str, str], body: bytes) -> tuple[int, str]:
            self.bodies.append((dict(headers), body))
            return await inner(headers, body)

        rx.handle_push = handle  # type: ignore[method-assign]


@pytest.mark.parametrize(
    ("push_format", "gzip_on", "sm"),
    [
        ("protobuf", False, False),
        ("protobuf", False, True),
        ("json", False, False),
        ("json", True, True),
    ],
)
async def test_protocol_both_formats_decode_to_what_was_sent(
    tmp_path: Path, push_format: str, gzip_on: bool, sm: bool
) -> None:
    async with open_loki_receiver() as rx:
        recorder = Recorder(rx)
        assert rx.url
        async with delivering(
            tmp_path,
            [rx.url],
            tenants={"payments-api": "team-a"},
            push_format=push_format,
            gzip=gzip_on,
            structured_metadata=sm,
        ) as h:
            sent = [
                entry(
                    0,
                    service="payments",
                    labels={"region": "eu-west-1", "k8s.pod": "pod-7"},
                    trace_id="4bf92f3577b34da6",
                    span_id="00f067aa0ba902b7",
                    metadata={"order_id": "O-1", "amount": 12000, "nested": {"ok": True}},
                ),
                entry(1, service="payments", level="ERROR", message="Zahlung fehlgeschlagen: ü€"),
            ]
            await h.ingest("payments-api", sent)
            await h.ingest("user-service", [entry(2, service="users")])
            await rx.wait_for_entries(3)
            await h.wait_delivered("payments-api")
            await h.wait_delivered("user-service")

    # Decode the bytes on the wire independently of the receiver, and compare.
    decoded: dict[str, list[tuple[dict[str, str], int, str, dict[str, str]]]] = {}
    for headers, body in recorder.bodies:
        assert headers["user-agent"].startswith("LogStack/")
        if push_format == "json":
            assert headers["content-type"] == "application/json"
            if gzip_on:
                assert headers["content-encoding"] == "gzip"
                body = gzip.decompress(body)
            streams = decode_json_push(body)
        else:
            assert headers["content-type"] == "application/x-protobuf"
            assert "content-encoding" not in headers
            streams = decode_push_request(decompress_snappy(body))
        tenant = headers.get("x-scope-orgid", "")
        for stream in streams:
            for e in stream.entries:
                decoded.setdefault(tenant, []).append(
                    (stream.labels, e.timestamp_ns, e.line, e.structured_metadata)
                )
    assert set(decoded) == {"team-a", ""}
    payments = sorted(decoded["team-a"], key=lambda x: x[1])
    labels0, ts0, line0, sm0 = payments[0]
    assert labels0 == {
        "service": "payments",
        "env": "prod",
        "level": "INFO",
        "region": "eu-west-1",
        "k8s_pod": "pod-7",  # 'k8s.pod' is not a Loki label name: sent sanitised
    }
    assert ts0 == T0
    expected_line: dict[str, Any] = {
        "message": "m0",
        "metadata": {"order_id": "O-1", "amount": 12000, "nested": {"ok": True}},
    }
    if sm:
        assert sm0 == {"trace_id": "4bf92f3577b34da6", "span_id": "00f067aa0ba902b7"}
    else:
        assert sm0 == {}
        expected_line |= {"trace_id": "4bf92f3577b34da6", "span_id": "00f067aa0ba902b7"}
    assert json.loads(line0) == expected_line
    assert line0 == json.dumps(expected_line, separators=(",", ":"), ensure_ascii=False)
    labels1, ts1, line1, _ = payments[1]
    assert labels1["level"] == "ERROR" and ts1 == T0 + 1000
    assert json.loads(line1) == {"message": "Zahlung fehlgeschlagen: ü€"}
    [(labels2, _, line2, _)] = decoded[""]
    assert labels2 == {"service": "users", "env": "prod", "level": "INFO"}
    assert json.loads(line2) == {"message": "m2"}
    # And the receiver stored exactly that.
    assert sorted((e.timestamp_ns, e.line) for _, e in rx.entries()) == sorted(
        (ts, line) for rows in decoded.values() for _, ts, line, _ in rows
    )


async def test_default_format_is_protobuf(tmp_path: Path) -> None:
    settings = load_settings(env={"LOGSTACK_WAL_ROOT_PATH": str(tmp_path)})
    assert settings.loki.push_format == "protobuf"
    assert settings.loki.structured_metadata is False


async def test_no_push_exceeds_the_burst_and_an_oversized_entry_is_dead_lettered(
    tmp_path: Path,
) -> None:
    async with open_loki_receiver(burst_limit_bytes=1000) as rx:
        assert rx.url
        async with delivering(tmp_path, [rx.url], burst_limit_bytes=1000) as h:
            small = [entry(i, message="x" * 250) for i in range(10)]
            big = entry(99, message="y" * 1200)
            await h.ingest("payments-api", [*small[:5], big, *small[5:]])
            await h.wait_delivered("payments-api")
            [record] = await h.dead_letters("payments-api")
            assert h.metric("dlq_entries_total", token="payments-api") == 1
            assert h.metric("loki_entries_forwarded_total", token="payments-api") == 10
    assert rx.status_counts == {204: rx.pushes}  # never a 429
    assert rx.pushes == 4  # 10 lines of ~265 bytes in pushes of at most 1000
    assert received_messages(rx) == ["x" * 250] * 10
    assert record.entries == 1 and record.status is None
    assert "larger than loki.burst_limit_bytes (1000)" in record.reason
    assert json.loads(record.streams[0].entries[0].line)["message"] == "y" * 1200


# ============================================================================ 3. retries, DLQ


async def test_429_storm_is_retried_until_accepted(tmp_path: Path) -> None:
    async with open_loki_receiver() as rx:
        assert rx.url
        rx.fail_next(429, count=6)
        async with delivering(tmp_path, [rx.url]) as h:
            await h.ingest("payments-api", [entry(i) for i in range(20)])
            await rx.wait_for_entries(20)
            await h.wait_delivered("payments-api")
            assert h.metric("loki_retries_total", token="payments-api") == 6
            assert h.metric("loki_requests_total", status_code="429") == 6
            assert h.metric("loki_requests_total", status_code="204") == 1
            assert h.metric("loki_entries_forwarded_total", token="payments-api") == 20
            assert h.metric("loki_request_duration_seconds_count") == 7
            # 429 is throttling, not a broken URL: it stays healthy.
            assert h.forward.pool.endpoints[0].failures == 0
            assert await h.dead_letters("payments-api") == []
    assert sorted(received_messages(rx)) == sorted(f"m{i}" for i in range(20))
    assert rx.duplicates == 0


async def test_500s_are_retried_and_order_is_kept(tmp_path: Path) -> None:
    async with open_loki_receiver() as rx:
        assert rx.url
        rx.fail_next(500, count=3)
        async with delivering(tmp_path, [rx.url], batch_max_entries=5) as h:
            for n in range(4):
                await h.ingest("payments-api", [entry(n * 5 + i) for i in range(5)])
            await rx.wait_for_entries(20)
            await h.wait_delivered("payments-api")
            assert h.metric("loki_retries_total", token="payments-api") == 3
            assert h.metric("loki_requests_total", status_code="500") == 3
    # One stream, pushed strictly in WAL order despite the failures.
    assert received_messages(rx) == [f"m{i}" for i in range(20)]
    assert rx.duplicates == 0


async def test_slow_loki_times_out_and_is_retried_without_stored_duplicates(
    tmp_path: Path,
) -> None:
    async with open_loki_receiver() as rx:
        assert rx.url
        rx.delay_s = 1.0
        async with delivering(tmp_path, [rx.url], timeout_s=0.3) as h:
            await h.ingest("payments-api", [entry(i) for i in range(5)])
            with trio.fail_after(5):
                while h.metric("loki_requests_total", status_code="error") < 2:
                    await trio.sleep(0.02)
            rx.delay_s = 0.0
            await h.wait_delivered("payments-api")
            assert h.metric("loki_retries_total", token="payments-api") >= 2
            assert h.metric("loki_entries_forwarded_total", token="payments-api") == 5
    # A push Loki finished after we gave up is answered as a duplicate, never stored twice.
    assert sorted(received_messages(rx)) == [f"m{i}" for i in range(5)]


async def test_partial_400_dead_letters_only_the_refused_lines_and_never_resends(
    tmp_path: Path,
) -> None:
    async with open_loki_receiver(max_line_size_bytes=300) as rx:
        assert rx.url
        async with delivering(tmp_path, [rx.url]) as h:
            entries = [entry(i) for i in range(6)]
            entries[2] = entry(2, message="L" * 400)
            entries[4] = entry(4, message="M" * 500)
            await h.ingest("payments-api", entries)
            await h.wait_delivered("payments-api")
            [record] = await h.dead_letters("payments-api")
            assert h.metric("loki_entries_forwarded_total", token="payments-api") == 4
            assert h.metric("dlq_entries_total", token="payments-api") == 2
            assert h.metric("loki_retries_total", token="payments-api") == 0
            assert h.metric("loki_requests_total", status_code="400") == 1
    assert rx.pushes == 1  # the 400 was not re-sent
    assert received_messages(rx) == ["m0", "m1", "m3", "m5"]
    assert record.status == 400 and record.entries == 2 and record.unconfirmed == 0
    assert "Max entry size '300' bytes exceeded" in record.reason
    dead = [json.loads(e.line)["message"][0] for s in record.streams for e in s.entries]
    assert dead == ["L", "M"]
    assert record.wal_start is not None and record.wal_end is not None


async def test_partial_400_out_of_order_in_one_stream(tmp_path: Path) -> None:
    async with open_loki_receiver() as rx:
        assert rx.url
        async with delivering(tmp_path, [rx.url]) as h:
            await h.ingest("payments-api", [entry(0, timestamp_ns=T0 + 5 * HOUR, message="new")])
            await h.wait_delivered("payments-api")
            late = [
                entry(1, timestamp_ns=T0, message="late"),
                entry(2, timestamp_ns=T0 + 5 * HOUR + 1, message="fine"),
            ]
            await h.ingest("payments-api", late)
            await h.wait_delivered("payments-api")
            [record] = await h.dead_letters("payments-api")
            assert h.metric("loki_entries_forwarded_total", token="payments-api") == 2
    assert received_messages(rx) == ["new", "fine"]
    [stream] = record.streams
    [dead] = stream.entries
    assert json.loads(dead.line)["message"] == "late" and not dead.unconfirmed
    assert "entry too far behind" in (dead.reason or record.reason)


async def test_other_4xx_dead_letters_the_whole_push(tmp_path: Path) -> None:
    async with open_loki_receiver(require_tenant=True) as rx:
        assert rx.url
        async with delivering(tmp_path, [rx.url], tenants={"payments-api": "team-a"}) as h:
            await h.ingest("payments-api", [entry(0)])
            await h.ingest("user-service", [entry(1), entry(2)])  # no tenant: Loki says 401
            await h.wait_delivered("payments-api")
            await h.wait_delivered("user-service")
            [record] = await h.dead_letters("user-service")
            assert await h.dead_letters("payments-api") == []
            assert h.metric("dlq_entries_total", token="user-service") == 2
    assert record.status == 401 and record.entries == 2 and "no org id" in record.reason
    assert received_messages(rx) == ["m0"]


@pytest.mark.parametrize("status", [301, 302, 307, 308, 408])
async def test_redirects_and_408_are_retried_not_dead_lettered(tmp_path: Path, status: int) -> None:
    """SPEC §7 dead-letters "other 4xx"; a redirect was dead-lettered too (an ingress
    redirecting http to https emptied every push into the DLQ), and so was a proxy's 408.
    Both are the URL's fault: retried, another URL tried."""
    async with open_loki_receiver() as rx:
        assert rx.url
        rx.fail_next(status, count=2)
        async with delivering(tmp_path, [rx.url]) as h:
            await h.ingest("payments-api", [entry(0), entry(1)])
            await h.wait_delivered("payments-api")
            assert await h.dead_letters("payments-api") == []
            assert rx.status_counts[status] == 2
            assert h.metric("loki_requests_total", status_code=str(status)) == 2
    assert received_messages(rx) == ["m0", "m1"]


async def test_a_push_that_times_out_keeps_its_url_cooling_down(tmp_path: Path) -> None:
    """A URL whose pushes hang while its ``/ready`` says 200 was brought back by every
    probe, so every cycle one push waited ``timeout_s`` on it (lag in a 0-30 s sawtooth):
    a timed-out push counts like a 5xx, and only a push that works ends the cool-down."""
    async with open_loki_receiver() as a, open_loki_receiver() as b:
        assert a.url and b.url
        b.delay_s = 3.0  # b's pushes hang; b's /ready answers at once
        async with delivering(
            tmp_path,
            [b.url, a.url],
            timeout_s=0.5,
            endpoint_cooldown_s=20,
            ready_probe_interval_s=0.1,
        ) as h:
            await h.ingest("payments-api", [entry(0)])
            await h.wait_delivered("payments-api")
            endpoint_b = h.forward.pool.endpoints[0]
            assert endpoint_b.failures == 1
            await trio.sleep(1.0)  # ten probes of b's /ready, each answered 200
            assert endpoint_b.unhealthy_until > trio.current_time()
            for i in range(1, 6):
                await h.ingest("payments-api", [entry(i)])
                await h.wait_delivered("payments-api")
            assert b.pushes == 1
    assert sorted(received_messages(a)) == sorted(f"m{i}" for i in range(6))


# ============================================================================ 4. fairness


async def test_fairness_a_quiet_key_is_not_starved_by_a_100x_backlog(tmp_path: Path) -> None:
    """Bound: with K keys waiting and N push slots, a key's push starts after at most
    ceil((K-1)/N) pushes of other keys that were queued before it, plus those already in
    flight. Here K=2, N=1: at most 2 noisy pushes are answered between the moment a quiet
    entry is ready (cut) and the moment its push is answered."""
    # Backlogs already in the WAL at start: 1000 entries (100 pushes) vs 10 (1 push).
    noisy = [[entry(r * 10 + i, service="noisy") for i in range(10)] for r in range(100)]
    await prefill(tmp_path, "payments-api", noisy, age_s=5)
    await prefill(tmp_path, "user-service", [[entry(i, service="quiet") for i in range(10)]], 5)
    async with open_loki_receiver() as rx:
        assert rx.url
        rx.delay_s = 0.005
        async with delivering(
            tmp_path, [rx.url], batch_max_entries=10, max_concurrent_pushes=1
        ) as h:

            def quiet_push_indices() -> list[int]:
                return [
                    i
                    for i, p in enumerate(rx.push_log)
                    if any('service="quiet"' in s for s in p.streams)
                ]

            with trio.fail_after(10):
                while not quiet_push_indices():
                    await trio.sleep(0.001)
            assert quiet_push_indices()[0] <= 2, [p.streams for p in rx.push_log[:5]]

            # While the noisy key still drains, a new quiet entry (ready at once) ...
            with trio.fail_after(10):
                while len(rx.push_log) < 30:
                    await trio.sleep(0.001)
            ingested_at = trio.current_time()
            answered_before = len(rx.push_log)
            await h.ingest("user-service", [entry(500, service="quiet")], age_s=5)
            with trio.fail_after(10):
                while len(quiet_push_indices()) < 2:
                    await trio.sleep(0.001)
            latency = rx.push_log[quiet_push_indices()[1]].at - ingested_at
            between = quiet_push_indices()[1] - answered_before
            assert between <= 2, between
            noisy_left = 100 - sum(
                1 for p in rx.push_log if any('service="noisy"' in s for s in p.streams)
            )
            assert noisy_left > 50  # the quiet key really was served mid-backlog
            await h.wait_delivered("payments-api", timeout=30)
            await h.wait_delivered("user-service")
    print(f"\nfairness: quiet push after {between} noisy pushes, {latency * 1000:.1f} ms")
    assert rx.entry_count == 1011 and rx.duplicates == 0


async def test_fairness_a_key_backing_off_holds_no_push_slot(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """One key's pushes are refused (its tenant is throttled, 429 forever); another key on
    the same single push slot is delivered regardless, because retry waits hold no slot."""
    rx = LokiReceiver()
    transport = ReceiverTransport({"http://loki": rx})
    inner = rx.handle_push

    async def throttle_team_a(headers: dict[str, str], body: bytes) -> tuple[int, str]:
        if headers.get("x-scope-orgid") == "team-a":
            rx.pushes += 1
            return 429, "Ingestion rate limit exceeded for user team-a\n"
        return await inner(headers, body)

    rx.handle_push = throttle_team_a  # type: ignore[method-assign]
    async with delivering(
        tmp_path,
        ["http://loki"],
        transport=transport,
        tenants={"payments-api": "team-a"},
        max_concurrent_pushes=1,
        backoff_min_s=0.5,
        backoff_max_s=300,
    ) as h:
        await h.ingest("payments-api", [entry(0)])
        await trio.sleep(60)
        for i in range(5):
            await h.ingest("user-service", [entry(i + 1, service="users")])
            await h.wait_delivered("user-service", timeout=5)
        assert rx.entry_count == 5
        assert h.metric("loki_retries_total", token="payments-api") >= 5


# ============================================================================ 5. several URLs


@pytest.mark.parametrize(
    ("credentials", "authorization"),
    [
        ({"username": "123456", "password": "glc_s3cret"}, "Basic MTIzNDU2OmdsY19zM2NyZXQ="),
        ({"bearer_token": "t0k3n-for-loki"}, "Bearer t0k3n-for-loki"),
        ({}, None),
    ],
)
async def test_credentials_go_with_every_push_and_ready_probe(
    tmp_path: Path, credentials: dict[str, str], authorization: str | None
) -> None:
    """A Loki behind a gateway (Grafana Cloud, an nginx with auth) needs them on both."""
    async with open_loki_receiver() as rx:
        assert rx.url
        async with delivering(tmp_path, [rx.url], **credentials) as h:
            with trio.fail_after(5):  # no push yet: the forwarder probes /ready
                while not rx.ready_headers:
                    await trio.sleep(0.02)
            await h.ingest("payments-api", [entry(1)])
            await h.wait_delivered("payments-api")
    assert rx.received_headers.get("authorization") == authorization
    assert rx.ready_headers.get("authorization") == authorization


async def test_new_credentials_apply_from_the_next_push_after_a_reload(tmp_path: Path) -> None:
    async with open_loki_receiver() as rx:
        assert rx.url
        async with delivering(tmp_path, [rx.url], bearer_token="old-t0k3n") as h:
            await h.ingest("payments-api", [entry(1)])
            await h.wait_delivered("payments-api")
            assert rx.received_headers["authorization"] == "Bearer old-t0k3n"
            env = settings_env(tmp_path, [rx.url], {}, bearer_token="new-t0k3n")
            h.forward.reload(load_settings(env=env))  # what SIGHUP does
            await h.ingest("payments-api", [entry(2)])
            await h.wait_delivered("payments-api")
    assert rx.received_headers["authorization"] == "Bearer new-t0k3n"


async def test_round_robin_over_two_urls(tmp_path: Path) -> None:
    async with open_loki_receiver() as a, open_loki_receiver() as b:
        assert a.url and b.url
        async with delivering(tmp_path, [a.url, b.url], max_concurrent_pushes=1) as h:
            for i in range(10):
                await h.ingest("payments-api", [entry(i)])
                await h.wait_delivered("payments-api")
    assert a.pushes == 5 and b.pushes == 5
    assert sorted(received_messages(a) + received_messages(b)) == sorted(f"m{i}" for i in range(10))


async def test_round_robin_skips_a_failing_url_and_reprobes_it(tmp_path: Path) -> None:
    async with open_loki_receiver() as a, open_loki_receiver() as b:
        assert a.url and b.url
        b_port = b.port
        await stop_serving(b)  # connection refused from now on
        async with delivering(
            tmp_path,
            [a.url, b.url],
            max_concurrent_pushes=1,
            endpoint_cooldown_s=5,
            backoff_max_s=30,
            ready_probe_interval_s=0.1,
        ) as h:
            for i in range(20):
                await h.ingest("payments-api", [entry(i)])
                await h.wait_delivered("payments-api")
            endpoint_b = h.forward.pool.endpoints[1]
            # One failed push to b (failed over to a at once), then b is skipped.
            assert endpoint_b.failures >= 1 and endpoint_b.requests == 1
            assert h.metric("loki_requests_total", status_code="error") == 1
            assert a.pushes == 20
            # b comes back: its /ready probe ends the cool-down, round-robin resumes.
            async with open_loki_receiver(port=b_port or 0, receiver=b):
                with trio.fail_after(5):
                    while endpoint_b.unhealthy_until > trio.current_time():
                        await trio.sleep(0.02)
                for i in range(20, 30):
                    await h.ingest("payments-api", [entry(i)])
                    await h.wait_delivered("payments-api")
                assert b.pushes >= 4
                assert h.forward.pool.endpoints[1].failures == 0
    assert sorted(received_messages(a) + received_messages(b)) == sorted(f"m{i}" for i in range(30))


async def test_5xx_from_one_url_fails_over_to_the_other_at_once(tmp_path: Path) -> None:
    async with open_loki_receiver() as a, open_loki_receiver() as b:
        assert a.url and b.url
        a.fail_next(503)  # until cleared
        async with delivering(
            tmp_path,
            [a.url, b.url],
            max_concurrent_pushes=1,
            backoff_min_s=10,
            backoff_max_s=30,
            endpoint_cooldown_s=10,
        ) as h:
            started = trio.current_time()
            for i in range(10):
                await h.ingest("payments-api", [entry(i)])
                await h.wait_delivered("payments-api")
            # No backoff was needed: each failure to a went to b at once.
            assert trio.current_time() - started < 5
    assert a.status_counts[503] == 1  # then skipped for its cool-down
    assert sorted(received_messages(b)) == sorted(f"m{i}" for i in range(10))


# ============================================================================ 2. outage


async def test_outage_of_ten_minutes_on_the_clock_loses_and_duplicates_nothing(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Loki unreachable for 10 (virtual) minutes while ingest goes on, with the production
    backoff (0.5 s → 5 min). Afterwards every entry is there once, and the drain starts
    within one /ready probe interval of the recovery, not after a 5-minute backoff."""
    rx = LokiReceiver()
    url = "http://loki"
    transport = ReceiverTransport({url: rx})
    ingested: list[str] = []
    async with delivering(
        tmp_path,
        [url],
        transport=transport,
        backoff_min_s=0.5,
        backoff_max_s=300,
        endpoint_cooldown_s=5,
        ready_probe_interval_s=10,
        batch_max_wait_s=1,
        batch_max_entries=1000,
        max_concurrent_pushes=4,
    ) as h:
        n = 0

        async def ingest_for(seconds: float) -> None:
            nonlocal n
            end = trio.current_time() + seconds
            while trio.current_time() < end:
                for key in ("payments-api", "user-service"):
                    batch = [entry(n + i, service=key, message=f"{key}-{n + i}") for i in range(20)]
                    ingested.extend(e.message for e in batch)
                    await h.ingest(key, batch)
                n += 20
                await trio.sleep(2)

        await ingest_for(20)
        transport.down.add(url)
        down_at = trio.current_time()
        await ingest_for(600)
        backlog = len(ingested) - rx.entry_count
        assert backlog > 10_000
        retries = h.metric("loki_retries_total", token="payments-api")
        transport.down.discard(url)
        up_at = trio.current_time()
        await h.wait_delivered("payments-api", timeout=120)
        await h.wait_delivered("user-service", timeout=120)
        drained_at = trio.current_time()
    assert sorted(rx.lines()) == sorted(
        json.dumps({"message": m}, separators=(",", ":")) for m in ingested
    )
    assert rx.duplicates == 0
    drain_s = drained_at - up_at
    print(
        f"\noutage: {up_at - down_at:.0f} s down, {retries:.0f} retries of one key meanwhile, "
        f"backlog {backlog} entries drained {drain_s:.1f} s (virtual) after recovery"
    )
    # Backoff is capped at 300 s; without the /ready wake-up the drain could wait that long.
    assert drain_s <= 10 + 5
    assert 5 <= retries < 60  # exponential: not one retry per 0.5 s over 10 minutes


async def test_lag_grows_during_an_outage_and_returns_to_zero(tmp_path: Path) -> None:
    async with open_loki_receiver() as rx:
        assert rx.url
        port = rx.port
        await stop_serving(rx)
        async with delivering(tmp_path, [rx.url]) as h:
            await h.ingest("payments-api", [entry(0)])
            await trio.sleep(0.6)
            lag = h.metric("forwarder_lag_seconds", token="payments-api")
            assert lag >= 0.5
            await trio.sleep(0.2)
            assert h.metric("forwarder_lag_seconds", token="payments-api") > lag
            assert h.context.health.loki_last_error is not None
            async with open_loki_receiver(port=port or 0, receiver=rx):
                await h.wait_delivered("payments-api", timeout=10)
                # The follower releases the lag once it sees the push done, which may be a
                # scheduling step after the checkpoint this wait watched.
                with trio.fail_after(5):
                    while h.metric("forwarder_lag_seconds", token="payments-api") != 0:
                        await trio.sleep(0.01)
                assert h.metric("forwarder_lag_seconds", token="user-service") == 0
    assert received_messages(rx) == ["m0"]


async def test_the_log_says_when_loki_takes_pushes_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """After the retry warnings the log went quiet: nothing said delivery had recovered."""
    async with open_loki_receiver() as rx:
        assert rx.url
        rx.fail_next(503, 2)
        async with delivering(tmp_path, [rx.url]) as h:
            with caplog.at_level(logging.INFO, logger="logstack.forward"):
                await h.ingest("payments-api", [entry(0)])
                await h.wait_delivered("payments-api", timeout=10)
    messages = [r.getMessage() for r in caplog.records if r.name == "logstack.forward"]
    assert messages.count("push to Loki failed; will retry") == 2
    assert messages[-1] == "Loki takes pushes again"
    [recovered] = [r for r in caplog.records if r.getMessage() == "Loki takes pushes again"]
    assert recovered.failing_for_s >= 0  # type: ignore[attr-defined]


async def test_stopping_during_backoff_leaves_the_batch_in_the_wal(tmp_path: Path) -> None:
    async with open_loki_receiver() as rx:
        assert rx.url
        rx.fail_next(503)
        async with delivering(tmp_path, [rx.url], backoff_min_s=30, backoff_max_s=60) as h:
            await h.ingest("payments-api", [entry(0)])
            await rx.wait_for_pushes(1)
            keylog = h.store.log_for("payments-api")
            started = trio.current_time()
        assert trio.current_time() - started < 2  # the 30 s backoff did not hold the stop
        assert keylog.has_unread_entries(keylog.delivered)


# ============================================================================ replay


async def test_replay_sends_dead_letters_again_and_removes_what_loki_took(tmp_path: Path) -> None:
    async with open_loki_receiver(max_line_size_bytes=300) as rx:
        assert rx.url
        async with delivering(tmp_path, [rx.url], tenants={"payments-api": "team-a"}) as h:
            await h.ingest("payments-api", [entry(0), entry(1, message="L" * 400)])
            await h.ingest("payments-api", [entry(2, message="M" * 350)])
            await h.wait_delivered("payments-api")
            assert [r.entries for r in await h.dead_letters("payments-api")] in ([1, 1], [2])

            # Loki still refuses: nothing leaves, the attempt is recorded.
            report = await h.forwarder.replay("payments-api")
            assert report.replayed_entries == 0 and report.refused_again_entries == 2
            assert not report.complete
            records = await h.dead_letters("payments-api")
            assert sum(r.entries for r in records) == 2
            assert all(r.replay_attempts == 1 for r in records)

            # Loki unreachable: the replay stops and keeps everything.
            port = rx.port
            await stop_serving(rx)
            report = await h.forwarder.replay("payments-api")
            assert report.error and report.remaining_entries == 2
            assert sum(r.entries for r in await h.dead_letters("payments-api")) == 2

            # The operator raised Loki's limit: the replay delivers and empties the queue.
            rx.max_line_size_bytes = 1000
            async with open_loki_receiver(port=port or 0, receiver=rx):
                forwarded = h.metric("loki_entries_forwarded_total", token="payments-api")
                report = await h.forwarder.replay("payments-api")
                assert report.complete and report.replayed_entries == 2
                assert await h.dead_letters("payments-api") == []
                assert h.metric("loki_entries_forwarded_total", token="payments-api") == (
                    forwarded + 2
                )
    assert sorted(m[0] for m in received_messages(rx)) == ["L", "M", "m"]
    assert {p.tenant for p in rx.push_log} == {"team-a"}


async def test_transport_answer_with_retry_after_is_honoured(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    answers = [LokiAnswer(429, "slow down", retry_after_s=42.0), LokiAnswer(204)]
    times: list[float] = []

    class Scripted:
        async def post(self, url: str, body: bytes, headers: Any) -> LokiAnswer:
            times.append(trio.current_time())
            return answers.pop(0)

        async def get(self, url: str, headers: Any = None) -> LokiAnswer:
            return LokiAnswer(200, "ready")

        async def aclose(self) -> None:
            pass

    async with delivering(tmp_path, ["http://loki"], transport=Scripted(), backoff_max_s=300) as h:
        await h.ingest("payments-api", [entry(0)])
        await h.wait_delivered("payments-api", timeout=100)
    assert len(times) == 2 and times[1] - times[0] >= 42.0


# ============================================================================ throughput


async def test_throughput_of_small_pushes_over_http(tmp_path: Path) -> None:
    """8 keys with 30 pushes of 10 entries each, 4 push slots, protobuf over loopback HTTP."""
    keys = [f"key-{k}" for k in range(8)]
    for key in keys:
        batches = [[entry(r * 10 + i, service=key) for i in range(10)] for r in range(30)]
        await prefill(tmp_path, key, batches, age_s=5)
    async with open_loki_receiver() as rx:
        assert rx.url
        async with delivering(
            tmp_path, [rx.url], batch_max_entries=10, max_concurrent_pushes=4
        ) as h:
            started = trio.current_time()
            await rx.wait_for_entries(2400, timeout=60)
            elapsed = trio.current_time() - started
            for key in keys:
                await h.wait_delivered(key)
    pushes_per_s = rx.pushes / elapsed
    print(f"\nthroughput: {rx.pushes} pushes in {elapsed:.2f} s = {pushes_per_s:.0f} pushes/s")
    assert rx.pushes == 240 and rx.duplicates == 0
    assert pushes_per_s > 20


async def test_next_batch_is_built_while_one_is_in_flight_and_pushes_stay_in_order(
    tmp_path: Path,
) -> None:
    """A key's next batch waits only for Loki to take the previous one (not for its
    checkpoint fsync), and never overlaps it: one push per key in flight, WAL order kept."""
    async with open_loki_receiver() as rx:
        assert rx.url
        inner = rx.handle_push
        in_flight = peak = 0

        async def slow(headers: dict[str, str], body: bytes) -> tuple[int, str]:
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            try:
                await trio.sleep(0.02)
                return await inner(headers, body)
            finally:
                in_flight -= 1

        rx.handle_push = slow  # type: ignore[method-assign]
        async with delivering(tmp_path, [rx.url], batch_max_entries=5) as h:
            for n in range(12):
                await h.ingest("payments-api", [entry(n * 5 + i) for i in range(5)])
            await rx.wait_for_entries(60)
            await h.wait_delivered("payments-api")
    assert peak == 1
    assert received_messages(rx) == [f"m{i}" for i in range(60)]
    assert rx.duplicates == 0


def fail_first_checkpoint(monkeypatch: pytest.MonkeyPatch, error: Exception) -> list[Exception]:
    """Make the next ``commit_delivered`` raise ``error``; the list empties once it did."""
    from logstack._wal import KeyLog

    real = KeyLog.commit_delivered
    pending = [error]

    async def failing(self: KeyLog, position: Any) -> None:
        if pending:
            raise pending.pop()
        await real(self, position)

    monkeypatch.setattr(KeyLog, "commit_delivered", failing)
    return pending


async def test_a_failed_checkpoint_is_retried_without_pushing_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pending = fail_first_checkpoint(monkeypatch, OSError("disk full"))
    async with open_loki_receiver() as rx:
        assert rx.url
        async with delivering(tmp_path, [rx.url]) as h:
            await h.ingest("payments-api", [entry(i) for i in range(3)])
            await rx.wait_for_entries(3)
            await h.wait_delivered("payments-api")
    assert pending == []
    assert received_messages(rx) == ["m0", "m1", "m2"]
    assert rx.statistics()["pushes"] == 1


async def test_a_checkpoint_the_wal_cannot_take_makes_readiness_say_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``/readyz`` said "writable" while every checkpoint failed (a full disk)."""
    full = WalError("cannot write WAL segment of payments-api: No space left on device")
    pending = fail_first_checkpoint(monkeypatch, full)
    async with open_loki_receiver() as rx:
        assert rx.url
        async with delivering(tmp_path, [rx.url]) as h:
            await h.ingest("payments-api", [entry(0)])
            await h.wait_delivered("payments-api")
            health = h.context.health
            assert not health.wal_writable
            assert "No space left" in (health.wal_last_error or "")
    assert pending == []
