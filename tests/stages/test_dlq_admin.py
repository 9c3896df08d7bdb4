"""The dead-letter queue: its file, and ``GET /v1/admin/dlq`` / ``POST /v1/admin/dlq/replay``
/ ``POST /v1/admin/dlq/drop``.

Routes are tested on a Quart-Trio app built here with ``register_dlq_routes`` (the service
wires the same function into its app), around a real ``Service`` and WAL directory; replay
goes through a real ``LokiForwarder`` to a receiver behind ``ReceiverTransport``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from quart_trio import QuartTrio

from logstack._admin_dlq import register_dlq_routes
from logstack._config import load_settings
from logstack._delivery import Item
from logstack._dlq import DLQ_FILE, DeadLetterQueue, dead_letter_queue, make_dead_letter
from logstack._loki_proto import PushEntry
from logstack._service import Service
from logstack._wal import WalStore
from logstack.testing import LokiReceiver, ReceiverTransport
from logstack.testing._faults import file_size_limit
from stages.forward_loki import EndpointPool, LokiForwarder

ADMIN = "admin_token_0123456789abcdef"
API_TOKEN = "tok_payments_0123456789"
T0 = 1_758_715_200_000_000_000


def item(i: int, line: str | None = None, **labels: str) -> Item:
    stream = tuple(sorted({"service": "api", "env": "prod", "level": "INFO", **labels}.items()))
    return stream, PushEntry(T0 + i, line or json.dumps({"message": f"m{i}"}), {})


def record(
    key: str,
    n: int,
    reason: str = "HTTP 400: Max entry size exceeded",
    line: str | None = None,
    **kw: Any,
) -> Any:
    dead = [(item(i, line), "", False) for i in range(n)]
    return make_dead_letter(key, None, 400, reason, dead, **kw)


# ----------------------------------------------------------------------------- the file


async def test_append_read_rewrite_round_trip(tmp_path: Path) -> None:
    queue = DeadLetterQueue(tmp_path)
    first = record("payments-api", 2, wal_range=((1, 24), (1, 500)))
    assert await queue.append(first)
    # The same WAL range again (a crash between DLQ write and checkpoint): not twice.
    assert not await queue.append(record("payments-api", 2, wal_range=((1, 24), (1, 500))))
    second = make_dead_letter(
        "payments-api",
        "team-a",
        400,
        "whole answer",
        [(item(7), "entry too far behind", False), (item(8), "unconfirmed: ...", True)],
    )
    assert await queue.append(second)
    assert queue.keys() == ["payments-api"]
    records = await queue.read("payments-api")
    assert [r.id for r in records] == [first.id, second.id]
    assert records[1].items() == [item(7), item(8)]
    assert records[1].unconfirmed == 1 and records[1].tenant == "team-a"
    assert records[1].streams[0].entries[0].reason == "entry too far behind"
    assert [h.entries for h in queue.headers_sync("payments-api")] == [2, 2]

    await queue.rewrite("payments-api", lambda r: None if r.id == first.id else r)
    assert [r.id for r in await queue.read("payments-api")] == [second.id]
    await queue.rewrite("payments-api", lambda r: None)
    assert not (tmp_path / "payments-api" / DLQ_FILE).exists()
    assert queue.keys() == []


async def test_a_refusal_seen_again_with_another_wal_range_is_not_recorded_twice(
    tmp_path: Path,
) -> None:
    """After a crash between the DLQ write and the checkpoint, delivery starts again at the
    checkpoint and may cut the batch elsewhere: the same refusal came with another range
    and was recorded twice (an audit's kill -9 did it three times in three)."""
    queue = DeadLetterQueue(tmp_path)

    def refused(items: list[tuple[int, bool]], wal_range: Any) -> Any:
        dead = [(item(i), "", unsure) for i, unsure in items]
        return make_dead_letter(
            "payments-api", None, 400, "line too long", dead, wal_range=wal_range
        )

    assert await queue.append(refused([(0, False), (1, True)], ((0, 24), (1, 2682))))
    assert not await queue.append(refused([(0, False), (1, True)], ((1, 24), (1, 2838))))
    # Overlapping, with one entry not recorded yet (and one line sent twice: once held).
    more = refused([(1, True), (2, False), (0, False), (0, False)], ((1, 100), (1, 3000)))
    assert await queue.append(more)
    assert more.entries == 2 and more.unconfirmed == 0
    records = await queue.read("payments-api")
    assert [r.items() for r in records] == [[item(0), item(1)], [item(2), item(0)]]
    # A range that does not overlap is recorded whole, the same lines included.
    later = record("payments-api", 2, wal_range=((2, 24), (2, 500)))
    assert await queue.append(later)
    assert [h.entries for h in queue.headers_sync("payments-api")] == [2, 2, 2]


async def test_a_record_cut_short_by_a_full_disk_is_not_kept(tmp_path: Path) -> None:
    """The short write was fsynced as if whole: the cut record was lost, and the next
    one, appended to its line, with it (the forwarder had checkpointed past both)."""
    queue = DeadLetterQueue(tmp_path)
    first = record("payments-api", 2)
    assert await queue.append(first)
    path = queue.path("payments-api")
    size = path.stat().st_size
    with file_size_limit(size + 100), pytest.raises(OSError):
        queue._append_sync(record("payments-api", 20))
    assert path.stat().st_size == size  # the forwarder retries the whole record
    second = record("payments-api", 3)
    assert await queue.append(second)
    assert [r.id for r in await queue.read("payments-api")] == [first.id, second.id]


async def test_a_line_left_cut_by_a_crash_does_not_swallow_the_next_record(
    tmp_path: Path,
) -> None:
    queue = DeadLetterQueue(tmp_path)
    first = record("payments-api", 2)
    assert await queue.append(first)
    path = queue.path("payments-api")
    with path.open("ab") as handle:
        handle.write(b'{"id": "cut-by-a-crash", "entr')
    second = record("payments-api", 3)
    assert await queue.append(second)
    assert [r.id for r in await queue.read("payments-api")] == [first.id, second.id]


async def test_reads_older_records_and_skips_garbage(tmp_path: Path) -> None:
    path = tmp_path / "payments-api" / DLQ_FILE
    path.parent.mkdir()
    old = {
        "dead_lettered_at": "2025-09-24T12:00:00Z",
        "reason": "old format",
        "status": 400,
        "entries": 1,
        "streams": [{"stream": {"service": "api"}, "values": [[str(T0), "line"]]}],
    }
    path.write_text(json.dumps(old) + "\n{not json\n")
    queue = DeadLetterQueue(tmp_path)
    [rec] = await queue.read("payments-api")
    assert rec.id == "line-1" and rec.key == "payments-api"
    assert rec.items() == [((("service", "api"),), PushEntry(T0, "line", {}))]
    # A rewrite keeps what it cannot read.
    await queue.rewrite("payments-api", lambda r: r)
    assert "{not json" in path.read_text()


# ----------------------------------------------------------------------------- the routes


class Client:
    def __init__(self, client: Any) -> None:
        self.client = client

    async def get(self, path: str, token: str | None = ADMIN) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        response = await self.client.get(path, headers=headers)
        return response.status_code, json.loads(await response.get_data())

    async def post(self, path: str, body: Any, token: str | None = ADMIN) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        response = await self.client.post(path, data=raw, headers=headers)
        return response.status_code, json.loads(await response.get_data())


@asynccontextmanager
async def admin_app(tmp_path: Path) -> AsyncIterator[tuple[Client, Service]]:
    settings = load_settings(
        env={
            "LOGSTACK_WAL_ROOT_PATH": str(tmp_path / "wal"),
            "LOGSTACK_SECURITY_ADMIN_TOKEN": ADMIN,
            "LOGSTACK_SECURITY_API_KEYS": json.dumps(
                {API_TOKEN: {"name": "payments-api", "loki_tenant": "team-a"}}
            ),
            "LOGSTACK_LOKI_BACKOFF_MIN_S": "0.01",
        }
    )
    service = Service(settings)
    store = WalStore(tmp_path / "wal", 1 << 20, service.context.metrics)
    store.open()
    service.context.services["wal"] = store
    app = QuartTrio("test")
    register_dlq_routes(app, service)
    async with app.test_app() as test_app:
        yield Client(test_app.test_client()), service
    store.close()


def queue_of(service: Service) -> DeadLetterQueue:
    return dead_letter_queue(service.context.services, service.wal.root)


async def test_admin_token_is_required(tmp_path: Path) -> None:
    async with admin_app(tmp_path) as (client, _):
        assert (await client.get("/v1/admin/dlq", token=None))[0] == 401
        status, body = await client.get("/v1/admin/dlq", token=API_TOKEN)
        assert status == 403 and body["error"] == "forbidden"
        status, body = await client.post("/v1/admin/dlq/replay", {"token": "x"}, token=None)
        assert status == 401 and body["error"] == "authentication_error"


async def test_list_summarises_per_key_and_pages(tmp_path: Path) -> None:
    async with admin_app(tmp_path) as (client, service):
        queue = queue_of(service)
        for n in range(1, 5):
            await queue.append(record("payments-api", n))
        await queue.append(record("user-service", 1, reason="HTTP 401: no org id", line="x" * 5000))
        status, body = await client.get("/v1/admin/dlq?limit=3")
        assert status == 200
        assert [k["token"] for k in body["keys"]] == ["payments-api", "user-service"]
        payments = body["keys"][0]
        assert payments["records"] == 4 and payments["entries"] == 10
        assert payments["reasons"] == [
            {"reason": "HTTP 400: Max entry size exceeded", "records": 4}
        ]
        assert body["total_records"] == 5 and body["next_offset"] == 3
        assert [r["entries"] for r in body["records"]] == [1, 2, 3]
        assert len(body["records"][2]["sample"]) == 3  # bounded sample

        status, body = await client.get("/v1/admin/dlq?limit=3&offset=3")
        assert [r["token"] for r in body["records"]] == ["payments-api", "user-service"]
        assert body["next_offset"] is None
        sample_line = body["records"][1]["sample"][0]["line"]
        assert len(sample_line) <= 500  # lines are cut

        status, body = await client.get("/v1/admin/dlq?token=user-service")
        assert [k["token"] for k in body["keys"]] == ["user-service"]
        assert body["records"][0]["status"] == 400 and body["total_records"] == 1

        # A name no key, WAL or queue has is a typo, not an empty queue (as flush says).
        status, body = await client.get("/v1/admin/dlq?token=nobody")
        assert status == 404 and body["error"] == "not_found"
        assert body["details"] == {"token": "nobody"}


@pytest.mark.parametrize(
    "query", ["token=../etc", "token=", "limit=0", "limit=501", "limit=x", "offset=-1"]
)
async def test_list_rejects_bad_parameters(tmp_path: Path, query: str) -> None:
    async with admin_app(tmp_path) as (client, _):
        status, body = await client.get(f"/v1/admin/dlq?{query}")
        assert status == 400 and body["error"] == "validation_error"


async def test_replay_needs_a_running_forwarder_and_a_valid_body(tmp_path: Path) -> None:
    async with admin_app(tmp_path) as (client, _):
        for bad in (b"{", {"token": 1}, {"token": "a", "extra": 1}, {"token": "../x"}, []):
            status, body = await client.post("/v1/admin/dlq/replay", bad)
            assert status == 400, bad
        status, body = await client.post("/v1/admin/dlq/replay", {"token": "nobody"})
        assert status == 404 and body["error"] == "not_found"
        status, body = await client.post("/v1/admin/dlq/replay", {"token": "payments-api"})
        assert status == 503 and body["error"] == "unavailable"


async def test_replay_delivers_removes_and_reports(tmp_path: Path) -> None:
    rx = LokiReceiver(max_line_size_bytes=100)
    transport = ReceiverTransport({"http://loki": rx})
    async with admin_app(tmp_path) as (client, service):
        forwarder = LokiForwarder(service.context, transport, EndpointPool(["http://loki"]))
        service.context.services["forwarder"] = forwarder
        queue = queue_of(service)
        await queue.append(record("payments-api", 3))
        long_line = json.dumps({"message": "L" * 200})
        await queue.append(
            make_dead_letter(
                "payments-api", None, 400, "too long", [(item(9, long_line), "", False)]
            )
        )

        # Loki refuses the long line again: 502, the short ones are delivered and leave.
        status, body = await client.post("/v1/admin/dlq/replay", {"token": "payments-api"})
        assert status == 502 and body["error"] == "replay_incomplete"
        details = body["details"]
        assert details["replayed_records"] == 1 and details["replayed_entries"] == 3
        assert details["refused_again_entries"] == 1 and details["remaining_entries"] == 1
        [kept] = await queue.read("payments-api")
        assert kept.replay_attempts == 1 and "Max entry size" in (kept.last_replay_error or "")
        assert {p.tenant for p in rx.push_log} == {"team-a"}  # the key's current tenant

        # Loki unreachable: kept, 502 with the reason.
        transport.down.add("http://loki")
        status, body = await client.post("/v1/admin/dlq/replay", {"token": "payments-api"})
        assert status == 502 and "ConnectError" in body["message"]
        assert len(await queue.read("payments-api")) == 1

        # Fixed: everything leaves; a second replay has nothing to do.
        transport.down.clear()
        rx.max_line_size_bytes = 1000
        status, body = await client.post("/v1/admin/dlq/replay", {"token": "payments-api"})
        assert status == 200 and body["replayed_entries"] == 1 and body["remaining_records"] == 0
        assert await queue.read("payments-api") == []
        status, body = await client.post("/v1/admin/dlq/replay", {"token": "payments-api"})
        assert status == 200 and body["replayed_records"] == 0
        status, body = await client.get("/v1/admin/dlq")
        assert body["keys"] == []
    assert rx.entry_count == 4 and rx.duplicates == 0
    metric = service.context.metrics.registry.get_sample_value(
        "loki_entries_forwarded_total", {"token": "payments-api"}
    )
    assert metric == 4


async def test_concurrent_replay_of_one_key_is_409(tmp_path: Path) -> None:
    rx = LokiReceiver()
    rx.delay_s = 0.5
    transport = ReceiverTransport({"http://loki": rx})
    async with admin_app(tmp_path) as (client, service):
        forwarder = LokiForwarder(service.context, transport, EndpointPool(["http://loki"]))
        service.context.services["forwarder"] = forwarder
        await queue_of(service).append(record("payments-api", 1))
        results: list[int] = []

        async def replay() -> None:
            results.append(
                (await client.post("/v1/admin/dlq/replay", {"token": "payments-api"}))[0]
            )

        async with trio.open_nursery() as nursery:
            nursery.start_soon(replay)
            await trio.sleep(0.1)
            nursery.start_soon(replay)
        assert sorted(results) == [200, 409]


async def test_drop_removes_records_for_good_and_says_what_it_did(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A record Loki will never take (too old) could only be edited out of the file by hand;
    replaying it failed forever and kept it listed."""
    async with admin_app(tmp_path) as (client, service):
        queue = queue_of(service)
        records = [record("payments-api", n) for n in (1, 2, 3)]
        for each in records:
            await queue.append(each)
        ids = [records[0].id, records[2].id, "no-such-id", records[0].id]
        with caplog.at_level("WARNING", logger="logstack.admin"):
            status, body = await client.post(
                "/v1/admin/dlq/drop", {"token": "payments-api", "ids": ids}
            )
        assert status == 200, body
        assert body == {
            "token": "payments-api",
            "dropped_records": 2,
            "dropped_entries": 4,
            "not_found": ["no-such-id"],
        }
        assert [r.id for r in await queue.read("payments-api")] == [records[1].id]
        [logged] = [r for r in caplog.records if "dropped" in r.getMessage()]
        assert logged.ids == [records[0].id, records[2].id]  # type: ignore[attr-defined]
        assert (logged.records, logged.entries) == (2, 4)  # type: ignore[attr-defined]
        # Again: nothing left to drop, no harm done.
        status, body = await client.post(
            "/v1/admin/dlq/drop", {"token": "payments-api", "ids": ids[:2]}
        )
        assert status == 200 and body["dropped_records"] == 0
        assert body["not_found"] == ids[:2]
        status, body = await client.get("/v1/admin/dlq?token=payments-api")
        assert body["total_records"] == 1 and body["keys"][0]["entries"] == 2


@pytest.mark.parametrize(
    "bad",
    [
        b"{",
        {"token": "payments-api"},
        {"token": "payments-api", "ids": []},
        {"token": "payments-api", "ids": [""]},
        {"token": "payments-api", "ids": ["x" * 65]},
        {"token": "payments-api", "ids": ["x"] * 501},
        {"token": "payments-api", "ids": "abc"},
        {"token": "../x", "ids": ["abc"]},
        {"token": "payments-api", "ids": ["abc"], "all": True},
    ],
)
async def test_drop_refuses_a_bad_body(tmp_path: Path, bad: Any) -> None:
    async with admin_app(tmp_path) as (client, service):
        await queue_of(service).append(record("payments-api", 1))
        status, body = await client.post("/v1/admin/dlq/drop", bad)
        assert status == 400 and body["error"] == "validation_error", body
        assert len(await queue_of(service).read("payments-api")) == 1


async def test_drop_needs_a_known_key_the_admin_token_and_no_replay_running(
    tmp_path: Path,
) -> None:
    rx = LokiReceiver()
    rx.delay_s = 0.5
    transport = ReceiverTransport({"http://loki": rx})
    async with admin_app(tmp_path) as (client, service):
        kept = record("payments-api", 1)
        await queue_of(service).append(kept)
        asked = {"token": "payments-api", "ids": [kept.id]}
        assert (await client.post("/v1/admin/dlq/drop", asked, token=None))[0] == 401
        assert (await client.post("/v1/admin/dlq/drop", asked, token=API_TOKEN))[0] == 403
        status, body = await client.post("/v1/admin/dlq/drop", {**asked, "token": "nobody"})
        assert status == 404 and body["details"] == {"token": "nobody"}
        forwarder = LokiForwarder(service.context, transport, EndpointPool(["http://loki"]))
        service.context.services["forwarder"] = forwarder
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.post, "/v1/admin/dlq/replay", {"token": "payments-api"})
            await trio.sleep(0.1)
            status, body = await client.post("/v1/admin/dlq/drop", asked)
            assert status == 409 and body["error"] == "conflict"
        assert await queue_of(service).read("payments-api") == []  # the replay delivered it


async def test_the_file_stays_private_and_keeps_no_credential(tmp_path: Path) -> None:
    """A rewrite (after a drop or a replay) made the file 0644 under the usual umask, and a
    Loki (or proxy) that echoed the push's ``Authorization`` left the Loki credentials in
    the file and the admin listing (a secrets audit)."""
    queue = DeadLetterQueue(tmp_path)
    echoed = "HTTP 400: bad request; you sent Authorization: Bearer loki-secret-0123456789"
    first = record("payments-api", 1, reason=echoed)
    await queue.append(first)
    await queue.append(record("payments-api", 2))
    path = tmp_path / "payments-api" / DLQ_FILE
    assert "loki-secret" not in path.read_text()
    assert "Bearer <redacted>" in (await queue.read("payments-api"))[0].reason
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    await queue.drop("payments-api", [first.id])
    assert path.stat().st_mode & 0o777 == 0o600
    assert len(await queue.read("payments-api")) == 1


async def test_a_replay_cancelled_half_way_keeps_what_it_replayed(tmp_path: Path) -> None:
    """An admin client that gives up (the request is cancelled with it) once stopped the
    replay with nothing written: every record stayed and the next replay pushed them all
    again."""
    rx = LokiReceiver()
    rx.delay_s = 0.2
    transport = ReceiverTransport({"http://loki": rx})
    async with admin_app(tmp_path) as (_, service):
        forwarder = LokiForwarder(service.context, transport, EndpointPool(["http://loki"]))
        queue = queue_of(service)
        records = [record("payments-api", 1, line=f"line {i}") for i in range(3)]
        for dead in records:
            await queue.append(dead)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(forwarder.replay, "payments-api")
            await rx.wait_for_pushes(1)
            nursery.cancel_scope.cancel()
        left = await queue.read("payments-api")
        assert [r.id for r in left] == [r.id for r in records[1:]]
        await forwarder.replay("payments-api")
        assert await queue.read("payments-api") == []
    assert rx.lines() == ["line 0", "line 1", "line 2"] and rx.duplicates == 0


async def test_a_replay_gets_an_answer_about_every_stream_of_a_record(tmp_path: Path) -> None:
    """Loki's 400 names the refused entries of the last stream only: a record with refused
    entries in two streams, pushed again whole, came back with the other stream's entries
    "unconfirmed" at every replay and never left the queue. One stream per push instead."""
    hours_behind = -2 * 3600 * 10**9
    rx = LokiReceiver()
    transport = ReceiverTransport({"http://loki": rx})
    async with admin_app(tmp_path) as (_, service):
        forwarder = LokiForwarder(service.context, transport, EndpointPool(["http://loki"]))
        queue = queue_of(service)
        new = [item(1, level="INFO"), item(2, level="ERROR")]
        old = [item(hours_behind, level="INFO"), item(hours_behind + 1, level="ERROR")]
        # The new entries reach Loki (as their first push did), the old ones never can.
        await queue.append(
            make_dead_letter("payments-api", None, 400, "x", [(i, "", True) for i in new])
        )
        await forwarder.replay("payments-api")
        assert rx.entry_count == 2 and await queue.read("payments-api") == []
        dead = [(i, "", True) for i in (*old, *new)]
        await queue.append(make_dead_letter("payments-api", None, 400, "too far behind", dead))
        report = await forwarder.replay("payments-api")
        [kept] = await queue.read("payments-api")
        assert sorted(kept.items()) == sorted(old)
        assert kept.unconfirmed == 0
        assert all("too far behind" in e.reason for s in kept.streams for e in s.entries)
        assert report.refused_again_entries == 2 and report.remaining_entries == 2
    assert rx.entry_count == 2 and rx.duplicates == 2
