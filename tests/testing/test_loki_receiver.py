"""The Loki-compatible receiver, driven over real HTTP on loopback."""

from __future__ import annotations

import gc
import gzip
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

import logstack.testing
import logstack.testing.loki as loki_process
from logstack._loki_proto import (
    PushEntry,
    PushStream,
    compress_snappy,
    encode_json_push,
    encode_push_request,
)
from logstack.testing import LokiReceiver, open_loki_receiver
from logstack.testing._process import LokiReceiverProcess

PUSH = "/loki/api/v1/push"
NOW = time.time_ns()
HOUR = 3600 * 10**9
PROTO = {"content-type": "application/x-protobuf"}
JSON = {"content-type": "application/json"}


def stream(labels: dict[str, str], *entries: tuple[int, str]) -> PushStream:
    return PushStream(labels, [PushEntry(ts, line) for ts, line in entries])


async def push_proto(
    client: httpx.AsyncClient, *streams: PushStream, **headers: str
) -> httpx.Response:
    body = compress_snappy(encode_push_request(streams))
    return await client.post(PUSH, content=body, headers={**PROTO, **headers})


async def push_json(
    client: httpx.AsyncClient, *streams: PushStream, gzipped: bool = False
) -> httpx.Response:
    body = encode_json_push(streams)
    headers = dict(JSON)
    if gzipped:
        body = gzip.compress(body)
        headers["content-encoding"] = "gzip"
    return await client.post(PUSH, content=body, headers=headers)


@pytest.fixture
async def rx() -> AsyncIterator[LokiReceiver]:
    async with open_loki_receiver() as receiver:
        yield receiver


@pytest.fixture
async def client(rx: LokiReceiver) -> AsyncIterator[httpx.AsyncClient]:
    assert rx.url is not None
    async with httpx.AsyncClient(base_url=rx.url, timeout=10) as c:
        yield c


def test_exports() -> None:
    for name in logstack.testing.__all__:
        assert getattr(logstack.testing, name) is not None
    assert {"LokiReceiver", "open_loki_receiver"} <= set(logstack.testing.__all__)


# ----------------------------------------------------------------------------- accepted pushes


async def test_protobuf_snappy_push_is_stored(rx: LokiReceiver, client: httpx.AsyncClient) -> None:
    assert rx.url is not None and rx.url.startswith("http://127.0.0.1:")
    s = PushStream(
        {"service": "api", "env": "prod", "level": "INFO"},
        [PushEntry(NOW, '{"message":"a"}', {"trace_id": "t1"}), PushEntry(NOW + 1, "b")],
    )
    r = await push_proto(client, s, **{"X-Scope-OrgID": "tenant-1", "User-Agent": "logstack/0"})
    assert r.status_code == 204
    assert r.content == b""
    assert rx.streams == {'{env="prod", level="INFO", service="api"}': s.entries}
    assert rx.entries() == [(s.labels, e) for e in s.entries]
    assert rx.lines() == ['{"message":"a"}', "b"]
    assert rx.received_headers["x-scope-orgid"] == "tenant-1"
    assert rx.received_headers["user-agent"] == "logstack/0"
    assert rx.pushes == 1
    assert rx.status_counts == {204: 1}


async def test_json_push(rx: LokiReceiver, client: httpx.AsyncClient) -> None:
    s = PushStream({"app": "x"}, [PushEntry(NOW, "one", {"k": "v"}), PushEntry(NOW + 5, "two")])
    r = await push_json(client, s)
    assert r.status_code == 204
    assert rx.entries() == [({"app": "x"}, e) for e in s.entries]


async def test_gzip_json_push(rx: LokiReceiver, client: httpx.AsyncClient) -> None:
    r = await push_json(client, stream({"app": "x"}, (NOW, "zipped")), gzipped=True)
    assert r.status_code == 204
    assert rx.lines() == ["zipped"]


async def test_json_content_type_with_charset_and_no_content_type_is_protobuf(
    rx: LokiReceiver, client: httpx.AsyncClient
) -> None:
    body = encode_json_push([stream({"app": "x"}, (NOW, "j"))])
    r = await client.post(
        PUSH, content=body, headers={"content-type": "application/json; charset=utf-8"}
    )
    assert r.status_code == 204
    # Loki's rule: anything but application/json is snappy protobuf, even without a type.
    proto = compress_snappy(encode_push_request([stream({"app": "x"}, (NOW + 1, "p"))]))
    r = await client.post(PUSH, content=proto)
    assert r.status_code == 204
    assert rx.lines() == ["j", "p"]


