"""The stage between real channels, with ``logstack.testing``: what a plugin's unit tests are.

``open_stage`` runs the stage exactly as ``logstack serve`` does; ``make_envelope`` builds
the request the HTTP layer would hand it; ``check_stage_conformance`` checks the contract
every stage keeps (start, answer or pass on, survive rejections, drain, cancel).
"""

from __future__ import annotations

from typing import Any

import pytest
from logstack_acme_iban import MaskIbanConfig, MaskIbanStage

from logstack import InternalError, PluginError, Settings, StageContext, ValidationError
from logstack.testing import (
    check_stage_conformance,
    make_entry,
    make_envelope,
    make_stage,
    open_stage,
)

DE = "DE89 3704 0044 0532 0130 00"
GB = "GB82WEST12345698765432"
NL = "NL91ABNA0417164300"


def counted(context: StageContext, key_name: str = "payments-api") -> float:
    labels = {"token": key_name, "key": "detector:iban"}
    return context.metrics.registry.get_sample_value("masked_fields_total", labels) or 0.0


async def test_masks_message_metadata_and_labels() -> None:
    entry = make_entry(
        message=f"refund to {DE} failed",
        labels={"region": "eu-west-1", "tenant": NL},
        metadata={
            "order_id": "O-123",
            "amount": 12000,
            "payee": {"iban": GB, "name": "Bob"},
            "history": [GB, {"to": NL}, 42, None],
            "note": "not an iban: DE89370400440532013001",
        },
    )
    async with open_stage(MaskIbanStage) as harness:
        envelope = make_envelope(entries=[entry])
        result = await harness.process(envelope)
    assert result.passed == [envelope] and not result.answered
    [masked] = envelope.document()
    assert masked["message"] == "refund to DE****3000 failed"
    assert masked["labels"] == {"region": "eu-west-1", "tenant": "NL****4300"}
    assert masked["metadata"] == {
        "order_id": "O-123",
        "amount": 12000,
        "payee": {"iban": "GB****5432", "name": "Bob"},
        "history": ["GB****5432", {"to": "NL****4300"}, 42, None],
        "note": "not an iban: DE89370400440532013001",
    }
    assert envelope.masked_fields == {"detector:iban": 5}
    assert counted(harness.context) == 5


async def test_options_change_what_is_kept_and_where_it_looks() -> None:
    entry = make_entry(message=DE, labels={"tenant": NL})
    options = {"keep_last": 0, "keep_country": False, "scan_labels": False}
    async with open_stage(MaskIbanStage, options=options) as harness:
        envelope = make_envelope(entries=[entry])
        await harness.process(envelope)
    [masked] = envelope.document()
    assert masked["message"] == "****"
    assert masked["labels"] == {"tenant": NL}


async def test_after_validate_it_masks_the_validated_entries() -> None:
    entry = make_entry(message=f"pay {GB}", labels={"tenant": NL}, metadata={"to": [DE]})
    envelope = make_envelope(entries=[entry], validated=True)
    async with open_stage(MaskIbanStage) as harness:
        await harness.process(envelope)
    assert envelope.entries is not None
    [validated] = envelope.entries
    assert validated.message == "pay GB****5432"
    assert validated.labels == {"tenant": "NL****4300"}
    assert validated.metadata == {"to": ["DE****3000"]}


async def test_each_key_is_counted_under_its_own_name() -> None:
    context = StageContext(Settings())
    async with open_stage(MaskIbanStage, context=context) as harness:
        await harness.process(
            [
                make_envelope(entries=[make_entry(message=GB)] * 2),
                make_envelope(entries=[make_entry(message=NL)], key_name="user-service"),
                make_envelope(entries=[make_entry(message="nothing here")]),
            ]
        )
    assert counted(context) == 2
    assert counted(context, "user-service") == 1


async def test_a_body_of_any_shape_is_left_for_validate() -> None:
    """Before ``validate`` the entries are whatever the client sent: never crash on them."""
    odd: list[Any] = [
        "a string entry",
        42,
        None,
        [GB],
        {"message": 17, "metadata": [GB, {"x": GB}], "labels": "tenant"},
        {"metadata": "GB82WEST12345698765432"},  # not an object: validate refuses it
    ]
    async with open_stage(MaskIbanStage) as harness:
        envelope = make_envelope(entries=odd)
        result = await harness.process(envelope)
    assert result.passed == [envelope]
    document = envelope.document()
    assert document[3] == [GB]  # not an entry: untouched
    assert document[4]["metadata"] == ["GB****5432", {"x": "GB****5432"}]


async def test_malformed_json_is_the_clients_400() -> None:
    async with open_stage(MaskIbanStage) as harness:
        result = await harness.process(make_envelope(body=b'{"entries": [{"message": '))
    [rejection] = result.rejections
    assert isinstance(rejection, ValidationError)
    assert rejection.status == 400


async def test_a_masking_failure_refuses_the_request_without_echoing_it(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def explode(self: Any, text: str) -> tuple[str, int]:
        raise RuntimeError(f"cannot mask {text}")

    async with open_stage(MaskIbanStage) as harness:
        monkeypatch.setattr(type(harness.stage.masker), "mask_text", explode)  # type: ignore[attr-defined]
        envelope = make_envelope(entries=[make_entry(message=f"to {GB}")])
        result = await harness.process(envelope)
        # The stage lives on: the next request is handled (and fails the same way).
        await harness.process(make_envelope())
    [rejection] = result.rejections
    assert isinstance(rejection, InternalError)
    assert rejection.message == "masking failed; nothing was stored"
    assert harness.context.metrics.registry.get_sample_value("masking_errors_total") == 2
    assert GB not in caplog.text
    assert "RuntimeError" in caplog.text


@pytest.mark.parametrize(
    ("order", "warned"),
    [
        (["auth", "acme_mask_iban", "mask", "validate"], False),
        (["auth", "mask", "acme_mask_iban", "validate"], True),
        (["auth", "mask", "validate", "acme_mask_iban"], True),
        (["auth", "validate"], False),  # built outside a pipeline (a test's harness)
    ],
)
def test_a_place_after_mask_is_warned_about(
    order: list[str], warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """After ``mask`` the card detector may already have cut an IBAN (see the class)."""
    make_stage(MaskIbanStage, settings={"pipeline": [{"type": t} for t in order]})
    assert ("place it before mask" in caplog.text) is warned


def test_options_are_validated() -> None:
    assert MaskIbanConfig() == MaskIbanConfig(keep_last=4, keep_country=True, scan_labels=True)
    with pytest.raises(PluginError) as info:
        make_stage(MaskIbanStage, {"keep_last": 9, "keep_lst": 2})
    assert info.value.problems == [
        "MaskIbanStage options: keep_last: Input should be less than or equal to 8",
        "MaskIbanStage options: unknown field 'keep_lst'",
    ]


async def test_conformance() -> None:
    await check_stage_conformance(
        MaskIbanStage,
        envelopes=lambda: [make_envelope(entries=[make_entry(message=f"pay {GB}")])],
    )
    await check_stage_conformance(MaskIbanStage, {"keep_last": 0, "scan_labels": False})
