"""The ``mask`` stage: masks the decoded body in place, counts, and fails closed."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
import trio

from logstack._config import ApiKey, KeyMaskingOverride, MaskingSettings, Settings, load_settings
from logstack._context import StageContext
from logstack._envelope import Envelope
from logstack._errors import InternalError, ValidationError
from logstack._masking import KeyMasker
from logstack._schema import validate_entries
from logstack._stage import StageConfig
from stages.mask import MaskStage


def make_stage(settings: Settings | None = None) -> MaskStage:
    context = StageContext(settings=settings or load_settings(env={}))
    return MaskStage(StageConfig(), context)


def make_envelope(entries: Any, key_name: str | None = "svc") -> Envelope:
    return Envelope(
        request_id="req-1",
        authorization=None,
        body=msgspec.json.encode({"entries": entries}),
        key=ApiKey(name=key_name) if key_name else None,
    )


def entry(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "timestamp": "2024-05-01T12:00:00Z",
        "level": "INFO",
        "message": "hello",
        "service": "api",
        "env": "prod",
    }
    base.update(fields)
    return base


def sample(stage: MaskStage, token: str, key: str) -> float | None:
    value: float | None = stage.context.metrics.registry.get_sample_value(
        "masked_fields_total", {"token": token, "key": key}
    )
    return value


def test_masks_entries_in_place_and_counts() -> None:
    stage = make_stage()
    envelope = make_envelope(
        [
            entry(
                message="login by example@email.com",
                metadata={"password": "hunter2", "user": {"apiKey": "k-123"}},
                labels={"region": "eu"},
            ),
            entry(metadata={"Authorization": "Bearer abc123def456", "items": [{"token": "t"}]}),
        ]
    )
    stage.process(envelope)
    first, second = envelope.document()
    assert first["message"] == "login by e*****e@email.com"
    assert first["metadata"] == {"password": "****", "user": {"apiKey": "****"}}
    assert first["labels"] == {"region": "eu"}
    assert second["metadata"] == {"Authorization": "Beare****", "items": [{"token": "****"}]}
    expected = {"detector:email": 1, "password": 1, "api_key": 1, "authorization": 1, "token": 1}
    assert envelope.masked_fields == expected
    for key, n in expected.items():
        assert sample(stage, "svc", key) == n
    assert envelope.pending  # masking passes the request on


def test_counts_accumulate_across_requests_and_keep_earlier_stage_counts() -> None:
    stage = make_stage()
    envelope = make_envelope([entry(metadata={"secret": "s"})])
    envelope.masked_fields["acme_mask_pan"] = 2  # counted by an earlier (plugin) stage
    stage.process(envelope)
    stage.process(make_envelope([entry(metadata={"secret": "s", "SECRET": "t"})]))
    assert envelope.masked_fields == {"acme_mask_pan": 2, "secret": 1}
    assert sample(stage, "svc", "secret") == 3
    assert sample(stage, "svc", "acme_mask_pan") is None


def test_nothing_to_mask_moves_no_metric() -> None:
    stage = make_stage()
    envelope = make_envelope([entry(metadata={"user": "bob"})])
    stage.process(envelope)
    assert envelope.masked_fields == {}
    assert envelope.document()[0]["metadata"] == {"user": "bob"}


def test_unauthenticated_requests_use_the_baseline() -> None:
    stage = make_stage()
    envelope = make_envelope([entry(metadata={"token": "t"})], key_name=None)
    stage.process(envelope)
    assert envelope.document()[0]["metadata"] == {"token": "****"}
    assert sample(stage, "unauthenticated", "token") == 1


def test_per_key_overrides_apply_by_key_name() -> None:
    settings = Settings(
        masking=MaskingSettings(overrides={"billing": KeyMaskingOverride(keys=["iban"])})
    )
    stage = make_stage(settings)
    billing = make_envelope([entry(metadata={"iban": "DE89370400440532013000"})], "billing")
    other = make_envelope([entry(metadata={"iban": "DE89370400440532013000"})], "other")
    stage.process(billing)
    stage.process(other)
    assert billing.document()[0]["metadata"] == {"iban": "****"}
    assert other.document()[0]["metadata"] == {"iban": "DE89370400440532013000"}


def test_odd_entries_are_masked_not_crashed_on() -> None:
    stage = make_stage()
    envelope = make_envelope([None, 3, "text", [{"password": "p"}], entry(metadata=[{"token": 1}])])
    stage.process(envelope)
    assert envelope.document()[3:] == [[{"password": "****"}], entry(metadata=[{"token": "****"}])]


def test_malformed_body_is_the_clients_error_not_a_masking_failure() -> None:
    stage = make_stage()
    # A body the screen cannot rule out is decoded here: malformed, it is a 400.
    envelope = Envelope(request_id="r", authorization=None, body=b'{"password": not json')
    with pytest.raises(ValidationError):
        stage.process(envelope)
    assert stage.context.metrics.registry.get_sample_value("masking_errors_total") == 0
    # One with nothing to mask is not even decoded here; ``validate`` answers it (a 400).
    untouched = Envelope(request_id="r2", authorization=None, body=b"{not json")
    stage.process(untouched)
    assert untouched.raw_entries is None and untouched.masked_fields == {}
    assert stage.context.metrics.registry.get_sample_value("masking_errors_total") == 0


def test_a_request_of_too_many_entries_is_refused_unwalked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``validate`` refuses more than ``max_entries`` without looking at the entries; they
    used to be masked first (a 1 MiB body of 1,600 entries of 51 keys, one a password, took
    25-35 ms in ``mask`` before its refusal, 9-11 ms now, mostly its decoding). The answer
    is ``validate``'s."""
    walked: list[Any] = []
    monkeypatch.setattr(KeyMasker, "mask_entry", lambda self, e, counts: walked.append(e))
    settings = load_settings(env={})
    entries = [entry(metadata={"password": "p"})] * (settings.schema_.max_entries + 1)
    with pytest.raises(ValidationError) as masked:
        make_stage(settings).process(make_envelope(entries))
    with pytest.raises(ValidationError) as validated:
        validate_entries(entries, settings.schema_)
    assert walked == []
    assert masked.value.body() == validated.value.body()
    envelope = make_envelope(entries[1:])  # at the limit, it is walked
    make_stage(settings).process(envelope)
    assert len(walked) == settings.schema_.max_entries