async def test_streams_are_keyed_by_canonical_labels(
    rx: LokiReceiver, client: httpx.AsyncClient
) -> None:
    await push_json(client, stream({"b": "2", "a": "1"}, (1, "x")))
    raw = b'{b="2",a="1"}'  # unsorted, no spaces: still the same stream
    data = b"\x0a" + bytes([2 + len(raw) + 2 + 2]) + b"\x0a" + bytes([len(raw)]) + raw
    data += b"\x12\x02\x12\x00"  # one entry: no timestamp field (epoch), empty line
    r = await client.post(PUSH, content=compress_snappy(data), headers=PROTO)
    assert r.status_code == 204
    assert list(rx.streams) == ['{a="1", b="2"}']
    assert len(rx.streams['{a="1", b="2"}']) == 2


async def test_duplicates_are_accepted_but_stored_once(
    rx: LokiReceiver, client: httpx.AsyncClient
) -> None:
    s = stream({"app": "x"}, (NOW, "a"), (NOW, "b"), (NOW + 1, "a"))
    assert (await push_proto(client, s)).status_code == 204
    assert (await push_proto(client, s)).status_code == 204
    assert (await push_json(client, s)).status_code == 204
    assert rx.lines() == ["a", "b", "a"]  # same timestamp, different line: both kept
    assert rx.duplicates == 6
    assert rx.status_counts == {204: 3}


_pushed_entries = st.lists(
    st.builds(
        PushEntry,
        # A few seconds, so that pushes repeat entries and fall behind the window.
        timestamp_ns=st.integers(0, 12).map(lambda s: NOW + s * 10**9),
        line=st.sampled_from(["a", "b", "probe-1 x", "probe-2", "c probe-1"]),
    ),
    max_size=6,
)


@given(
    st.lists(st.tuples(st.sampled_from(["x", "y"]), _pushed_entries), max_size=6),
    st.sampled_from([None, 0.0, 5.0]),
)
@settings(max_examples=300)
def test_storing_a_stream_whole_is_the_same_as_entry_by_entry(
    pushes: list[tuple[str, list[PushEntry]]], window_s: float | None
) -> None:
    """A stream is stored in bulk when entry by entry would store every one of its entries
    (``_store_whole``); pushes with duplicates or entries behind the window must leave the
    same answers, entries, counts and probes as the entry-by-entry path alone."""
    bulk = LokiReceiver(out_of_order_window_s=window_s, probe_marker="probe-")
    one_by_one = LokiReceiver(out_of_order_window_s=window_s, probe_marker="probe-")
    one_by_one._store_whole = lambda *_: False  # type: ignore[method-assign]
    headers = {"content-type": "application/x-protobuf"}
    for app, entries in pushes:
        body = compress_snappy(encode_push_request([PushStream({"app": app}, entries)]))
        assert bulk._process(headers, body) == one_by_one._process(headers, body)
    assert bulk.streams == one_by_one.streams
    assert (bulk.entry_count, bulk.duplicates) == (one_by_one.entry_count, one_by_one.duplicates)
    assert set(bulk.probe_arrivals) == set(one_by_one.probe_arrivals)


def test_a_push_of_new_entries_is_stored_whole() -> None:
    rx = LokiReceiver()
    taken: list[bool] = []
    store_whole = rx._store_whole

    def spy(*args: Any) -> bool:
        taken.append(store_whole(*args))
        return taken[-1]

    rx._store_whole = spy  # type: ignore[method-assign]
    headers = {"content-type": "application/x-protobuf"}
    body = compress_snappy(encode_push_request([stream({"app": "x"}, (NOW, "a"), (NOW, "b"))]))
    assert rx._process(headers, body)[0] == 204
    assert (taken, rx.entry_count) == ([True], 2)
    assert rx._process(headers, body)[0] == 204  # all duplicates: decided entry by entry
    assert (taken, rx.entry_count, rx.duplicates) == ([True, False], 2, 2)


# ----------------------------------------------------------------------------- rejections


