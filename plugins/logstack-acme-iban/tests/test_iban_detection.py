"""The detector on its own: table tests, then properties over generated IBANs and text."""

from __future__ import annotations

import string

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st
from logstack_acme_iban import IBAN_LENGTHS, IbanMasker, is_valid_iban

# Published examples (national banking associations, the SWIFT IBAN registry).
VALID = [
    "DE89370400440532013000",
    "GB82WEST12345698765432",
    "NL91ABNA0417164300",
    "FR1420041010050500013M02606",
    "BE68539007547034",
    "IT60X0542811101000000123456",
    "CH9300762011623852957",
    "NO9386011117947",
    "ES9121000418450200051332",
    "MT84MALT011000012345MTLCAST001S",
]


def with_check_digits(country: str, bban: str) -> str:
    """The IBAN for ``bban`` in ``country``: the check digits that make mod 97 equal 1."""
    numeric = int("".join(str(int(c, 36)) for c in bban + country + "00"))
    return f"{country}{98 - numeric % 97:02d}{bban}"


def print_format(compact: str) -> str:
    return " ".join(compact[i : i + 4] for i in range(0, len(compact), 4))


@pytest.mark.parametrize("iban", VALID)
def test_published_examples_are_valid_in_both_formats(iban: str) -> None:
    assert is_valid_iban(iban)
    masker = IbanMasker()
    assert masker.mask_text(iban) == (f"{iban[:2]}****{iban[-4:]}", 1)
    assert masker.mask_text(print_format(iban)) == (f"{iban[:2]}****{iban[-4:]}", 1)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("DE89370400440532013001", "check digits do not match"),
        ("DE8937040044053201300", "too short for DE"),
        ("DE893704004405320130000", "too long for DE"),
        ("de89370400440532013000", "lower case is not an IBAN"),
        ("XDE89370400440532013000", "glued to a word"),
        ("DE89370400440532013000X", "glued to a word"),
        ("DE89 3704 0044 0532 0130 000", "an extra digit in the last group"),
        ("D389370400440532013000", "country must be letters"),
        ("ORDER-12345678901234567890", "no country and check digits"),
        ("AB12CDEF3456GHIJ789", "mod 97 fails for a random code"),
        ("", "empty"),
    ],
)
def test_not_an_iban(text: str, why: str) -> None:
    assert IbanMasker().mask_text(text) == (text, 0), why


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("refund to DE89 3704 0044 0532 0130 00 today", "refund to DE****3000 today"),
        ("iban:DE89370400440532013000.", "iban:DE****3000."),
        ("(GB82WEST12345698765432)", "(GB****5432)"),
        ("DE89 3704 0044 0532 0130 00 ABC", "DE****3000 ABC"),
        ("DE89 3704 0044 0532 0130 00 GB82 WEST 1234 5698 7654 32", "DE****3000 GB****5432"),
        ("from NL91ABNA0417164300 to BE68539007547034", "from NL****4300 to BE****7034"),
        ("DE89370400440532013001 DE89370400440532013000", "DE89370400440532013001 DE****3000"),
    ],
)
def test_ibans_inside_text(text: str, masked: str) -> None:
    assert IbanMasker().mask_text(text)[0] == masked


@pytest.mark.parametrize(
    ("keep_last", "keep_country", "masked"),
    [(4, True, "DE****3000"), (0, True, "DE****"), (2, False, "****00"), (0, False, "****")],
)
def test_what_is_kept(keep_last: int, keep_country: bool, masked: str) -> None:
    masker = IbanMasker(keep_last=keep_last, keep_country=keep_country)
    assert masker.mask_text("DE89370400440532013000") == (masked, 1)


def test_mask_does_not_reveal_the_length() -> None:
    masker = IbanMasker(keep_last=0, keep_country=False)
    assert masker.mask_text("NO9386011117947")[0] == masker.mask_text(VALID[-1])[0] == "****"


def test_a_country_outside_the_table_is_checked_by_mod_97_alone() -> None:
    assert "ZZ" not in IBAN_LENGTHS
    iban = with_check_digits("ZZ", "1234567890ABCDEF")
    assert is_valid_iban(iban)
    assert IbanMasker().mask_text(iban)[1] == 1
    assert not is_valid_iban(with_check_digits("ZZ", "123456789"))  # under 15 characters


# ---------------------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------------------

ALNUM = string.ascii_uppercase + string.digits


@st.composite
def ibans(draw: st.DrawFn) -> str:
    country = draw(st.sampled_from(sorted(IBAN_LENGTHS)))
    bban = draw(
        st.text(ALNUM, min_size=IBAN_LENGTHS[country] - 4, max_size=IBAN_LENGTHS[country] - 4)
    )
    return with_check_digits(country, bban)


# Surrounding text that cannot glue onto an IBAN: it starts and ends with a separator.
separators = st.sampled_from([" ", ", ", ": ", "\n", " (", ") ", "; ", "="])
words = st.text(string.ascii_lowercase + " .,:;-_/", max_size=30)
around = st.builds(lambda sep, w, sep2: sep + w + sep2, separators, words, separators)


@given(iban=ibans(), before=around, after=around, printed=st.booleans())
@example(iban="DE89370400440532013000", before=" ", after=" ", printed=True)
def test_every_generated_iban_is_masked_and_nothing_else_changes(
    iban: str, before: str, after: str, printed: bool
) -> None:
    written = print_format(iban) if printed else iban
    masked, found = IbanMasker().mask_text(before + written + after)
    assert found == 1
    assert masked == before + f"{iban[:2]}****{iban[-4:]}" + after
    assert iban[4:-4] not in masked.replace(" ", "")


@given(first=ibans(), second=ibans(), sep=separators)
def test_adjacent_ibans_are_both_masked(first: str, second: str, sep: str) -> None:
    masked, found = IbanMasker(keep_last=0, keep_country=False).mask_text(
        print_format(first) + sep + print_format(second)
    )
    assert (masked, found) == (f"****{sep}****", 2)


@given(st.text(max_size=200))
def test_any_text_is_handled(text: str) -> None:
    masked, found = IbanMasker().mask_text(text)
    assert isinstance(masked, str)
    assert found == 0 or masked != text


@given(iban=ibans(), position=st.integers(min_value=2, max_value=14), digit=st.integers(0, 9))
def test_a_changed_digit_is_never_valid(iban: str, position: int, digit: int) -> None:
    """Mod 97-10 catches every single-digit substitution (ISO 7064)."""
    assume(iban[position].isdigit())
    changed = iban[:position] + str(digit) + iban[position + 1 :]
    assert is_valid_iban(changed) == (changed == iban)