def test_a_masking_failure_refuses_the_request(monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(self: KeyMasker, entry: Any, counts: dict[str, int]) -> None:
        raise RuntimeError("boom with hunter2 inside")

    monkeypatch.setattr(KeyMasker, "mask_entry", explode)
    stage = make_stage()
    envelope = make_envelope([entry(metadata={"password": "hunter2"})])
    with pytest.raises(InternalError, match="masking failed; nothing was stored") as info:
        stage.process(envelope)
    assert info.value.status == 500
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert stage.context.metrics.registry.get_sample_value("masking_errors_total") == 1
    assert envelope.masked_fields == {}


def test_reload_rebuilds_the_masker() -> None:
    stage = make_stage()
    before = stage.masker
    new = Settings(
        masking=MaskingSettings(
            baseline_keys=[
                "password",
                "token",
                "authorization",
                "api_key",
                "secret",
                "card_number",
                "email",
                "pin",
            ]
        )
    )
    stage.reload(new)
    assert stage.masker is not before
    envelope = make_envelope([entry(metadata={"PIN": "1234"})])
    stage.process(envelope)
    assert envelope.document()[0]["metadata"] == {"PIN": "****"}


def test_the_stage_is_documented_and_has_no_options() -> None:
    assert MaskStage.Config is StageConfig
    assert MaskStage.__doc__ is not None
    assert MaskStage.__doc__.splitlines()[0].startswith("Mask sensitive keys and values")
    assert "Masker" in repr(make_stage())


async def test_runs_between_channels_and_fails_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    stage = make_stage()
    good = make_envelope([entry(metadata={"secret": "s"})])
    in_send, in_recv = trio.open_memory_channel[Any](4)
    out_send, out_recv = trio.open_memory_channel[Any](4)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stage.run, in_recv, out_send)
        await in_send.send([good])
        passed = await out_recv.receive()
        assert passed == [good]
        assert good.document()[0]["metadata"] == {"secret": "****"}

        def explode(self: KeyMasker, entry: Any, counts: dict[str, int]) -> None:
            raise KeyError("x")

        monkeypatch.setattr(KeyMasker, "mask_entry", explode)
        bad = make_envelope([entry(metadata={"secret": "s"})])
        await in_send.send([bad])
        outcome = await bad.reply.wait()
        assert isinstance(outcome, InternalError)
        assert outcome.message == "masking failed; nothing was stored"
        await in_send.aclose()
    assert [batch async for batch in out_recv] == []