async def test_malformed_bodies_are_400_and_store_nothing(
    rx: LokiReceiver, client: httpx.AsyncClient
) -> None:
    cases = [
        (b"\x00\x01garbage", PROTO),  # not a snappy block
        (compress_snappy(b"\x0a\x05\x0a"), PROTO),  # snappy, but a truncated protobuf
        (b"{not json", JSON),
        (b'{"streams":[{"stream":{"a":"b"},"values":[[1,"x"]]}]}', JSON),
        (b"not gzip", {**JSON, "content-encoding": "gzip"}),
        (encode_json_push([stream({"a": "b"}, (NOW, "x"))]), {**JSON, "content-encoding": "br"}),
    ]
    for body, headers in cases:
        r = await client.post(PUSH, content=body, headers=headers)
        assert r.status_code == 400, (body, r.text)
        assert r.text
    assert rx.entry_count == 0
    assert rx.status_counts == {400: len(cases)}
    assert rx.last_error is not None and "br" in rx.last_error


async def test_push_without_streams_is_422(rx: LokiReceiver, client: httpx.AsyncClient) -> None:
    assert (await push_proto(client)).status_code == 422
    assert (await push_json(client)).status_code == 422


async def test_partial_acceptance_stores_valid_lines_and_answers_400(
    rx: LokiReceiver, client: httpx.AsyncClient
) -> None:
    big = "x" * (256 * 1024 + 1)
    r = await push_proto(
        client,
        stream({"app": "good"}, (NOW, "kept 1"), (NOW + 1, big), (NOW + 2, "kept 2")),
        stream({"foo-bar": "x"}, (NOW, "bad label name")),
        stream({}, (NOW, "no labels")),
        stream({"app": "other"}, (NOW, "kept 3")),
    )
    assert r.status_code == 400
    assert "Max entry size '262144' bytes exceeded" in r.text
    assert "'262145' bytes" in r.text
    assert "Error parsing labels '{foo-bar=\"x\"}'" in r.text
    assert "at least one label pair is required per stream" in r.text
    assert rx.lines() == ["kept 1", "kept 2", "kept 3"]
    assert rx.status_counts == {400: 1}


async def test_partial_acceptance_json_invalid_label_name(
    rx: LokiReceiver, client: httpx.AsyncClient
) -> None:
    r = await push_json(
        client, stream({"app": "ok"}, (NOW, "kept")), stream({"a.b": "1"}, (NOW, "dropped"))
    )
    assert r.status_code == 400
    assert "a.b" in r.text
    assert rx.lines() == ["kept"]


async def test_line_exactly_max_size_is_accepted(
    rx: LokiReceiver, client: httpx.AsyncClient
) -> None:
    line = "é" * (128 * 1024)  # 256 KiB of UTF-8 in 128 Ki characters
    assert (await push_proto(client, stream({"a": "b"}, (NOW, line)))).status_code == 204
    r = await push_proto(client, stream({"a": "b"}, (NOW + 1, line + "x")))
    assert r.status_code == 400
    assert "'262145' bytes" in r.text


async def test_label_limits(client: httpx.AsyncClient, rx: LokiReceiver) -> None:
    labels = {f"l{i}": "v" for i in range(16)}
    r = await push_proto(client, stream(labels, (NOW, "x")))
    assert r.status_code == 400
    assert "has 16 label names; limit 15" in r.text
    r = await push_proto(client, stream({"a": "v" * 2049}, (NOW, "x")))
    assert r.status_code == 400
    assert "label value too long" in r.text
    assert rx.entry_count == 0


async def test_out_of_order_window(rx: LokiReceiver, client: httpx.AsyncClient) -> None:
    assert (await push_proto(client, stream({"app": "x"}, (NOW, "newest")))).status_code == 204
    # Within max_chunk_age / 2 = 1 h of the newest entry: accepted out of order.
    r = await push_proto(client, stream({"app": "x"}, (NOW - HOUR + 10**9, "59 min older")))
    assert r.status_code == 204
    # Older than that: rejected; other entries of the same push and stream still land.
    r = await push_proto(
        client,
        stream({"app": "x"}, (NOW - 2 * HOUR, "2 h older"), (NOW + 1, "in order")),
        stream({"app": "y"}, (NOW - 5 * HOUR, "another stream has its own window")),
    )
    assert r.status_code == 400
    assert "entry too far behind" in r.text
    assert 'total ignored: 1 out of 2 for stream: {app="x"}' in r.text
    assert rx.lines() == ["newest", "59 min older", "in order", "another stream has its own window"]


