"""The masking engine (SPEC §5): key rules, partial rules, value detectors, odd input."""

from __future__ import annotations

import copy
import hashlib
import hmac
import time
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from logstack._config import (
    DEFAULT_BASELINE_KEYS,
    KeyMaskingOverride,
    MaskingSettings,
    PartialRule,
    ValueDetector,
)
from logstack._masking import MASK, KeyMasker, Masker, mask_email, normalise_key

SECRET = "test-hash-secret"


def masker(**overrides: Any) -> KeyMasker:
    overrides.setdefault("hash_secret", SECRET)
    return Masker(MaskingSettings(**overrides)).for_key("svc")


def mask_metadata(metadata: Any, km: KeyMasker | None = None) -> tuple[Any, dict[str, int]]:
    entry = {"message": "hello", "metadata": metadata}
    counts: dict[str, int] = {}
    (km or masker()).mask_entry(entry, counts)
    return entry["metadata"], counts


def scan(text: str, km: KeyMasker | None = None) -> tuple[str, dict[str, int]]:
    entry = {"message": text}
    counts: dict[str, int] = {}
    (km or masker()).mask_entry(entry, counts)
    return entry["message"], counts


def hmac_of(value: str, secret: str = SECRET) -> str:
    digest = hmac.new(secret.encode(), value.encode(), hashlib.sha256).hexdigest()
    return f"hmac-sha256:{digest}"


# --- key normalisation and matching ----------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normal"),
    [
        ("api_key", "apikey"),
        ("API-Key", "apikey"),
        ("apiKey", "apikey"),
        ("APIKEY", "apikey"),
        ("Api Key", "apikey"),
        ("api.key", "apikey"),
        ("__api__key__", "apikey"),
        ("\uff21\uff30\uff29\uff3f\uff2b\uff25\uff39", "apikey"),  # fullwidth API_KEY: NFKC
        ("card-number", "cardnumber"),
        ("E-Mail", "email"),
        ("", ""),
        ("---", ""),
        ("Пароль", "пароль"),  # letters of any script are kept
        ("暗証_番号", "暗証番号"),
        ("Contraseña", "contraseña"),
        ("pass\u200dword", "password"),  # a zero-width joiner is not a letter
    ],
)
def test_normalise_key(raw: str, normal: str) -> None:
    assert normalise_key(raw) == normal


@pytest.mark.parametrize("key", ["Пароль", "ПАРОЛЬ", "пар-оль", "暗証番号", "CONTRASEÑA"])
def test_keys_in_any_script_are_masked(key: str) -> None:
    """They used to normalise to nothing (only ``[0-9a-z]`` was kept) and were dropped."""
    km = masker(overrides={"svc": KeyMaskingOverride(keys=["пароль", "暗証番号", "contraseña"])})
    metadata, counts = mask_metadata({key: "SECRET-RU-1", "other": "kept"}, km)
    assert metadata == {key: MASK, "other": "kept"}
    assert sum(counts.values()) == 1


@pytest.mark.parametrize("key", ["passwordä", "ätoken", "Secret✓"])
def test_a_baseline_word_with_a_stray_letter_from_another_script_stays_masked(key: str) -> None:
    """Such keys matched when non-ASCII letters were dropped; they still do."""
    metadata, _ = mask_metadata({key: "s3cr3t"})
    assert metadata == {key: MASK}


@pytest.mark.parametrize(
    ("key", "label"),
    [
        ("password", "password"),
        ("PASSWORD", "password"),
        ("Pass_Word", "password"),
        ("token", "token"),
        ("Token", "token"),
        ("authorization", "authorization"),
        ("api_key", "api_key"),
        ("API-Key", "api_key"),
        ("apiKey", "api_key"),
        ("APIKEY", "api_key"),
        ("secret", "secret"),
        ("SECRET", "secret"),
        ("card_number", "card_number"),
        ("cardNumber", "card_number"),
        ("card-number", "card_number"),
        ("e-mail", "email"),
    ],
)
def test_baseline_keys_match_in_any_spelling(key: str, label: str) -> None:
    metadata, counts = mask_metadata({key: "s3cr3t-value-not-an-email", "other": "kept"})
    assert metadata[key] != "s3cr3t-value-not-an-email"
    assert metadata["other"] == "kept"
    assert counts == {label: 1}


@pytest.mark.parametrize(
    "key",
    [
        "author",
        "monkey",
        "tokenizer_name",
        "passwords",
        "user_password",
        "access_token",
        "secretary",
        "emails",
        "card",
        "keyboard",
        "tok",
    ],
)
def test_no_substring_matching(key: str) -> None:
    metadata, counts = mask_metadata({key: "plain value"})
    assert metadata == {key: "plain value"}
    assert counts == {}


def test_classification_is_cached_per_raw_key() -> None:
    km = masker()
    for _ in range(3):
        mask_metadata({"apiKey": "x", "user": "y"}, km)
    assert km.rule_for("apiKey") is km.rule_for("apiKey")
    assert km.rule_for("user") is None
    assert "cached=2" in repr(km)


