"""The ``validate`` stage on real envelopes: JSON body in, ``LogEntry`` list or rejection out."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
import trio

from logstack._config import load_settings
from logstack._context import StageContext
from logstack._entry import LogEntry
from logstack._envelope import Envelope
from logstack._errors import ValidationError
from logstack._stage import StageConfig
from stages.validate import ValidateStage

ENTRY: dict[str, Any] = {
    "timestamp": "2025-09-24T12:00:00.123456789Z",
    "level": "error",
    "message": "Payment failed",
    "service": "payments-api",
    "env": "prod",
    "labels": [],
    "metadata": {"order_id": "O-123", "amount": 12000},
}


def make_stage(env: dict[str, str] | None = None) -> ValidateStage:
    context = StageContext(settings=load_settings(env=env or {}))
    return ValidateStage(StageConfig(), context)


def envelope(body: Any, request_id: str = "req-1") -> Envelope:
    raw = body if isinstance(body, bytes) else msgspec.json.encode(body)
    return Envelope(request_id=request_id, authorization="Bearer x", body=raw)


def test_valid_body_fills_entries() -> None:
    env = envelope({"entries": [ENTRY, {**ENTRY, "level": "CRITICAL", "labels": {"env": "x"}}]})
    make_stage().process(env)
    assert env.entries == [
        LogEntry(
            timestamp_ns=1_758_715_200_123_456_789,
            level="ERROR",
            message="Payment failed",
            service="payments-api",
            env="prod",
            labels={},
            metadata={"order_id": "O-123", "amount": 12000},
            timestamp="2025-09-24T12:00:00.123456789Z",
        ),
        LogEntry(
            timestamp_ns=1_758_715_200_123_456_789,
            level="FATAL",
            message="Payment failed",
            service="payments-api",
            env="prod",
            labels={},
            metadata={"order_id": "O-123", "amount": 12000},
            timestamp="2025-09-24T12:00:00.123456789Z",
        ),
    ]
    assert env.pending  # validate does not answer a valid request; the WAL stage does


def test_invalid_entry_rejects_the_whole_request() -> None:
    env = envelope({"entries": [ENTRY, {**ENTRY, "level": "LOUD", "surprise": 1}]})
    with pytest.raises(ValidationError) as info:
        make_stage().process(env)
    assert info.value.body()["details"] == {
        "errors": [
            {"field": "entries[1].surprise", "message": "unknown field"},
            {
                "field": "entries[1].level",
                "message": "must be one of TRACE, DEBUG, INFO, WARN (or WARNING), ERROR, "
                "FATAL (or CRITICAL), in any letter case",
            },
        ]
    }
    assert env.entries is None


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "malformed_json"),
        (b'{"entries": [{"message": "bad \xff"}]}', "malformed_json"),
        (b'{"entries": {}}', "schema"),
        (b'{"entries": []}', "schema"),
        (b'{"entries": [1], "extra": true}', "schema"),
    ],
)
def test_body_shape_errors_are_validation_errors(body: bytes, reason: str) -> None:
    with pytest.raises(ValidationError) as info:
        make_stage().process(envelope(body))
    assert info.value.reason == reason


def test_deeply_nested_body_is_a_validation_error() -> None:
    body = b'{"entries": [{"metadata": ' + b"[" * 5000 + b"]" * 5000 + b"}]}"
    with pytest.raises(ValidationError):
        make_stage().process(envelope(body))


def test_reload_picks_up_new_schema_settings() -> None:
    stage = make_stage()
    labelled = {**ENTRY, "labels": {"team": "core"}}
    with pytest.raises(ValidationError):
        stage.process(envelope({"entries": [labelled]}))
    stage.reload(load_settings(env={"LOGSTACK_SCHEMA_LABEL_ALLOWLIST": "[team]"}))
    env = envelope({"entries": [labelled]})
    stage.process(env)
    assert env.entries is not None
    assert env.entries[0].labels == {"team": "core"}
    with pytest.raises(ValidationError) as info:
        stage.process(envelope({"entries": [{**ENTRY, "labels": {"region": "eu"}}]}))
    assert "allowed: team" in info.value.message


async def test_stage_loop_passes_valid_and_answers_invalid_requests() -> None:
    """Through the runtime's default ``run`` loop, as the pipeline drives it."""
    stage = make_stage()
    good = envelope({"entries": [ENTRY]}, request_id="good")
    bad = envelope({"entries": [{**ENTRY, "message": ""}]}, request_id="bad")
    inbox_send, inbox = trio.open_memory_channel[Any](4)
    outbox, outbox_receive = trio.open_memory_channel[Any](4)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stage.run, inbox, outbox)
        async with inbox_send:
            await inbox_send.send([good, bad])
        passed = [env async for batch in outbox_receive for env in batch]
    assert passed == [good]
    assert good.entries is not None and good.pending
    outcome = await bad.reply.wait()
    assert isinstance(outcome, ValidationError)
    assert outcome.status == 400
    assert outcome.details["errors"] == [
        {"field": "entries[0].message", "message": "must not be empty"}
    ]