async def test_out_of_order_window_applies_within_one_push(
    rx: LokiReceiver, client: httpx.AsyncClient
) -> None:
    r = await push_json(client, stream({"app": "x"}, (NOW, "a"), (NOW - 2 * HOUR, "b")))
    assert r.status_code == 400
    assert rx.lines() == ["a"]


async def test_ordered_writes_and_any_order() -> None:
    async with (
        open_loki_receiver(out_of_order_window_s=0) as ordered,
        open_loki_receiver(out_of_order_window_s=None) as anything,
        httpx.AsyncClient() as c,
    ):
        for r, expected in ((ordered, 400), (anything, 204)):
            s = stream({"a": "b"}, (NOW, "x"), (NOW - 1, "older"), (NOW - 10 * HOUR, "much older"))
            body = compress_snappy(encode_push_request([s]))
            resp = await c.post(f"{r.url}{PUSH}", content=body, headers=PROTO)
            assert resp.status_code == expected
        assert ordered.lines() == ["x"]
        assert anything.lines() == ["x", "older", "much older"]


async def test_push_over_the_burst_is_429_and_stores_nothing(
    rx: LokiReceiver, client: httpx.AsyncClient
) -> None:
    # 6 MiB default burst: 25 lines of 250 KiB (each under max_line_size) is ~6.1 MiB.
    line = "y" * (250 * 1024)
    s = stream({"app": "x"}, *((NOW + i, line) for i in range(25)))
    r = await push_proto(client, s)
    assert r.status_code == 429
    assert "Ingestion rate limit exceeded for user fake" in r.text
    assert rx.entry_count == 0
    r = await push_proto(client, stream({"app": "x"}, *((NOW + i, line) for i in range(24))))
    assert r.status_code == 204
    assert rx.entry_count == 24


async def test_burst_counts_validated_lines_and_metadata() -> None:
    async with (
        open_loki_receiver(burst_limit_bytes=100) as rx,
        httpx.AsyncClient(base_url=rx.url or "") as c,
    ):
        ok = PushStream({"a": "b"}, [PushEntry(NOW, "x" * 90, {"k": "123456789"})])  # 100
        assert (await push_proto(c, ok)).status_code == 204
        over = PushStream({"a": "b"}, [PushEntry(NOW + 1, "x" * 90, {"k": "1234567890"})])
        assert (await push_proto(c, over)).status_code == 429
        # An invalid (too long) line is rejected before the limiter and does not count.
        async with open_loki_receiver(burst_limit_bytes=100, max_line_size_bytes=50) as rx2:
            mixed = stream({"a": "b"}, (NOW, "x" * 60), (NOW + 1, "y" * 40))
            r = await c.post(
                f"{rx2.url}{PUSH}",
                content=compress_snappy(encode_push_request([mixed])),
                headers=PROTO,
            )
            assert r.status_code == 400
            assert rx2.lines() == ["y" * 40]


async def test_ingestion_rate_token_bucket() -> None:
    async with (
        open_loki_receiver(burst_limit_bytes=1000, ingestion_rate_bytes_per_s=1.0) as rx,
        httpx.AsyncClient(base_url=rx.url or "") as c,
    ):
        s = stream({"a": "b"}, (NOW, "x" * 600))
        assert (await push_proto(c, s)).status_code == 204
        s = stream({"a": "b"}, (NOW + 1, "x" * 600))
        assert (await push_proto(c, s)).status_code == 429  # bucket has ~400 left


async def test_per_stream_rate_limit(rx: LokiReceiver, client: httpx.AsyncClient) -> None:
    rx.rate_limit_lines_per_push = 2
    s = stream({"app": "x"}, *((NOW + i, f"l{i}") for i in range(5)))
    r = await push_proto(client, s, stream({"app": "y"}, (NOW, "y0")))
    assert r.status_code == 429
    assert "Per stream rate limit exceeded" in r.text
    assert rx.lines() == ["l0", "l1", "y0"]
    rx.rate_limit_lines_per_push = None
    assert (await push_proto(client, s)).status_code == 204  # the first two are duplicates
    assert rx.lines() == ["l0", "l1", "l2", "l3", "l4", "y0"]
    assert rx.duplicates == 2


