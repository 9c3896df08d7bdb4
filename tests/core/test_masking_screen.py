"""The raw-body screen in front of the masking walk is sound: whenever it lets a body skip
the walk, the walk would have changed nothing."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from logstack._config import MaskingSettings, ValueDetector, load_settings
from logstack._masking import KeyMasker, Masker, _may_hold_card_run

KEYS = st.one_of(
    st.sampled_from(
        ["order_id", "path", "user", "author", "monkey", "tokenizer", "region", "note", "amount"]
    ),
    st.sampled_from(
        [
            "password",
            "PassWord",
            "pass-word",
            "Api-Key",
            "apiKey",
            "API_KEY",
            "e_mail",
            "EMAIL",
            "Authorization",
            "card_number",
            "cardNumber",
            "secret",
            "TOKEN",
            "to.ken",
            # Characters the squeeze keeps, inside a key the walk normalises to a rule.
            "pass,word",
            ",token,",
            "api{key",
            "{e,mail}",
            "card,,Number",
        ]
    ),
    st.text(min_size=1, max_size=12),
)
VALUES = st.one_of(
    st.sampled_from(
        [
            "jane.doe@example.com",
            "4111 1111 1111 1111",
            "4111-1111-1111-1111",
            "Bearer abcdefgh12345",
            "basic dXNlcjpwYXNz",
            "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln",
            "GET /api/v1/orders/000001234/items/5 200 12ms",
            "2026-11-26T12:00:00.123456789Z",
            "plain text",
        ]
    ),
    st.text(max_size=40),
    st.integers(),
    st.booleans(),
    st.none(),
)
JSONISH = st.recursive(
    VALUES,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(KEYS, children, max_size=4),
    max_leaves=12,
)
ENTRY = st.fixed_dictionaries(
    {"message": VALUES},
    optional={
        "metadata": st.dictionaries(KEYS, JSONISH, max_size=5),
        "labels": st.dictionaries(KEYS, VALUES, max_size=3),
    },
)


def walked(masker: KeyMasker, entries: list[Any]) -> list[Any]:
    out = copy.deepcopy(entries)
    for entry in out:
        masker.mask_entry(entry, {})
    return out


def check(masker: KeyMasker, entries: list[Any]) -> None:
    for body in (
        json.dumps({"entries": entries}).encode(),
        json.dumps({"entries": entries}, separators=(",", ":")).encode(),
        json.dumps({"entries": entries}, indent=1).encode(),
    ):
        if not masker.could_match(body):
            assert walked(masker, entries) == entries, body


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(ENTRY, min_size=1, max_size=4), st.booleans())
def test_screen_never_skips_a_body_the_walk_would_change(
    entries: list[Any], ascii_only: bool
) -> None:
    masker = Masker(load_settings(env={}).masking).for_key("svc")
    if ascii_only:
        entries = json.loads(json.dumps(entries, ensure_ascii=True))
    check(masker, entries)


@settings(max_examples=200, deadline=None)
@given(st.lists(ENTRY, min_size=1, max_size=3))
def test_screen_is_sound_with_overrides(entries: list[Any]) -> None:
    settings_ = MaskingSettings(overrides={"svc": {"keys": ["order_id", "iban"]}})  # type: ignore[dict-item]
    check(Masker(settings_).for_key("svc"), entries)


DIGIT_KEYS = st.sampled_from(["x509", "X-509", "x5,09", "x5o9", "x59", "x_5_0_9", "509"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.dictionaries(DIGIT_KEYS | KEYS, VALUES, max_size=3), min_size=1, max_size=3))
def test_screen_is_sound_with_a_masked_key_that_has_digits(
    metadata: list[dict[str, Any]],
) -> None:
    """Digits stay in the squeezed body only when a masked key has one: then they must."""
    settings_ = MaskingSettings(overrides={"svc": {"keys": ["x509"]}})  # type: ignore[dict-item]
    check(Masker(settings_).for_key("svc"), [{"message": "m", "metadata": m} for m in metadata])


SECRET_KEYS = st.sampled_from(
    [
        "jane.doe@example.com",
        "Bearer abcdefgh12345",
        "hdr_Bearer\nabcdefgh12345",
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2ln",
        "4111 1111 1111 1111",
    ]
)
CARD_NUMBERS = st.sampled_from(
    [4111111111111111, 4111111111111111.0, 378282246310005, -4111111111111111]
)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.dictionaries(SECRET_KEYS | KEYS, CARD_NUMBERS | VALUES, max_size=4),
        min_size=1,
        max_size=3,
    )
)
def test_screen_is_sound_with_secrets_in_keys_and_cards_as_numbers(
    metadata: list[dict[str, Any]],
) -> None:
    """The walk also masks keys and card numbers sent as JSON numbers: the screen must
    send such bodies to it."""
    masker = Masker(load_settings(env={}).masking).for_key("svc")
    check(masker, [{"message": "m", "metadata": m} for m in metadata])


def test_keys_with_kept_characters_inside_are_walked() -> None:
    """``{`` and ``,`` stay in the squeezed body (they mark where keys start); a key that
    holds them is still a masked key once normalised, and must be walked."""
    masker = Masker(load_settings(env={}).masking).for_key("svc")
    for spelling in ("pass,word", "{password}", ",,token", "api,{,key,"):
        keyed = {"message": "x", "metadata": {"a": [{spelling: "v"}]}}
        assert masker.could_match(json.dumps({"entries": [keyed]}).encode()), spelling
    for mention in ("pass,word", "x,password", "passwords"):
        said = {"message": mention, "metadata": {"note": mention, "list": [mention]}}
        assert not masker.could_match(json.dumps({"entries": [said]}).encode()), mention


def test_plain_bodies_skip_the_walk_and_risky_ones_do_not() -> None:
    masker = Masker(load_settings(env={}).masking).for_key("svc")
    plain = {"message": "GET /api/v1/orders/000001234/items/5 200 12ms", "metadata": {"a": 1}}
    assert not masker.could_match(json.dumps({"entries": [plain]}).encode())
    for risky in (
        {"message": "x", "metadata": {"Pass-Word": 1}},  # a key
        {"message": "mail jane@example.com"},  # a detector
        {"message": "caf\u00e9"},  # not ASCII: walked
        {"message": "tab\there"},  # an escape in the JSON: walked
    ):
        assert masker.could_match(json.dumps({"entries": [risky]}).encode()), risky


def test_key_names_in_text_are_no_reason_to_walk() -> None:
    """The screen looks for masked keys as whole strings: a message or a longer key that
    only mentions one is skipped, the key itself (in any spelling) is walked."""
    masker = Masker(load_settings(env={}).masking).for_key("svc")
    mentions = {
        "message": "password reset: token refreshed, secret rotated",
        "metadata": {"token_count": 2, "password_age_days": 30, "note": "see the apiKey docs"},
    }
    assert not masker.could_match(json.dumps({"entries": [mentions]}).encode())
    for spelling in ("token", "TOKEN", "to.ken", "api_key", "Api-Key"):
        keyed = {"message": "x", "metadata": {"a": {spelling: "v"}}}
        assert masker.could_match(json.dumps({"entries": [keyed]}).encode()), spelling


CARD_RUN_START = re.compile(rb"[0-9](?:[ -]?[0-9]){12}")


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=64) | st.text(alphabet="0123456789 -x", max_size=64).map(str.encode))
def test_card_run_check_equals_the_card_run_regex(text: bytes) -> None:
    assert _may_hold_card_run(text) == (CARD_RUN_START.search(text) is not None)


def test_user_detectors_always_walk() -> None:
    settings_ = MaskingSettings(detectors=[ValueDetector(name="ticket", pattern="^TCK-[0-9]+$")])
    masker = Masker(settings_).for_key("svc")
    assert masker.could_match(b'{"entries": [{"message": "TCK-1"}]}')