# --- replacement rules -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "value", "expected"),
    [
        (None, "hunter2", MASK),
        (None, "x" * 500, MASK),
        (None, "", MASK),
        (None, 12345, MASK),
        (None, 3.25, MASK),
        (None, True, MASK),
        (None, None, MASK),
        (PartialRule(keep_prefix=5), "Bearer abc123def456", "Beare****"),
        (PartialRule(keep_prefix=5), "Bearer abc", "Beare****"),
        (PartialRule(keep_prefix=5), "Bearer ab", MASK),  # less hidden than shown
        (PartialRule(keep_prefix=5), "abcde", MASK),  # never the whole value
        (PartialRule(keep_suffix=4), "4111111111111111", "****1111"),
        (PartialRule(keep_suffix=4), 4111111111111111, "****1111"),
        (PartialRule(keep_suffix=4), "1234567", MASK),
        (PartialRule(keep_suffix=4), False, MASK),
        (PartialRule(keep_prefix=2, keep_suffix=2), "abcdefgh", "ab****gh"),
        (PartialRule(keep_prefix=2, keep_suffix=2), "abcd", MASK),
        (PartialRule(keep_prefix=2, keep_suffix=2), "abc", MASK),
        (PartialRule(mask_email=True), "example@email.com", "e*****e@email.com"),
        (
            PartialRule(mask_email=True),
            "first.last+tag@mail.example.org",
            "f*****g@mail.example.org",
        ),
        (PartialRule(mask_email=True), "ab@x.com", "*****@x.com"),
        (PartialRule(mask_email=True), "not-an-email", MASK),
        (PartialRule(mask_email=True), "John <john@example.com>", MASK),
        (PartialRule(mask_email=True), 42, MASK),
        (PartialRule(hash=True), "session-1234", hmac_of("session-1234")),
        (PartialRule(hash=True), 987654, hmac_of("987654")),
        (PartialRule(hash=True), None, MASK),
        (PartialRule(hash=True, keep_prefix=3), "session-1234", hmac_of("session-1234")),
    ],
)
def test_partial_rules(rule: PartialRule | None, value: Any, expected: str) -> None:
    km = masker(partial_rules={"secret": rule} if rule else {})
    metadata, counts = mask_metadata({"secret": value}, km)
    assert metadata == {"secret": expected}
    assert counts == {"secret": 1}


def test_default_rules_from_the_seed_config() -> None:
    metadata, _ = mask_metadata(
        {"authorization": "Bearer abc123def456", "email": "example@email.com", "token": "t0k3n"}
    )
    assert metadata == {
        "authorization": "Beare****",
        "email": "e*****e@email.com",
        "token": MASK,
    }


def test_mask_email_helper() -> None:
    assert mask_email("example@email.com") == "e*****e@email.com"
    assert mask_email("a@b") == MASK


def test_hash_is_stable_and_keyed() -> None:
    rules = {"secret": PartialRule(hash=True)}
    first = mask_metadata({"secret": "correlate-me"}, masker(partial_rules=rules))[0]
    again = mask_metadata({"secret": "correlate-me"}, masker(partial_rules=rules))[0]
    other_value = mask_metadata({"secret": "correlate-me!"}, masker(partial_rules=rules))[0]
    other_key = mask_metadata(
        {"secret": "correlate-me"}, masker(partial_rules=rules, hash_secret="another-secret")
    )[0]
    assert first == again == {"secret": hmac_of("correlate-me")}
    assert other_value != first
    assert other_key != first


def test_hash_handles_lone_surrogates() -> None:
    km = masker(partial_rules={"secret": PartialRule(hash=True)})
    metadata, _ = mask_metadata({"secret": "bad \ud800 text"}, km)
    assert metadata["secret"].startswith("hmac-sha256:")


def test_hash_without_a_secret_masks_fully() -> None:
    # Config validation refuses this (test_config.py); the engine still fails safe if it
    # is handed such settings unvalidated.
    settings = MaskingSettings.model_construct(
        baseline_keys=list(MaskingSettings().baseline_keys),
        partial_rules={"secret": PartialRule(hash=True)},
        hash_secret="",
        overrides={},
        builtin_detectors=[],
        detectors=[],
    )
    masker_ = Masker(settings)
    assert masker_.hash_without_secret
    metadata, _ = mask_metadata({"secret": "value"}, masker_.for_key("svc"))
    assert metadata == {"secret": MASK}
    assert not Masker(MaskingSettings()).hash_without_secret


def test_a_partial_rule_key_is_masked_even_if_not_listed() -> None:
    km = masker(partial_rules={"ssn": PartialRule(keep_suffix=4)})
    metadata, counts = mask_metadata({"SSN": "123-45-6789"}, km)
    assert metadata == {"SSN": "****6789"}
    assert counts == {"ssn": 1}


# --- structure: depth, lists, labels, odd types ----------------------------------------