async def test_require_tenant() -> None:
    async with (
        open_loki_receiver(require_tenant=True) as rx,
        httpx.AsyncClient(base_url=rx.url or "") as c,
    ):
        s = stream({"a": "b"}, (NOW, "x"))
        assert (await push_proto(c, s)).status_code == 401
        assert (await push_proto(c, s, **{"X-Scope-OrgID": "t"})).status_code == 204


async def test_tenants_share_no_stream(rx: LokiReceiver, client: httpx.AsyncClient) -> None:
    """Loki keeps an instance per tenant: the same labels in two tenants are two streams,
    each with its own duplicates and its own out-of-order window."""
    same = stream({"mt": "x"}, (NOW, "same line"))
    assert (await push_proto(client, same, **{"X-Scope-OrgID": "a"})).status_code == 204
    assert (await push_proto(client, same, **{"X-Scope-OrgID": "b"})).status_code == 204
    assert rx.duplicates == 0
    older = stream({"mt": "x"}, (NOW - 2 * HOUR, "older, but new to c"))
    assert (await push_proto(client, older, **{"X-Scope-OrgID": "c"})).status_code == 204
    assert (await push_proto(client, older, **{"X-Scope-OrgID": "a"})).status_code == 400
    assert sorted((t, e.line) for t, _, e in rx.tenant_entries()) == [
        ("a", "same line"),
        ("b", "same line"),
        ("c", "older, but new to c"),
    ]
    assert list(rx.tenant_streams["a"]) == ['{mt="x"}']
    assert (await client.get("/_receiver/stats")).json()["streams"] == 3
    assert {r["tenant"] for r in (await client.get("/_receiver/entries")).json()} == {"a", "b", "c"}
    with pytest.raises(ValueError, match="3 tenants"):
        _ = rx.streams


async def test_each_tenant_has_its_own_rate_limit() -> None:
    async with (
        open_loki_receiver(burst_limit_bytes=1000, ingestion_rate_bytes_per_s=1.0) as rx,
        httpx.AsyncClient(base_url=rx.url or "") as c,
    ):
        s = stream({"a": "b"}, (NOW, "x" * 600))
        assert (await push_proto(c, s, **{"X-Scope-OrgID": "a"})).status_code == 204
        assert (await push_proto(c, s, **{"X-Scope-OrgID": "b"})).status_code == 204
        again = stream({"a": "b"}, (NOW + 1, "x" * 600))
        r = await push_proto(c, again, **{"X-Scope-OrgID": "a"})
        assert r.status_code == 429 and "for user a " in r.text
        assert rx.entry_count == 2


# ----------------------------------------------------------------------------- switches


async def test_fail_next_counts_down(rx: LokiReceiver, client: httpx.AsyncClient) -> None:
    rx.fail_next(503, count=2)
    s = stream({"app": "x"}, (NOW, "a"))
    assert (await push_proto(client, s)).status_code == 503
    assert (await push_proto(client, s)).status_code == 503
    assert rx.entry_count == 0
    assert (await push_proto(client, s)).status_code == 204
    assert rx.lines() == ["a"]
    assert rx.status_counts == {503: 2, 204: 1}
    assert rx.pushes == 3


async def test_fail_next_until_cleared(rx: LokiReceiver, client: httpx.AsyncClient) -> None:
    rx.fail_next(429)
    for _ in range(4):
        assert (await push_json(client, stream({"a": "b"}, (NOW, "x")))).status_code == 429
    assert "429" in repr(rx)
    rx.clear_failures()
    assert (await push_json(client, stream({"a": "b"}, (NOW, "x")))).status_code == 204
    rx.fail_next(500, count=0)  # nothing to fail
    assert (await push_json(client, stream({"a": "b"}, (NOW, "x")))).status_code == 204
    rx.fail_next(400, count=1)
    assert (await push_json(client, stream({"a": "b"}, (NOW, "y")))).status_code == 400
    assert (await push_json(client, stream({"a": "b"}, (NOW, "y")))).status_code == 204
    assert rx.lines() == ["x", "y"]


