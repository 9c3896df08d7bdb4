"""Find IBANs in free text and mask them: ISO 13616 shape, length per country, mod-97 check.

Pure functions, no LogStack imports: the part of a plugin worth testing exhaustively
(``tests/test_iban_detection.py``) is kept apart from the stage that wires it in.

An IBAN is a country code (two capital letters), two check digits, and a BBAN of 11-30
capital letters or digits, written either compact (``DE89370400440532013000``) or in the
print format, groups of four separated by single spaces (``DE89 3704 0044 0532 0130 00``).
A candidate counts only if its length matches its country's and its check digits pass
ISO 7064 mod 97-10: a random code has a 1 in 97 chance to pass, so product codes, hex ids
and order numbers are left alone. Lower-case text is never an IBAN (electronic and print
formats are upper case), which keeps request ids and hashes out of reach.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MASK = "****"

IBAN_LENGTHS: dict[str, int] = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22,
    "BH": 22, "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22,
    "DK": 18, "DO": 28, "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FO": 18, "FR": 27,
    "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28,
    "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20,
    "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27,
    "MD": 24, "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15,
    "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24,
    "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "ST": 25, "SV": 28,
    "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}  # fmt: skip
"""Total length per country, from the SWIFT IBAN registry. A country not listed here (the
registry grows) is accepted at any length from ``MIN_LENGTH`` to ``MAX_LENGTH``: better a
rare false positive than an unmasked account number."""

MIN_LENGTH = 15
MAX_LENGTH = 34

# Country, check digits, then 11-30 more characters, each optionally preceded by one space.
# The candidate starts and ends at a word boundary; it may run into following words
# ("... 0130 00 ABC"), which ``_iban_prefix`` trims off group by group.
_CANDIDATE = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11,30}(?![A-Za-z0-9])")


def is_valid_iban(compact: str) -> bool:
    """Whether ``compact`` (no spaces) has a plausible length and passes mod 97-10."""
    expected = IBAN_LENGTHS.get(compact[:2])
    if expected is not None and len(compact) != expected:
        return False
    if not MIN_LENGTH <= len(compact) <= MAX_LENGTH:
        return False
    if not (compact[:2].isalpha() and compact[2:4].isdigit() and compact.isalnum()):
        return False
    rearranged = compact[4:] + compact[:4]
    # A=10 ... Z=35: ``int(c, 36)`` maps digits to themselves and letters to 10-35.
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


def _iban_prefix(candidate: str) -> str | None:
    """The longest run of ``candidate``'s leading space-separated groups that is a valid
    IBAN, as written (with its spaces), or None."""
    groups = candidate.split(" ")
    for end in range(len(groups), 0, -1):
        written = " ".join(groups[:end])
        if is_valid_iban(written.replace(" ", "")):
            return written
    return None


@dataclass(frozen=True, slots=True)
class IbanMasker:
    """Replaces every IBAN in a string with the country code, ``****`` and its last
    ``keep_last`` characters (``DE89 3704 0044 0532 0130 00`` → ``DE****3000``).

    The mask never depends on the IBAN's length, and what is kept is at most what a bank
    statement prints.
    """

    keep_last: int = 4
    keep_country: bool = True

    def mask_iban(self, compact: str) -> str:
        head = compact[:2] if self.keep_country else ""
        tail = compact[-self.keep_last :] if self.keep_last else ""
        return f"{head}{MASK}{tail}"

    def mask_text(self, text: str) -> tuple[str, int]:
        """``text`` with every IBAN masked, and how many were masked."""
        search = _CANDIDATE.search
        match = search(text)
        if match is None:  # the common case: one regex scan, no allocation
            return text, 0
        out: list[str] = []
        done = 0  # text[:done] is already in ``out``
        found = 0
        while match is not None:
            iban = _iban_prefix(match.group())
            if iban is None:
                # Not an IBAN from here; one may still start at a later word.
                match = search(text, match.start() + 1)
                continue
            start = match.start()
            out.append(text[done:start])
            out.append(self.mask_iban(iban.replace(" ", "")))
            done = start + len(iban)
            found += 1
            match = search(text, done)
        out.append(text[done:])
        return "".join(out), found