def test_nested_dicts_and_lists() -> None:
    metadata, counts = mask_metadata(
        {
            "user": {"name": "bob", "Password": "p@ss", "profile": {"apiKey": "k"}},
            "items": [{"token": "t1"}, {"token": "t2"}, "plain", 7],
            "deep": [[[{"secret": "s"}]]],
        }
    )
    assert metadata == {
        "user": {"name": "bob", "Password": MASK, "profile": {"apiKey": MASK}},
        "items": [{"token": MASK}, {"token": MASK}, "plain", 7],
        "deep": [[[{"secret": MASK}]]],
    }
    assert counts == {"password": 1, "api_key": 1, "token": 2, "secret": 1}


def test_matched_key_with_container_masks_every_scalar_leaf() -> None:
    metadata, counts = mask_metadata(
        {"secret": {"a": "x", "b": [1, 2.5, None, True, {"c": "y"}], "empty": []}, "n": 1}
    )
    assert metadata == {
        "secret": {"a": MASK, "b": [MASK, MASK, MASK, MASK, {"c": MASK}], "empty": []},
        "n": 1,
    }
    assert counts == {"secret": 6}


def test_partial_rule_applies_to_each_leaf_of_a_container() -> None:
    metadata, _ = mask_metadata({"email": ["example@email.com", "nope"]})
    assert metadata == {"email": ["e*****e@email.com", MASK]}


def test_labels_are_masked_too() -> None:
    entry = {"message": "m", "labels": {"region": "eu", "token": "abc", "Email": "a.b@c.de"}}
    masker().mask_entry(entry, {})
    assert entry["labels"] == {"region": "eu", "token": MASK, "Email": "a*****b@c.de"}


def test_very_deep_nesting_does_not_hit_the_recursion_limit() -> None:
    metadata: dict[str, Any] = {"password": "top"}
    node = metadata
    for _ in range(5000):
        node["child"] = {}
        node = node["child"]
    node["password"] = "bottom"
    node["note"] = "mail me at someone@example.com"
    counts: dict[str, int] = {}
    masker().mask_entry({"metadata": metadata}, counts)
    assert metadata["password"] == MASK
    assert node == {"password": MASK, "note": "mail me at s*****e@example.com"}
    assert counts == {"password": 2, "detector:email": 1}


@pytest.mark.parametrize(
    "entry",
    [
        None,
        1,
        1.5,
        True,
        "a string entry with a@b.com",
        [],
        ["password", {"password": "x"}],
        {},
        {"message": None},
        {"message": 5},
        {"message": ["a@b.com", {"token": "t"}]},
        {"message": {"password": "x"}},
        {"metadata": None},
        {"metadata": "user@example.com"},
        {"metadata": []},
        {"metadata": [1, "x", {"token": "t"}, [None]]},
        {"metadata": {"token": None, "list": [], "dict": {}}},
        {"metadata": {1: "one", None: "none", ("a",): "tuple"}},
        {"labels": []},
        {"labels": "token"},
        {"labels": {"token": ["a", "b"]}},
        {"message": "", "metadata": {"": "", "-": "x"}},
        {"message": "\ud800 lone surrogate a@b.co"},
    ],
)
def test_odd_input_never_raises(entry: Any) -> None:
    before = copy.deepcopy(entry)
    masker().mask_entry(entry, {})
    if not isinstance(before, dict | list):
        assert entry == before or entry is before


def test_subclasses_of_json_types_are_walked_too() -> None:
    class Text(str):
        pass

    class Mapping(dict[str, Any]):
        pass

    metadata = Mapping(note=Text("mail a.b@c.de"), inner=Mapping(token="t"), items=[Text("x@y.io")])
    masked, counts = mask_metadata(metadata)
    assert masked == {
        "note": "mail a*****b@c.de",
        "inner": {"token": MASK},
        "items": ["*****@y.io"],
    }
    assert counts == {"detector:email": 2, "token": 1}


def test_lone_surrogates_do_not_break_detectors() -> None:
    masked, counts = scan("\ud800 card 4111 1111 1111 1111 \udfff")
    assert masked == "\ud800 card ****1111 \udfff"
    assert counts == {"detector:card_number": 1}


def test_odd_input_is_still_masked() -> None:
    entry: dict[str, Any] = {
        "message": {"password": "x", "note": "a.b@c.de"},
        "metadata": [{"token": "t"}, "4111 1111 1111 1111"],
        "labels": "Bearer abc123def",
    }
    masker().mask_entry(entry, {})
    assert entry == {
        "message": {"password": MASK, "note": "a*****b@c.de"},
        "metadata": [{"token": MASK}, "****1111"],
        "labels": "Bearer ****",
    }
    top_list: list[Any] = [{"secret": "s"}]
    masker().mask_entry(top_list, {})
    assert top_list == [{"secret": MASK}]


def test_strings_without_findings_are_left_as_the_same_object() -> None:
    message = "nothing to see here, just 12 words and a number 42"
    entry: dict[str, Any] = {"message": message, "metadata": {"k": message}}
    counts: dict[str, int] = {}
    masker().mask_entry(entry, counts)
    assert entry["message"] is message
    assert entry["metadata"]["k"] is message
    assert counts == {}