async def test_delay_and_a_client_timeout(rx: LokiReceiver, client: httpx.AsyncClient) -> None:
    rx.delay_s = 0.3
    s = stream({"app": "x"}, (NOW, "slow"))
    start = trio.current_time()
    assert (await push_proto(client, s)).status_code == 204
    assert trio.current_time() - start >= 0.3
    # A client that gives up does not undo the push: Loki stores it anyway, and the
    # client's retry is then a duplicate.
    s2 = stream({"app": "x"}, (NOW + 1, "timed out"))
    with pytest.raises(httpx.ReadTimeout):
        body = compress_snappy(encode_push_request([s2]))
        await client.post(PUSH, content=body, headers=PROTO, timeout=0.05)
    await rx.wait_for_entries(2, timeout=5)
    rx.delay_s = 0
    assert (await push_proto(client, s2)).status_code == 204
    assert rx.lines() == ["slow", "timed out"]
    assert rx.duplicates == 1


async def test_ready_toggle_and_other_routes(rx: LokiReceiver, client: httpx.AsyncClient) -> None:
    r = await client.get("/ready")
    assert (r.status_code, r.text.strip()) == (200, "ready")
    rx.ready = False
    r = await client.get("/ready")
    assert r.status_code == 503
    rx.ready = True
    assert (await client.get("/ready")).status_code == 200
    info = (await client.get("/loki/api/v1/status/buildinfo")).json()
    assert "version" in info
    assert (await client.get("/loki/api/v1/query")).status_code == 404
    assert (await client.get(PUSH)).status_code == 405
    assert rx.pushes == 0


async def test_wait_for_entries_times_out_with_a_helpful_message(rx: LokiReceiver) -> None:
    rx.fail_next(500)
    with pytest.raises(TimeoutError, match=r"waited 0.1s for 3 stored entries: 0 entries stored"):
        await rx.wait_for_entries(3, timeout=0.1)


async def test_wait_for_entries_wakes_on_push(rx: LokiReceiver, client: httpx.AsyncClient) -> None:
    async with trio.open_nursery() as nursery:

        async def later() -> None:
            await trio.sleep(0.05)
            await push_proto(client, stream({"a": "b"}, (NOW, "1"), (NOW + 1, "2")))

        nursery.start_soon(later)
        await rx.wait_for_entries(2, timeout=5)
        await rx.wait_for_pushes(1, timeout=5)
    assert rx.entry_count == 2


async def test_reset(rx: LokiReceiver, client: httpx.AsyncClient) -> None:
    await push_proto(client, stream({"a": "b"}, (NOW, "1")))
    rx.reset()
    assert (rx.entry_count, rx.pushes, rx.streams, rx.status_counts) == (0, 0, {}, {})
    await push_proto(client, stream({"a": "b"}, (NOW, "1")))
    assert rx.lines() == ["1"]  # not a duplicate any more


# ----------------------------------------------------------------------------- outage


async def test_stop_and_restart_on_the_same_port() -> None:
    rx = LokiReceiver()
    async with httpx.AsyncClient(timeout=5) as c:
        async with open_loki_receiver(receiver=rx):
            url = rx.url
            port = rx.port
            r = await c.post(
                f"{url}{PUSH}",
                content=encode_json_push([stream({"a": "b"}, (NOW, "1"))]),
                headers=JSON,
            )
            assert r.status_code == 204
        assert "stopped" in repr(rx)
        # The outage: nothing listens on the port any more.
        with pytest.raises(httpx.TransportError):
            await c.post(f"{url}{PUSH}", content=b"", headers=JSON)
        # Back on the same port, with the same stored state (and the same client).
        async with open_loki_receiver(port=port or 0, receiver=rx):
            assert rx.url == url
            body = encode_json_push([stream({"a": "b"}, (NOW + 1, "2"))])
            r = await c.post(f"{url}{PUSH}", content=body, headers=JSON)
            assert r.status_code == 204
        assert rx.lines() == ["1", "2"]
        # A fresh receiver can take the port over too.
        async with open_loki_receiver(port=port or 0) as fresh:
            assert fresh.url == url
            r = await c.get(f"{url}/ready")
            assert r.status_code == 200
            assert fresh.entry_count == 0


async def test_errors_leave_the_context_manager_unwrapped(rx: LokiReceiver) -> None:
    with pytest.raises(ZeroDivisionError):
        async with open_loki_receiver():
            _ = 1 / 0
    with pytest.raises(OSError):  # the port is taken
        async with open_loki_receiver(port=rx.port or 0):
            pass  # pragma: no cover


