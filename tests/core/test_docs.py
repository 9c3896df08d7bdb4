"""The generated configuration reference is current."""

from __future__ import annotations

from pathlib import Path

from logstack._docs import render

REFERENCE = Path(__file__).resolve().parents[2] / "docs" / "configuration-reference.md"


def test_configuration_reference_is_current() -> None:
    assert REFERENCE.read_text() == render(), (
        "docs/configuration-reference.md is stale: "
        "run `python -m logstack._docs > docs/configuration-reference.md`"
    )


def test_reference_names_every_key_and_variable() -> None:
    text = render()
    for needle in ("`LOGSTACK_WAL_ROOT_PATH`", "`LOGSTACK_LOKI_BASE_URL`", "`segment_max_bytes`"):
        assert needle in text