# --- per-key overrides -----------------------------------------------------------------


def test_overrides_add_keys_and_rules_for_that_key_only() -> None:
    settings = MaskingSettings(
        hash_secret=SECRET,
        overrides={
            "billing": KeyMaskingOverride(
                keys=["iban", "session-id"],
                partial_rules={
                    "iban": PartialRule(keep_suffix=4),
                    "password": PartialRule(hash=True),
                },
            )
        },
    )
    m = Masker(settings)
    data = {"IBAN": "DE89370400440532013000", "sessionId": "abc", "password": "pw", "x": "y"}
    billing, counts = mask_metadata(copy.deepcopy(data), m.for_key("billing"))
    assert billing == {"IBAN": "****3000", "sessionId": MASK, "password": hmac_of("pw"), "x": "y"}
    assert counts == {"iban": 1, "session-id": 1, "password": 1}
    other, _ = mask_metadata(copy.deepcopy(data), m.for_key("other"))
    assert other == {"IBAN": data["IBAN"], "sessionId": "abc", "password": MASK, "x": "y"}


def test_the_baseline_cannot_be_switched_off() -> None:
    with pytest.raises(ValueError, match="baseline"):
        MaskingSettings(baseline_keys=["password"])
    # Even settings that skipped validation keep the baseline.
    unvalidated = MaskingSettings.model_construct(
        baseline_keys=[],
        partial_rules={},
        hash_secret="",
        overrides={"svc": KeyMaskingOverride(keys=[])},
        builtin_detectors=[],
        detectors=[],
    )
    metadata, _ = mask_metadata(
        {k: "v" for k in DEFAULT_BASELINE_KEYS}, Masker(unvalidated).for_key("svc")
    )
    assert metadata == {k: MASK for k in DEFAULT_BASELINE_KEYS}


def test_extra_baseline_keys_apply_to_every_key() -> None:
    m = Masker(MaskingSettings(baseline_keys=[*DEFAULT_BASELINE_KEYS, "client_secret"]))
    metadata, _ = mask_metadata({"clientSecret": "cs"}, m.for_key("anyone"))
    assert metadata == {"clientSecret": MASK}


def test_key_maskers_are_cached_per_key_name() -> None:
    m = Masker(MaskingSettings())
    assert m.for_key("a") is m.for_key("a")
    assert m.for_key("a") is not m.for_key("b")
    assert "keys_built=2" in repr(m)


# --- value detectors -------------------------------------------------------------------

JWT = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.SflKxwRJSMeKKF2QT4fw-_c"