async def test_stopping_is_prompt_with_idle_and_busy_connections(
    rx: LokiReceiver, client: httpx.AsyncClient
) -> None:
    receiver = LokiReceiver()
    async with (
        open_loki_receiver(receiver=receiver),
        httpx.AsyncClient(base_url=receiver.url or "") as c,
    ):
        assert (await c.get("/ready")).status_code == 200  # one idle keep-alive connection
        receiver.delay_s = 30
        async with trio.open_nursery() as nursery:

            async def slow_push() -> None:
                with pytest.raises(httpx.RemoteProtocolError):  # cut by the stop
                    await push_json(c, stream({"a": "b"}, (NOW, "x")))

            nursery.start_soon(slow_push)
            with trio.fail_after(5):
                while receiver.pushes < 1:  # arrived, now sleeping in the delay
                    await trio.sleep(0.01)
            start = trio.current_time()
            receiver.stop()
    assert trio.current_time() - start < 2
    assert receiver.entry_count == 0


async def test_serving_twice_at_once_is_an_error(rx: LokiReceiver) -> None:
    with pytest.raises(RuntimeError, match="already serving"):
        async with open_loki_receiver(receiver=rx):
            pass  # pragma: no cover


async def test_receiver_over_http_control(rx: LokiReceiver, client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/_receiver/control", json={"fail_next_status": 503, "fail_next_count": 1}
    )
    assert r.status_code == 204
    s = stream({"a": "b"}, (NOW, "x"))
    assert (await push_proto(client, s)).status_code == 503
    assert (await push_proto(client, s)).status_code == 204
    r = await client.post("/_receiver/control", json={"ready": False, "delay_s": 0.0})
    assert r.status_code == 204
    assert rx.ready is False
    r = await client.post("/_receiver/control", json={"bogus": 1})
    assert r.status_code == 400
    stats = (await client.get("/_receiver/stats")).json()
    assert stats["entries"] == 1
    assert stats["status_counts"] == {"204": 1, "503": 1}
    entries = (await client.get("/_receiver/entries")).json()
    assert entries == [
        {
            "tenant": "fake",
            "labels": {"a": "b"},
            "timestamp_ns": NOW,
            "line": "x",
            "structured_metadata": {},
        }
    ]


async def test_stats_tell_when_the_first_and_last_pushes_stored_entries(
    rx: LokiReceiver, client: httpx.AsyncClient
) -> None:
    stats = (await client.get("/_receiver/stats")).json()
    assert stats["first_stored_ns"] is None and stats["last_stored_ns"] is None
    rx.fail_next(503, 1)
    assert (await push_proto(client, stream({"a": "b"}, (NOW, "x")))).status_code == 503
    # A refused push and a push of nothing new store nothing: neither counts.
    assert (await client.get("/_receiver/stats")).json()["first_stored_ns"] is None
    before = time.time_ns()
    first = stream({"a": "b"}, (NOW, "x"), (NOW + 1, "y"))
    assert (await push_proto(client, first)).status_code == 204
    assert (await push_proto(client, first)).status_code == 204  # duplicates only
    stats = (await client.get("/_receiver/stats")).json()
    assert stats["first_stored_entries"] == 2
    assert before <= stats["first_stored_ns"] == stats["last_stored_ns"] <= time.time_ns()
    # When it began serving: before anything could reach it (the bench's drain starts there).
    assert stats["serving_since_ns"] is not None and stats["serving_since_ns"] <= before
    assert (await push_proto(client, stream({"a": "b"}, (NOW + 2, "z")))).status_code == 204
    later = (await client.get("/_receiver/stats")).json()
    assert later["first_stored_ns"] == stats["first_stored_ns"]
    assert later["first_stored_entries"] == 2
    assert later["last_stored_ns"] > stats["last_stored_ns"]
    rx.reset()
    assert rx.statistics()["first_stored_ns"] is None
    assert rx.statistics()["serving_since_ns"] == stats["serving_since_ns"]


# ----------------------------------------------------------------------------- the CLI


async def test_cli_process_port_file_entries_and_dump(tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    dump = tmp_path / "dump.jsonl"
    stderr = (tmp_path / "stderr").open("wb")
    cmd = [
        sys.executable,
        "-m",
        "logstack.testing.loki",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--port-file",
        str(port_file),
        "--dump",
        str(dump),
    ]
    proc = await trio.lowlevel.open_process(cmd, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        with trio.fail_after(20):
            while not port_file.exists():
                assert proc.poll() is None, (tmp_path / "stderr").read_text()
                await trio.sleep(0.05)
        port = int(port_file.read_text())
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as c:
            s = PushStream({"service": "api"}, [PushEntry(NOW, "from a test", {"k": "v"})])
            r = await c.post(PUSH, content=compress_snappy(encode_push_request([s])), headers=PROTO)
            assert r.status_code == 204
            expected = {
                "tenant": "fake",
                "labels": {"service": "api"},
                "timestamp_ns": NOW,
                "line": "from a test",
                "structured_metadata": {"k": "v"},
            }
            assert (await c.get("/_receiver/entries")).json() == [expected]
        proc.send_signal(signal.SIGTERM)
        with trio.fail_after(20):
            assert await proc.wait() == 0
        assert [json.loads(line) for line in dump.read_text().splitlines()] == [expected]
    finally:
        if proc.poll() is None:
            proc.kill()
            await proc.wait()
        stderr.close()


async def test_cli_sigint_exits_cleanly(tmp_path: Path) -> None:
    port_file = tmp_path / "port"
    cmd = [sys.executable, "-m", "logstack.testing.loki", "--port-file", str(port_file)]
    proc = await trio.lowlevel.open_process(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        with trio.fail_after(20):
            while not port_file.exists():
                await trio.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        with trio.fail_after(20):
            assert await proc.wait() == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            await proc.wait()


def test_the_receiver_process_leaves_out_full_collections(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its store grows by every push: the process never walks all of it (``loki.main``)."""
    served: list[object] = []
    monkeypatch.setattr(loki_process.trio, "run", lambda _run, args: served.append(args))
    before = gc.get_threshold()
    try:
        assert loki_process.main(["--port", "0"]) == 0
        assert gc.get_threshold() == (*before[:2], loki_process.FULL_COLLECTIONS_AFTER)
    finally:
        gc.set_threshold(*before)
    assert len(served) == 1


async def test_probe_marker_records_arrival_times() -> None:
    async with open_loki_receiver(probe_marker="probe-") as rx:
        assert rx.url is not None
        async with httpx.AsyncClient(base_url=rx.url, timeout=10) as client:
            before = time.time_ns()
            lines = ["probe-000000042 first", "no marker", "x probe-7 y", "probe- no digits"]
            stream = PushStream(
                {"app": "x"}, [PushEntry(NOW + i, line) for i, line in enumerate(lines)]
            )
            assert (await push_json(client, stream)).status_code == 204
            probes = (await client.get("/_receiver/probes")).json()
    assert set(probes) == {"000000042", "7"}
    assert all(before <= at <= time.time_ns() for at in probes.values())
    assert rx.entry_count == 4  # probing changes nothing about what is stored


def test_the_process_form_takes_loki_auth_and_age_limits(tmp_path: Path) -> None:
    """``auth_enabled`` (401 without a tenant) and the two age limits, from the command line."""
    proc = LokiReceiverProcess(
        tmp_path,
        extra_args=[
            "--require-tenant",
            "--reject-old-samples-max-age-s",
            "3600",
            "--creation-grace-period-s",
            "600",
        ],
    )
    url = proc.start()
    try:
        fresh = compress_snappy(encode_push_request([stream({"a": "b"}, (time.time_ns(), "x"))]))
        assert httpx.post(url + PUSH, content=fresh, headers=PROTO).status_code == 401
        tenant = {**PROTO, "X-Scope-OrgID": "t"}
        assert httpx.post(url + PUSH, content=fresh, headers=tenant).status_code == 204
        for ts, reason in (
            (time.time_ns() - 2 * HOUR, "too old"),
            (time.time_ns() + HOUR, "too new"),
        ):
            body = compress_snappy(encode_push_request([stream({"a": "b"}, (ts, "y"))]))
            answer = httpx.post(url + PUSH, content=body, headers=tenant)
            assert answer.status_code == 400 and f"timestamp {reason}" in answer.text
    finally:
        proc.stop()