@pytest.mark.parametrize(
    ("text", "expected", "counts"),
    [
        # email
        ("contact example@email.com now", "contact e*****e@email.com now", {"email": 1}),
        ("<john.doe+x@mail.co.uk>", "<j*****x@mail.co.uk>", {"email": 1}),
        ("a@b.io and cd@e.io", "*****@b.io and *****@e.io", {"email": 2}),
        ("mailto:someone@example.com.", "mailto:s*****e@example.com.", {"email": 1}),
        # RFC 6531: letters of any script; the mask starts at the local part's first one
        ("mail jöhnathan@example.com", "mail j*****n@example.com", {"email": 1}),
        ("ünïcödé@example.com", "ü*****é@example.com", {"email": 1}),
        ("not an email: user@localhost", "not an email: user@localhost", {}),
        ("a@b.c", "*****@b.c", {"email": 1}),  # the shortest string a built-in can match
        # card numbers (Luhn)
        ("card 4111 1111 1111 1111 ok", "card ****1111 ok", {"card_number": 1}),
        ("4111-1111-1111-1111", "****1111", {"card_number": 1}),
        ("pan=4111111111111111;", "pan=****1111;", {"card_number": 1}),
        ("amex 378282246310005", "amex ****0005", {"card_number": 1}),
        ("visa13 4222222222222", "visa13 ****2222", {"card_number": 1}),
        ("fails luhn 4111111111111112", "fails luhn 4111111111111112", {}),
        ("too short 411111111111", "too short 411111111111", {}),
        ("too long 41111111111111111111", "too long 41111111111111111111", {}),
        ("order 1234 4111 1111 1111 1111", "order 1234 ****1111", {"card_number": 1}),
        ("4111 1111 1111 1111 22", "****1111 22", {"card_number": 1}),
        ("4111 1111 1111 1", "4111 1111 1111 1", {}),  # 13 digits, fails Luhn
        ("4222 2222 2222 2", "****2222", {"card_number": 1}),  # 13 digits, short last group
        ("4111111111111111 4111111111111111", "****1111 ****1111", {"card_number": 2}),
        (
            "123 4111 1111 1111 1111 456 5500-0000-0000-0004 77",
            "123 ****1111 456 ****0004 77",
            {"card_number": 2},
        ),
        ("1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6", "1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6", {}),
        ("x" + "4111 " * 70 + "x", "x**** x", {"card_number": 1}),  # a digit flood: whole
        ("at 2024-01-01T12:00:00.123456789Z", "at 2024-01-01T12:00:00.123456789Z", {}),
        (
            "id 550e8400-e29b-41d4-a716-446655440000",
            "id 550e8400-e29b-41d4-a716-446655440000",
            {},
        ),
        # JWT
        (f"token={JWT} end", "token=**** end", {"jwt": 1}),
        (f"{JWT}", "****", {"jwt": 1}),
        ("eyJ alone is fine", "eyJ alone is fine", {}),
        ("xeyJhbGci.eyJzdWIi.sig", "xeyJhbGci.eyJzdWIi.sig", {}),  # not at a word start
        # bearer / basic
        ("Authorization: Bearer abc123xyz", "Authorization: Bearer ****", {"bearer": 1}),
        ("header Bearer abcdefghijkl, next", "header Bearer ****, next", {"bearer": 1}),
        ("BEARER SOMETOKEN1", "BEARER ****", {"bearer": 1}),
        ("bearer   abc123xyz", "bearer   ****", {"bearer": 1}),
        ("BeArEr abc123xyz", "BeArEr ****", {"bearer": 1}),
        ("unbearer abc123xyz", "unbearer abc123xyz", {}),
        (f"Bearer {JWT}", "Bearer ****", {"bearer": 1}),
        ("the bearer of bad news", "the bearer of bad news", {}),
        ("Basic dXNlcjpwYXNz", "Basic ****", {"bearer": 1}),
        ("auth=basic dXNlcjpwYXNzd29yZA==", "auth=basic ****", {"bearer": 1}),
        ("basic information", "basic information", {}),
        ("Basic settings for user@x.com", "Basic settings for u*****r@x.com", {"email": 1}),
        # several in one string
        (
            "u=a.b@c.de card=4111111111111111 jwt=" + JWT + " Bearer abc123xyz",
            "u=a*****b@c.de card=****1111 jwt=**** Bearer ****",
            {"email": 1, "card_number": 1, "jwt": 1, "bearer": 1},
        ),
    ],
)
def test_builtin_detectors(text: str, expected: str, counts: dict[str, int]) -> None:
    masked, found = scan(text)
    assert masked == expected
    assert found == {f"detector:{name}": n for name, n in counts.items()}


def test_detectors_scan_metadata_and_label_values_but_not_keys_masked_already() -> None:
    metadata, counts = mask_metadata(
        {"note": "mail a.b@c.de", "nested": ["x 4111111111111111"], "email": "example@email.com"}
    )
    assert metadata == {
        "note": "mail a*****b@c.de",
        "nested": ["x ****1111"],
        "email": "e*****e@email.com",
    }
    assert counts == {"detector:email": 1, "detector:card_number": 1, "email": 1}


def test_detectors_scan_trace_and_span_ids() -> None:
    """Free-form strings a client fills in: a token pasted as a trace id is a secret too."""
    entry = {"message": "m", "trace_id": JWT, "span_id": "a.b@c.de"}
    counts: dict[str, int] = {}
    masker().mask_entry(entry, counts)
    assert entry == {"message": "m", "trace_id": MASK, "span_id": "a*****b@c.de"}
    assert counts == {"detector:jwt": 1, "detector:email": 1}


@pytest.mark.parametrize(
    ("builtins", "masked"),
    [
        ([], "a.b@c.de 4111111111111111 Bearer abc123xyz"),
        (["email"], "a*****b@c.de 4111111111111111 Bearer abc123xyz"),
        (["card_number"], "a.b@c.de ****1111 Bearer abc123xyz"),
        (["bearer", "jwt"], "a.b@c.de 4111111111111111 Bearer ****"),
    ],
)
def test_builtin_detectors_can_be_selected(builtins: list[Any], masked: str) -> None:
    km = masker(builtin_detectors=builtins)
    assert scan("a.b@c.de 4111111111111111 Bearer abc123xyz", km)[0] == masked


@pytest.mark.parametrize(
    ("detectors", "text", "expected", "counts"),
    [
        (
            [ValueDetector(name="ssn", pattern=r"\b\d{3}-\d{2}-\d{4}\b")],
            "ssn 123-45-6789 ok",
            "ssn **** ok",
            {"ssn": 1},
        ),
        (
            [
                ValueDetector(name="ssn", pattern=r"\b\d{3}-\d{2}-\d{4}\b", replacement="[SSN]"),
                ValueDetector(name="ipv4", pattern=r"\b(?:\d{1,3}\.){3}\d{1,3}\b"),
            ],
            "from 10.0.0.1 ssn 123-45-6789",
            "from **** ssn [SSN]",
            {"ssn": 1, "ipv4": 1},
        ),
        (  # groups: runs on its own; the replacement is literal, not a template
            [ValueDetector(name="acct", pattern=r"(acct)-(\d+)", replacement=r"\1-X")],
            "acct-123 and acct-456",
            r"\1-X and \1-X",
            {"acct": 2},
        ),
        (  # inline global flags: runs on its own
            [
                ValueDetector(name="word", pattern=r"(?i)hunter\d"),
                ValueDetector(name="pin", pattern=r"PIN\d{4}"),
            ],
            "HUNTER2 and PIN1234",
            "**** and ****",
            {"word": 1, "pin": 1},
        ),
        (  # an empty match masks nothing
            [ValueDetector(name="empty", pattern=r"x*")],
            "abc xx def",
            "abc **** def",
            {"empty": 1},
        ),
    ],
)
def test_configured_detectors(
    detectors: list[ValueDetector], text: str, expected: str, counts: dict[str, int]
) -> None:
    km = masker(detectors=detectors, builtin_detectors=[])
    masked, found = scan(text, km)
    assert masked == expected
    assert found == {f"detector:{name}": n for name, n in counts.items()}


def test_configured_detectors_scan_short_strings() -> None:
    km = masker(detectors=[ValueDetector(name="pin", pattern=r"\b\d{4}\b")])
    metadata, counts = mask_metadata({"code": "1234", "tag": "ab"}, km)
    assert metadata == {"code": MASK, "tag": "ab"}
    assert counts == {"detector:pin": 1}


def test_configured_and_builtin_detectors_together() -> None:
    km = masker(detectors=[ValueDetector(name="ssn", pattern=r"\b\d{3}-\d{2}-\d{4}\b")])
    assert scan("a.b@c.de 123-45-6789", km)[0] == "a*****b@c.de ****"


@pytest.mark.parametrize(
    "text",
    [
        "a" * 100_000 + "@",
        "a." * 50_000 + "@x",
        "x@" + "a-" * 50_000,
        "eyJ" * 30_000,
        "eyJa." * 20_000,
        "1 " * 50_000,
        "1-" * 50_000 + "x",
        "9" * 100_000,
        "bearer " * 15_000,
        "Basic " * 15_000 + "dXNlcjpwYXNz",
        "@" * 100_000,
        "a@" * 50_000,
        " @b.co" * 20_000,
        "a" * 100_000 + "@example.com",
        "1234 " * 20_000,
        "123 4 " * 20_000,
        "4111 1111 1111 1111 x" * 5_000,
        "1 " * 50_000,
    ],
)
def test_adversarial_strings_scan_in_linear_time(text: str) -> None:
    started = time.perf_counter()
    scan(text)
    assert time.perf_counter() - started < 1.0


# --- property: no baseline secret survives ---------------------------------------------

MARKER = "S3CR3T-"
BASELINE_NORMAL = {normalise_key(k) for k in DEFAULT_BASELINE_KEYS}


@st.composite
def spelled(draw: st.DrawFn, key: str) -> str:
    """``api_key`` as ``API-KEY``, ``apiKey``, ``Api.Key``, ``apikey``, ..."""
    words = key.split("_")
    separator = draw(st.sampled_from(["", "_", "-", ".", " "]))
    style = draw(st.sampled_from(["lower", "upper", "camel", "title", "random"]))
    if style == "upper":
        words = [w.upper() for w in words]
    elif style == "camel":
        words = [words[0], *(w.title() for w in words[1:])]
    elif style == "title":
        words = [w.title() for w in words]
    elif style == "random":
        flips = draw(st.lists(st.booleans(), min_size=len(key), max_size=len(key)))
        text = "".join(c.upper() if f else c for c, f in zip(key, flips, strict=True))
        words = text.split("_")
    return separator.join(words)


sensitive_keys = st.sampled_from(DEFAULT_BASELINE_KEYS).flatmap(spelled)
secret_values: st.SearchStrategy[Any] = st.one_of(
    st.text(min_size=6).map(lambda s: MARKER + s),
    st.integers(min_value=10**15, max_value=10**18),
)
secret_subtrees = st.recursive(
    secret_values,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text("abcxyz", min_size=1, max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
# Plain keys and values: lowercase letters cannot spell a detector match, and a plain key
# is drawn again if it happens to normalise to a baseline key.
plain_keys = st.text("abcdefghijklmnopqrstuvwxyz_-", min_size=1, max_size=12).filter(
    lambda k: normalise_key(k) not in BASELINE_NORMAL
)
plain_values = st.one_of(
    st.text("abcdefghijklmnopqrstuvwxyz ", max_size=20),
    st.integers(min_value=-1000, max_value=1000),
    st.booleans(),
    st.none(),
)


def trees(depth: int) -> st.SearchStrategy[Any]:
    if depth == 0:
        return plain_values
    child = trees(depth - 1)
    members = st.one_of(
        st.tuples(plain_keys, child),
        st.tuples(sensitive_keys, secret_subtrees),
    )
    return st.one_of(
        plain_values,
        st.lists(members, max_size=5).map(dict),
        st.lists(child, max_size=4),
    )


metadata_trees = st.lists(
    st.one_of(st.tuples(plain_keys, trees(4)), st.tuples(sensitive_keys, secret_subtrees)),
    max_size=6,
).map(dict)


def secrets_in(tree: Any) -> list[Any]:
    if isinstance(tree, dict):
        return [s for v in tree.values() for s in secrets_in(v)]
    if isinstance(tree, list):
        return [s for v in tree for s in secrets_in(v)]
    if isinstance(tree, int) and not isinstance(tree, bool) and tree >= 10**15:
        return [tree]
    return [tree] if isinstance(tree, str) and tree.startswith(MARKER) else []


def assert_only_sensitive_changed(before: Any, after: Any) -> None:
    if isinstance(before, dict):
        assert isinstance(after, dict)
        assert list(after) == list(before)
        for key, value in before.items():
            if normalise_key(key) in BASELINE_NORMAL:
                assert not secrets_in(after[key])
            else:
                assert_only_sensitive_changed(value, after[key])
    elif isinstance(before, list):
        assert isinstance(after, list)
        assert len(after) == len(before)
        for old, new in zip(before, after, strict=True):
            assert_only_sensitive_changed(old, new)
    else:
        assert after == before


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(metadata=metadata_trees, labels=metadata_trees)
def test_no_baseline_secret_survives(metadata: dict[str, Any], labels: dict[str, Any]) -> None:
    entry = {"message": "plain message", "metadata": metadata, "labels": labels}
    before = copy.deepcopy(entry)
    masker().mask_entry(entry, {})
    encoded = msgspec.json.encode(entry)
    for secret in secrets_in(before):
        assert msgspec.json.encode(secret).strip(b'"') not in encoded
    assert entry["message"] == "plain message"
    assert_only_sensitive_changed(before["metadata"], entry["metadata"])
    assert_only_sensitive_changed(before["labels"], entry["labels"])


@given(
    prefix=st.text("abcdefghij ", max_size=20),
    local=st.text("abcdefghijklmnop", min_size=3, max_size=10),
    suffix=st.text("abcdefghij ", max_size=20),
)
def test_no_email_survives_in_a_message(prefix: str, local: str, suffix: str) -> None:
    address = f"{local}@example.com"
    masked, counts = scan(f"{prefix} {address} {suffix}")
    assert address not in masked
    assert f"{local[0]}*****{local[-1]}@example.com" in masked
    assert counts == {"detector:email": 1}


def _luhn_complete(body: str) -> str:
    for check in "0123456789":
        digits = body + check
        total = 0
        for i, char in enumerate(reversed(digits)):
            n = int(char)
            if i % 2:
                n = n * 2 - 9 if n > 4 else n * 2
            total += n
        if total % 10 == 0:
            return digits
    raise AssertionError


@given(
    body=st.text("0123456789", min_size=12, max_size=18),
    separator=st.sampled_from(["", " ", "-"]),
    words=st.text("abc ", max_size=10),
)
def test_no_luhn_card_survives_in_a_message(body: str, separator: str, words: str) -> None:
    card = _luhn_complete(body)
    grouped = separator.join(card[i : i + 4] for i in range(0, len(card), 4))
    masked, counts = scan(f"{words} {grouped} {words}")
    assert grouped not in masked
    assert f"****{card[-4:]}" in masked
    assert counts == {"detector:card_number": 1}


detector_soup = st.lists(
    st.sampled_from(
        [
            "4111",
            "1111",
            "0",
            "12",
            " ",
            "-",
            "@",
            ".",
            "a",
            "Z",
            "_",
            "eyJ",
            "Bearer ",
            "basic ",
            "dXNlcjpwYXNz",
            "=",
            "\ud800",
            "é",
            "\x00",
            "example.com",
            "\n",
        ]
    ),
    max_size=60,
).map("".join)


@settings(max_examples=300)
@given(text=detector_soup)
def test_any_text_scans_without_error(text: str) -> None:
    km = masker(detectors=[ValueDetector(name="word", pattern=r"Z+")])
    first, counts = scan(text, km)
    again, _ = scan(text, km)
    assert first == again  # deterministic
    assert all(n > 0 for n in counts.values())
    assert "Z" not in first  # the configured detector runs after the built-ins


# --- what the first audit of the detectors found (2026-11-28) ---------------------------


@pytest.mark.parametrize(
    ("text", "expected", "counts"),
    [
        # A number before a card that forms a Luhn-valid window with its first groups
        # used to be masked instead of the card, showing 8 to 12 of its digits.
        ("order 100009 4539 1488 0343 6467", "order ****6467", {"card_number": 1}),
        ("paid 2024 4768 4268 4656 3212", "paid ****3212", {"card_number": 1}),
        # Two cards side by side stay two.
        ("4111 1111 1111 1111 5500 0000 0000 0004", "****1111 ****0004", {"card_number": 2}),
        # Bearer and Basic credentials after any whitespace, ':' or '=', masked whole.
        ("auth Bearer\nKx7tokVALA3abcd", "auth Bearer\n****", {"bearer": 1}),
        (
            "Authorization: Bearer\r\nsk_live_Hh8NlTok",
            "Authorization: Bearer\r\n****",
            {"bearer": 1},
        ),
        ("Bearer\u00a0abc123xyz", "Bearer\u00a0****", {"bearer": 1}),
        ("Bearer:abc123xyz", "Bearer:****", {"bearer": 1}),
        ("bearer=abc123456", "bearer=****", {"bearer": 1}),
        ("Basic\u00a0dXNlcjpwYXNzd29yZA==", "Basic\u00a0****", {"bearer": 1}),
        ("Bearer abc123%2FHh8PctTok", "Bearer ****", {"bearer": 1}),
        ("Bearer sk:live", "Bearer ****", {"bearer": 1}),
        ("Bearer ab$cd", "Bearer ****", {"bearer": 1}),
        ("hdr_Bearer abc123xyz", "hdr_Bearer ****", {"bearer": 1}),
        ('{"auth":"Bearer abc123xyz"}', '{"auth":"Bearer ****"}', {"bearer": 1}),
        ("(Bearer abc123xyz)", "(Bearer ****)", {"bearer": 1}),
        # Still not credentials: a short word, and "Basic" before what is not base64.
        ("Bearer: the holder", "Bearer: the holder", {}),
        ("Basic ünïcode", "Basic ünïcode", {}),
    ],
)
def test_detector_gaps_found_by_the_audit(text: str, expected: str, counts: dict[str, int]) -> None:
    masked, found = scan(text)
    assert masked == expected
    assert found == {f"detector:{name}": n for name, n in counts.items()}


@given(
    body=st.text("0123456789", min_size=15, max_size=15),
    prefix=st.text("0123456789", min_size=1, max_size=6),
)
def test_a_number_before_a_card_never_shows_more_than_its_last_four_digits(
    body: str, prefix: str
) -> None:
    card = _luhn_complete(body)
    grouped = " ".join(card[i : i + 4] for i in range(0, 16, 4))
    masked, counts = scan(f"ref {prefix} {grouped} end")
    assert masked in (f"ref {prefix} ****{card[-4:]} end", f"ref ****{card[-4:]} end")
    assert counts == {"detector:card_number": 1}


@pytest.mark.parametrize(
    ("metadata", "expected", "counts"),
    [
        ({"cc": 4111111111111111}, {"cc": "****1111"}, {"detector:card_number": 1}),
        ({"cc": 4111111111111111.0}, {"cc": "****1111"}, {"detector:card_number": 1}),
        ({"cc": [378282246310005]}, {"cc": ["****0005"]}, {"detector:card_number": 1}),
        # Numbers that are not cards stay numbers.
        ({"n": 4111111111111112, "f": 4111111111111111.5}, None, {}),
        ({"id": 1234567890123456789012, "small": 4111, "yes": True}, None, {}),
    ],
)
def test_card_numbers_sent_as_json_numbers_are_masked(
    metadata: dict[str, Any], expected: dict[str, Any] | None, counts: dict[str, int]
) -> None:
    masked, found = mask_metadata(copy.deepcopy(metadata))
    assert masked == (metadata if expected is None else expected)
    assert found == counts


def test_keys_are_scanned_like_values() -> None:
    """An address, token or card used as a key (per-user maps) is masked there too."""
    metadata, counts = mask_metadata(
        {
            "recipients": {"jane.doe@example.com": "sent", "ok": 1},
            f"Bearer {JWT}": 1,
            "password": {"john.roe@example.com": "hunter2"},
        }
    )
    assert metadata == {
        "recipients": {"j*****e@example.com": "sent", "ok": 1},
        "Bearer ****": 1,
        "password": {"j*****e@example.com": MASK},
    }
    assert counts == {"detector:email": 2, "detector:bearer": 1, "password": 1}


def test_keys_masked_alike_keep_every_value_and_their_order() -> None:
    metadata, counts = mask_metadata({"an@x.io": 1, "plain": 2, "am@x.io": 3})
    assert list(metadata.items()) == [("*****@x.io", 1), ("plain", 2), ("*****@x.io#2", 3)]
    assert counts == {"detector:email": 2}


def test_a_masked_key_is_masked_and_counted_each_time() -> None:
    km = masker()
    for _ in range(3):
        metadata, counts = mask_metadata({"jane.doe@example.com": 1, "user": 2}, km)
        assert metadata == {"j*****e@example.com": 1, "user": 2}
        assert counts == {"detector:email": 1}
    assert "cached=1" in repr(km)  # "user" only


def test_a_letter_that_case_folds_to_ascii_does_not_hide_a_baseline_key() -> None:
    # "ß" case-folds to "ss": "passwordß" became "passwordss", which matched nothing.
    metadata, counts = mask_metadata({"passwordß": "Ty6EszettPw", "ßecret": "x"})
    assert metadata == {"passwordß": MASK, "ßecret": "x"}
    assert counts == {"password": 1}
