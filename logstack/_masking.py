"""The masking engine (SPEC §5): sensitive keys and sensitive-looking values, masked in place.

Pure and synchronous; ``stages/mask.py`` runs it on every decoded request before anything
touches disk. Two mechanisms:

* **Keys.** A key whose *normalised* name (NFKC, case-folded, non-alphanumerics removed:
  ``API-Key``, ``apiKey`` and ``api_key`` all become ``apikey``) equals a configured key is
  masked at any depth of ``metadata`` and ``labels``, through lists. Exact match only:
  ``author``, ``monkey`` and ``tokenizer_name`` are left alone. A matched value becomes
  ``****`` unless a partial rule applies; a matched list or object has every scalar leaf
  masked. Classification is cached per raw key, since the same keys repeat across entries.
* **Values.** ``message`` and every string in ``metadata``/``labels`` not already masked by
  key, and the keys of ``metadata``/``labels`` themselves, are scanned by the value
  detectors (a JSON number is checked for being a card): the built-ins (``email``,
  ``card_number`` passing Luhn, ``jwt``, ``bearer``), each a precompiled pass behind a
  substring pre-check that almost every string fails, and the configured ones (literal
  ``replacement``), combined into one alternation where their patterns allow it.

``Masker(settings).for_key(name)`` gives the ``KeyMasker`` of one API key (baseline plus
that key's override, which may add keys and rules but never removes the baseline).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Callable, Iterable, Sequence
from itertools import accumulate
from typing import Any, Final, TypeAlias

from ._config import DEFAULT_BASELINE_KEYS, MaskingSettings, PartialRule, ValueDetector
from ._key_names import ascii_form, ascii_letters, normalise_key

__all__ = ["MASK", "KeyMasker", "Masker", "mask_email", "normalise_key"]

MASK: Final = "****"
"""The replacement for a fully masked value: fixed, so it never reveals the length."""

HASH_PREFIX: Final = "hmac-sha256:"

CLASSIFY_CACHE_MAX = 4096
"""Raw key spellings remembered per ``KeyMasker`` (bounded: keys come from clients)."""


_EMAIL_LOCAL = r"[A-Za-z0-9._%+\-]"
_EMAIL_DOMAIN = r"[A-Za-z0-9\-]++(?:\.[A-Za-z0-9\-]++)+"
_EMAIL_FULL = re.compile(rf"{_EMAIL_LOCAL}++@{_EMAIL_DOMAIN}")


def mask_email(value: str) -> str:
    """``example@email.com`` → ``e*****e@email.com``; anything that is not an address → ``****``.

    First and last character of the local part, always five stars, then the domain. A local
    part of one or two characters would be shown whole that way, so it is masked entirely.
    """
    if _EMAIL_FULL.fullmatch(value) is None:
        return MASK
    local, _, domain = value.rpartition("@")
    return _mask_email_parts(local, domain)


def _mask_email_parts(local: str, domain: str) -> str:
    if len(local) <= 2:
        return f"*****@{domain}"
    return f"{local[0]}*****{local[-1]}@{domain}"


class _Rule:
    """How the value under one matched key is replaced; ``label`` names it in the counts."""

    __slots__ = ("_hasher", "email", "label", "prefix", "suffix")

    def __init__(self, label: str, partial: PartialRule | None, hash_secret: str) -> None:
        self.label = label
        self.prefix = partial.keep_prefix if partial else 0
        self.suffix = partial.keep_suffix if partial else 0
        self.email = bool(partial and partial.mask_email)
        # A hash rule without a secret would be an unkeyed, dictionary-attackable digest:
        # such a rule masks fully instead (the stage reports the misconfiguration once).
        self._hasher: hmac.HMAC | None = None
        if partial is not None and partial.hash:
            self.prefix = self.suffix = 0
            self.email = False
            if hash_secret:
                self._hasher = hmac.new(hash_secret.encode("utf-8"), digestmod=hashlib.sha256)

    def apply(self, value: Any) -> str:
        if isinstance(value, str):
            text = value
        elif isinstance(value, int | float) and not isinstance(value, bool):
            text = str(value)
        else:
            return MASK  # null, true/false: a hash or prefix of those would reveal them
        if self._hasher is not None:
            digest = self._hasher.copy()
            digest.update(text.encode("utf-8", "surrogatepass"))
            return HASH_PREFIX + digest.hexdigest()
        if self.email:
            return mask_email(text)
        shown = self.prefix + self.suffix
        # Reveal the kept ends only when at least as much stays hidden as is shown.
        if not shown or len(text) < 2 * shown:
            return MASK
        return text[: self.prefix] + MASK + (text[-self.suffix :] if self.suffix else "")

    def __repr__(self) -> str:
        kind = (
            "hash"
            if self._hasher is not None
            else "email"
            if self.email
            else f"keep={self.prefix}/{self.suffix}"
        )
        return f"<_Rule {self.label} {kind}>"


# ---------------------------------------------------------------------------------------
# Value detectors.
#
# Each built-in is one pass behind a pre-check ('@', 'eyJ', 'bearer'/'basic' in the lowered
# text, 13 digits for cards): C-speed tests that almost every string fails. Benchmarks
# showed a single alternation of all four costing ~110 ns per character (no branch gives
# sre a prefix to skip on), against ~1-4 ns for these gated passes, whose patterns open
# with a literal or a small character class and check their start boundary *after* it.
#
# Every pattern starts at a run boundary and uses possessive quantifiers over classes
# that exclude the next delimiter, so a scan is linear in the string length (no
# catastrophic backtracking). A handler may *reject* a candidate (Luhn fails, "bearer of"
# is not a credential); the scan then resumes one character after the candidate's start,
# so a rejected candidate never hides a secret overlapping it. The passes run in sequence
# (bearer, jwt, email, card), each on the previous one's output; a "****" never starts or
# extends a match, so nothing is masked twice.
# ---------------------------------------------------------------------------------------

# The scheme, then any whitespace (a header copied with its line break, a no-break space),
# ':' or '=' ("bearer=...", "Bearer: ..."), then the credential: everything up to the next
# whitespace, quote, bracket, comma or semicolon, so a token with '%', ':' or '$' in it is
# masked whole (a narrower class once showed the part after the first such character).
_BEARER = re.compile(r"[Bb](?<![A-Za-z][Bb])(?i:earer|asic)[\s:=]++([^\s\"'<>()\[\]{},;]++)")
_JWT = re.compile(r"eyJ(?<![A-Za-z0-9_\-]eyJ)[A-Za-z0-9_\-]++(?:\.[A-Za-z0-9_\-]*+){2,4}")
# A run of digit groups (3 to 19 digits each, the last may be shorter, a single space or
# dash between them) holding at least 13 digits; the handler finds the Luhn-valid cards in
# the run. Not allowing short groups elsewhere keeps the handler linear.
_CARD_RUN = re.compile(
    r"[0-9](?<![0-9]{2})(?=[0-9]{2})(?=(?:[ \-]?[0-9]){12})[0-9]{2,18}+(?![0-9])"
    r"(?:[ \-][0-9]{3,19}+(?![0-9]))*+(?:[ \-][0-9]{1,2}(?![0-9]))?"
)
_EMAIL_DOMAIN_AT = re.compile(rf"@{_EMAIL_DOMAIN}")
_EMAIL_LOCAL_CHARS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._%+-"
)

BUILTIN_DETECTORS: Final = ("email", "card_number", "jwt", "bearer")
MIN_BUILTIN_MATCH = 5
"""No built-in can match a shorter string (``a@b.c``)."""
MIN_CARD_MATCH = 13
CARD_RUN_MAX_GROUPS = 64
"""A longer run of digit groups is masked whole instead of searched for cards."""

_Found: TypeAlias = tuple[str | None, int, str, int]
"""A handler's verdict on a candidate: (replacement, end offset, counts label, count).

``None`` as the verdict rejects the candidate (the scan resumes one character after its
start); ``None`` as the replacement means "checked, nothing here": resume at ``end``.
"""
_Handler: TypeAlias = Callable[[re.Match[str]], _Found | None]


def _jwt_handler(match: re.Match[str]) -> _Found:
    return MASK, match.end(), "detector:jwt", 1


def _bearer_handler(match: re.Match[str]) -> _Found | None:
    text = match.group()
    credential = match.group(1)
    if text[1] in "eE":
        looks_secret = len(credential) >= 8 or not credential.isalpha()
    else:
        looks_secret = _is_basic_credential(credential)
    if not looks_secret:
        return None
    head = text[: len(text) - len(credential)]
    return head + MASK, match.end(), "detector:bearer", 1


def _is_basic_credential(credential: str) -> bool:
    """Whether ``credential`` is base64 of ``user:password`` ("Basic information" is not)."""
    if not credential.isascii():
        return False
    padded = (credential + "=" * (-len(credential) % 4)).encode("ascii")
    for decode in (base64.standard_b64decode, base64.urlsafe_b64decode):
        try:
            raw = decode(padded)
        except (binascii.Error, ValueError):
            continue
        if b":" in raw:
            return True
    return False


_SEPARATOR = re.compile(r"([ \-])")
_DIGIT_VALUE = bytes.maketrans(b"0123456789", bytes(range(10)))
_DIGIT_DOUBLED = bytes.maketrans(b"0123456789", bytes([0, 2, 4, 6, 8, 1, 3, 5, 7, 9]))


def _luhn_prefix_sums(digits: str) -> tuple[list[int], list[int]]:
    """Prefix sums that give the Luhn sum of any slice ``digits[a:b]`` in O(1).

    Luhn doubles every second digit counting from the right, so which digits are doubled
    depends on where a slice ends: ``sums[b % 2][b] - sums[b % 2][a]`` is the slice's sum.
    """
    raw = digits.encode("ascii")
    even_doubled = bytearray(len(raw))
    even_doubled[0::2] = raw[0::2].translate(_DIGIT_DOUBLED)
    even_doubled[1::2] = raw[1::2].translate(_DIGIT_VALUE)
    odd_doubled = bytearray(len(raw))
    odd_doubled[0::2] = raw[0::2].translate(_DIGIT_VALUE)
    odd_doubled[1::2] = raw[1::2].translate(_DIGIT_DOUBLED)
    return list(accumulate(even_doubled, initial=0)), list(accumulate(odd_doubled, initial=0))


def _luhn_ok(digits: str) -> bool:
    return _luhn_prefix_sums(digits)[len(digits) % 2][-1] % 10 == 0


def _card_handler(match: re.Match[str]) -> _Found | None:
    """Mask every Luhn-valid card (13 to 19 digits, whole groups) inside a run of digit groups.

    Every window of whole groups is tried, from every group on, and each valid one is
    masked; overlapping windows are masked as one span, shown by the span's last four
    digits. Taking windows one after the other instead (leftmost, longest, never
    overlapping) let a number that forms a valid window with a card's first groups hide the
    card from the search: ``order 100009 4539 1488 0343 6467`` showed ``0343 6467``.
    Windows that only touch stay apart: ``4111 1111 1111 1111 5500 0000 0000 0004`` is two
    cards.
    """
    run = match.group()
    if len(run) < MIN_CARD_MATCH:  # e.g. "123 4" followed by more short groups
        return None, match.end(), "detector:card_number", 0
    pieces = _SEPARATOR.split(run)  # group, separator, group, ...
    groups = pieces[0::2]
    if len(groups) > CARD_RUN_MAX_GROUPS:
        # Not a card listing but a flood of digit groups: mask it whole (fail closed)
        # rather than spend time proportional to its size in Python.
        return MASK, match.end(), "detector:card_number", 1
    digits = "".join(groups)
    if len(digits) < MIN_CARD_MATCH:
        return None, match.end(), "detector:card_number", 0
    if len(groups) == 1:
        if len(digits) > 19 or not _luhn_ok(digits):
            return None
        return MASK + digits[-4:], match.end(), "detector:card_number", 1
    sums = _luhn_prefix_sums(digits)
    bounds = [0, *accumulate(len(g) for g in groups)]
    spans: list[list[int]] = []  # [first group, end group), overlapping windows merged
    for first in range(len(groups)):
        start = bounds[first]
        best = 0
        # From inside a span, only windows that end past it can change anything.
        inside = bool(spans) and first < spans[-1][1]
        if inside:
            span_end = spans[-1][1]
            if span_end == len(groups):
                break  # the run ends inside the span: nothing more to find
            if bounds[span_end + 1] - start > 19:
                continue  # too far back to reach past the span
        last = max(first + 1, spans[-1][1] + 1) if inside else first + 1
        while last <= len(groups) and bounds[last] - start <= 19:
            end = bounds[last]
            if end - start >= 13:
                table = sums[end % 2]
                if (table[end] - table[start]) % 10 == 0:
                    best = last
            last += 1
        if not best:
            continue
        if inside:
            spans[-1][1] = best
        else:
            spans.append([first, best])
    if not spans:
        # Every window of the run was checked: do not rescan its suffixes (quadratic).
        return None, match.end(), "detector:card_number", 0
    out: list[str] = []
    done = 0  # groups before this index are written
    for first, best in spans:
        out.extend(pieces[max(2 * done - 1, 0) : 2 * first])
        out.append(MASK + digits[bounds[best] - 4 : bounds[best]])
        done = best
    out.extend(pieces[2 * done - 1 :])
    return "".join(out), match.end(), "detector:card_number", len(spans)


class _Pass:
    """One regex scan over a string; ``handler`` judges each candidate match."""

    __slots__ = ("_search", "handler", "pattern")

    def __init__(self, pattern: re.Pattern[str], handler: _Handler) -> None:
        self.pattern = pattern
        self.handler = handler
        self._search = pattern.search

    def run(self, text: str, counts: dict[str, int]) -> str:
        search = self._search
        match = search(text)
        if match is None:
            return text
        handler = self.handler
        parts: list[str] = []
        last = 0
        while match is not None:
            found = handler(match)
            if found is None:
                resume = match.start() + 1
                match = search(text, resume) if resume <= len(text) else None
                continue
            replacement, end, label, n = found
            if replacement is None:
                match = search(text, end) if end < len(text) else None
                continue
            parts.append(text[last : match.start()])
            parts.append(replacement)
            counts[label] = counts.get(label, 0) + n
            last = end
            match = search(text, end) if end < len(text) else None
        if not parts:
            return text
        parts.append(text[last:])
        return "".join(parts)


def _mask_emails(text: str, counts: dict[str, int]) -> str:
    """The e-mail pass: find each '@' + domain, then walk the local part back from the '@'."""
    search = _EMAIL_DOMAIN_AT.search
    domain = search(text)
    parts: list[str] = []
    last = 0
    local_chars = _EMAIL_LOCAL_CHARS
    while domain is not None:
        at = start = domain.start()
        while start > last and (
            (c := text[start - 1]) in local_chars or (c > "\x7f" and c.isalnum())
        ):  # an address's local part may hold letters of any script (RFC 6531)
            start -= 1
        if start == at:  # no local part: "@example.com" alone is not an address
            domain = search(text, at + 1)
            continue
        parts.append(text[last:start])
        parts.append(_mask_email_parts(text[start:at], domain.group()[1:]))
        last = domain.end()
        domain = search(text, last)
    if not parts:
        return text
    parts.append(text[last:])
    found = len(parts) // 2
    counts["detector:email"] = counts.get("detector:email", 0) + found
    return "".join(parts)


def _dispatch_by_group(handlers: dict[str, _Handler]) -> _Handler:
    def dispatch(match: re.Match[str]) -> _Found | None:
        return handlers[match.lastgroup or ""](match)

    return dispatch


def _literal_handler(detector: ValueDetector) -> _Handler:
    label = f"detector:{detector.name}"
    replacement = detector.replacement

    def handle(match: re.Match[str]) -> _Found | None:
        if match.end() == match.start():
            return None  # a pattern that matches the empty string masks nothing
        return replacement, match.end(), label, 1

    return handle


def _user_passes(detectors: Iterable[ValueDetector]) -> list[_Pass]:
    """Detectors without groups or inline flags share one alternation; the others run alone."""
    plain_flags = re.compile("").flags
    combinable: list[tuple[ValueDetector, re.Pattern[str]]] = []
    passes: list[_Pass] = []
    for detector in detectors:
        compiled = re.compile(detector.pattern)
        if compiled.groups == 0 and compiled.flags == plain_flags:
            combinable.append((detector, compiled))
        else:
            passes.append(_Pass(compiled, _literal_handler(detector)))
    if len(combinable) > 1:
        branches = "|".join(f"(?P<d{i}>{d.pattern})" for i, (d, _) in enumerate(combinable))
        try:
            combined = re.compile(branches)
        except re.error:  # a pattern that only compiles as a whole expression
            pass
        else:
            handlers = {f"d{i}": _literal_handler(d) for i, (d, _) in enumerate(combinable)}
            return [_Pass(combined, _dispatch_by_group(handlers)), *passes]
    return [*(_Pass(c, _literal_handler(d)) for d, c in combinable), *passes]


def _enough_digits(text: str) -> bool:
    """Whether ``text`` may hold a card: at least 13 ASCII digits.

    Counted on the UTF-8 bytes, where no other character produces a byte in ``0-9``; about
    three times faster per character than the card pattern's own scan.
    """
    raw = text.encode("utf-8", "surrogatepass")
    return len(raw) - len(raw.translate(None, b"0123456789")) >= MIN_CARD_MATCH


class _Detectors:
    """The value detectors of one configuration, shared by all its ``KeyMasker``s."""

    __slots__ = (
        "_bearer",
        "_card",
        "_email",
        "_jwt",
        "_user_passes",
        "any_builtin",
        "min_length",
        "names",
    )

    def __init__(self, builtin: Sequence[str], configured: Sequence[ValueDetector]) -> None:
        self._email = "email" in builtin
        self._jwt = _Pass(_JWT, _jwt_handler) if "jwt" in builtin else None
        self._bearer = _Pass(_BEARER, _bearer_handler) if "bearer" in builtin else None
        self._card = _Pass(_CARD_RUN, _card_handler) if "card_number" in builtin else None
        self.any_builtin = any(n in builtin for n in BUILTIN_DETECTORS)
        self._user_passes = _user_passes(configured)
        self.names = [n for n in BUILTIN_DETECTORS if n in builtin] + [d.name for d in configured]
        # Strings shorter than this cannot match anything: the walk does not even call ``scan``.
        self.min_length = 1 if self._user_passes else MIN_BUILTIN_MATCH

    def could_match_raw(self, body: bytes, squeezed: bytes) -> bool:
        """Whether any detector could match any string of this (ASCII, escape-free) JSON
        body. A superset of ``scan``'s own pre-checks, applied once to the whole body;
        ``squeezed`` is the body lower-cased with every character but letters, ``"`` and
        ``,`` deleted, and perhaps digits (deleting characters only joins text, so a word
        ``scan`` looks for stays a substring)."""
        if self._user_passes:
            return True  # their patterns may anchor on string boundaries: always walk
        # One regex for both words: its scan for their first letter runs in C, two
        # substring searches cost ~2.5 times as much (``bytes.__contains__`` is ~0.45 ns a
        # byte on JSON, whatever the needle).
        if self._bearer is not None and _BEARER_OR_BASIC.search(squeezed) is not None:
            return True
        # ``scan`` looks for "eyJ" as written; a body without a "J" (one memchr) has none.
        if self._jwt is not None and b"J" in body and b"eyJ" in body:
            return True
        if self._email and b"@" in body:
            return True
        return self._card is not None and _may_hold_card_run(body)

    def scan(self, text: str, counts: dict[str, int]) -> str:
        """``text`` with every detector match replaced (the same object if none)."""
        if self.any_builtin and len(text) >= MIN_BUILTIN_MATCH:
            if self._bearer is not None:
                lowered = text.lower()
                if "bearer" in lowered or "basic" in lowered:
                    text = self._bearer.run(text, counts)
            if self._jwt is not None and "eyJ" in text:
                text = self._jwt.run(text, counts)
            if self._email and "@" in text:
                text = _mask_emails(text, counts)
            if self._card is not None and len(text) >= MIN_CARD_MATCH and _enough_digits(text):
                text = self._card.run(text, counts)
        for user_pass in self._user_passes:
            text = user_pass.run(text, counts)
        return text

    def scan_number(self, value: int | float, counts: dict[str, int]) -> str | None:
        """A JSON number that is a card (``"cc": 4111111111111111``): its masked form as a
        string, else ``None``. The caller only asks for numbers of 13 digits or more."""
        if self._card is None:
            return None
        if isinstance(value, float):
            if not value.is_integer():
                return None
            value = int(value)
        digits = str(abs(value))
        if not MIN_CARD_MATCH <= len(digits) <= 19 or not _luhn_ok(digits):
            return None
        counts["detector:card_number"] = counts.get("detector:card_number", 0) + 1
        return MASK + digits[-4:]


def _may_hold_card_run(body: bytes) -> bool:
    """Whether ``body`` holds 13 digits in a row, each pair separated by at most one space or
    dash (how every card run starts). C-level passes instead of the equivalent regex
    ``[0-9](?:[ -]?[0-9]){12}``, which re-tries at every digit and cost ~20% of the server's
    CPU on bodies full of timestamps and ids.

    First a cheaper necessary condition, one pass: with every space and dash deleted, 13
    digits in a row. Most bodies stop there. Otherwise the exact test: digits become ``0``,
    separators ``-``, everything else ``x``; a separator next to another one breaks a run, a
    single one does not, so deleting the single ones leaves every card run as thirteen
    ``0``s in a row."""
    if _THIRTEEN_DIGITS not in body.translate(_DIGIT_SHAPE, b" -"):
        return False
    shape = body.translate(_CARD_SHAPE).replace(b"--", b"xx").replace(b"-", b"")
    return _THIRTEEN_DIGITS in shape


_DIGIT_SHAPE: Final = bytes(48 if 48 <= b <= 57 else 120 for b in range(256))
_CARD_SHAPE: Final = bytes(
    48 if 48 <= b <= 57 else 45 if b in (32, 45) else 120 for b in range(256)
)
_THIRTEEN_DIGITS: Final = b"0" * MIN_CARD_MATCH
_BEARER_OR_BASIC: Final = re.compile(rb"b(?:earer|asic)")
_SQUEEZE: Final = bytes(b + 32 if 65 <= b <= 90 else 44 if b == 123 else b for b in range(256))
"""Lower-cases ASCII letters and turns ``{`` into ``,``: see ``KeyMasker.could_match``."""


def _deleted_but(kept: bytes) -> bytes:
    return bytes(b for b in range(256) if b not in kept)


_LETTERS: Final = bytes(range(65, 91)) + bytes(range(97, 123))
_NOT_SQUEEZED: Final = _deleted_but(_LETTERS + b'0123456789",{')
_NOT_SQUEEZED_NOR_DIGITS: Final = _deleted_but(_LETTERS + b'",{')
"""What the squeeze deletes: everything but letters, ``"``, ``,``, ``{`` and (only where a
masked key has one) digits."""


def _key_pattern(keys: Sequence[bytes]) -> re.Pattern[bytes] | None:
    """What finds any of ``keys`` (normalised: ``[0-9a-z]`` only) as an object key in the
    squeezed body (``KeyMasker.could_match``): ``,"``, the key's characters with any commas
    around and between them, ``"``. The quantifiers are possessive: a comma is never a key
    character, so giving one back could not make a match."""
    if not keys:
        return None
    spelled = (b",*+".join(re.escape(key[i : i + 1]) for i in range(len(key))) for key in keys)
    return re.compile(b',",*+(?:' + b"|".join(spelled) + b'),*+"')


_WALKED_FIELDS: Final = ("metadata", "labels", "trace_id", "span_id")
"""Beside ``message``, the fields of an entry whose string values the detectors scan
(``service``, ``env`` and ``level`` are names from a closed set or pattern)."""
_MISSING: Final[Any] = object()
_PLAIN_SCALARS: Final = frozenset({int, float, bool, type(None)})
_CARD_SIZED: Final = 10 ** (MIN_CARD_MATCH - 1)
"""Numbers this large or larger (13 digits) are checked for being a card."""


class KeyMasker:
    """Masks entries for one API key. Build it through ``Masker.for_key``."""

    def __init__(self, key_name: str, rules: dict[str, _Rule], detectors: _Detectors) -> None:
        self.key_name = key_name
        self._rules = rules  # normalised key → rule
        self._cache: dict[Any, _Rule | None] = {}
        self._detectors = detectors
        self.scan = detectors.scan
        self._walk_always = any(not key.isascii() or not key for key in rules)
        keys = [key.encode() for key in rules if key.isascii() and key]
        self._key_in_squeezed = _key_pattern(keys)
        self._not_squeezed = (
            _NOT_SQUEEZED
            if any(c in b"0123456789" for key in keys for c in key)
            else _NOT_SQUEEZED_NOR_DIGITS
        )

    def could_match(self, body: bytes) -> bool:
        """A C-speed screen of the raw JSON body: ``False`` proves that no masked key and no
        detector can match anywhere in it, so the per-entry walk can be skipped.

        Sound only for bodies whose strings appear verbatim: pure ASCII (so the walker's
        NFKC/casefold normalisation is plain lower-casing) and without backslash escapes.
        Anything else is walked. Keys: the squeeze lower-cases the body and deletes every
        character but letters, ``"``, ``,`` and ``{`` (and digits, unless a masked key has
        one), turning ``{`` into ``,``. Every object key of a JSON body follows a ``{`` or a
        ``,`` (whitespace between is deleted), so each appears as ``,"<key>"``, the key's
        normalised form with at most some commas kept from it (``"pass,word"``, which
        ``normalise_key`` reads as ``password``). ``_key_pattern`` finds exactly those: an
        exact match, not a substring (a message that mentions a password is no reason to
        walk), and a search that the rare ``,"`` anchors.
        """
        if self._walk_always or not body.isascii() or b"\\" in body:
            return True
        squeezed = body.translate(_SQUEEZE, self._not_squeezed)
        if self._detectors.could_match_raw(body, squeezed):
            return True
        pattern = self._key_in_squeezed
        return pattern is not None and pattern.search(squeezed) is not None

    @property
    def masked_keys(self) -> list[str]:
        """The configured key names this masker matches (one per normalised form)."""
        return sorted(rule.label for rule in self._rules.values())

    def mask_entry(self, entry: Any, counts: dict[str, int]) -> None:
        """Mask one decoded (not yet validated) entry in place; add what was masked to ``counts``.

        ``entry`` may be any JSON value: whatever is there is masked, nothing raises.
        """
        if isinstance(entry, dict):
            message = entry.get("message")
            if isinstance(message, str):
                masked = self.scan(message, counts)
                if masked is not message:
                    entry["message"] = masked
            elif isinstance(message, dict | list):
                self._walk(message, counts)
            for field in _WALKED_FIELDS:
                value = entry.get(field)
                if isinstance(value, dict | list):
                    self._walk(value, counts)
                elif isinstance(value, str):
                    masked = self.scan(value, counts)
                    if masked is not value:
                        entry[field] = masked
        elif isinstance(entry, list):
            self._walk(entry, counts)

    def rule_for(self, key: Any) -> _Rule | None:
        """The rule masking the value under ``key``, or ``None``."""
        rule = self._cache.get(key, _MISSING)
        return self._rule_of(key) if rule is _MISSING else rule

    def _rule_of(self, key: Any) -> _Rule | None:
        normal = normalise_key(key if isinstance(key, str) else str(key))
        rule = self._rules.get(normal)
        if rule is None and not normal.isascii():
            rule = self._rules.get(ascii_form(normal))
        if rule is None and isinstance(key, str) and not key.isascii():
            # Case folding can turn a stray letter into ASCII ones ("passwordß" folds to
            # "passwordss"): try the key's own ASCII letters too.
            rule = self._rules.get(ascii_letters(key))
        return rule

    def _classify(self, key: Any, counts: dict[str, int]) -> tuple[_Rule | None, str | None]:
        """The rule for ``key``'s value, and ``key`` masked if the detectors find something
        in the key itself (an address or a token used as a key), else ``None``. Only keys
        left as they are get cached: one that is masked is masked, and counted, each time."""
        rule = self._rule_of(key)
        masked = self._masked_key(key, counts)
        if masked is None and len(self._cache) < CLASSIFY_CACHE_MAX:
            self._cache[key] = rule
        return rule, masked

    def _masked_key(self, key: Any, counts: dict[str, int]) -> str | None:
        if key.__class__ is not str and not isinstance(key, str):
            return None
        if len(key) < self._detectors.min_length:
            return None
        masked = self.scan(key, counts)
        return None if masked is key else masked

    def _walk(self, root: dict[Any, Any] | list[Any], counts: dict[str, int]) -> None:
        # An explicit stack: nesting depth is not validated yet, so no recursion limit applies.
        # Exact type tests first (what a JSON decoder produces); subclasses take the slow path.
        stack: list[Any] = [root]
        push = stack.append
        scan = self.scan
        scan_number = self._detectors.scan_number
        min_length = self._detectors.min_length
        cached = self._cache.get
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                renamed: dict[Any, str] | None = None
                for key, value in node.items():
                    rule = cached(key, _MISSING)
                    if rule is _MISSING:
                        rule, masked_key = self._classify(key, counts)
                        if masked_key is not None:
                            renamed = renamed or {}
                            renamed[key] = masked_key
                    if rule is None:
                        pass  # not a sensitive key: treated like a list item below
                    elif isinstance(value, dict | list):
                        _mask_leaves(value, rule, counts, self._masked_key)
                        continue
                    else:
                        node[key] = rule.apply(value)
                        counts[rule.label] = counts.get(rule.label, 0) + 1
                        continue
                    cls = value.__class__
                    if cls is str:
                        if len(value) >= min_length:
                            masked = scan(value, counts)
                            if masked is not value:
                                node[key] = masked
                    elif cls is dict or cls is list:
                        push(value)
                    elif cls is int or cls is float:
                        if not -_CARD_SIZED < value < _CARD_SIZED:
                            masked_number = scan_number(value, counts)
                            if masked_number is not None:
                                node[key] = masked_number
                    elif cls not in _PLAIN_SCALARS:
                        self._odd_value(node, key, value, push, counts)
                if renamed is not None:
                    _rename_keys(node, renamed)
            else:
                for index, value in enumerate(node):
                    cls = value.__class__
                    if cls is str:
                        if len(value) >= min_length:
                            masked = scan(value, counts)
                            if masked is not value:
                                node[index] = masked
                    elif cls is dict or cls is list:
                        push(value)
                    elif cls is int or cls is float:
                        if not -_CARD_SIZED < value < _CARD_SIZED:
                            masked_number = scan_number(value, counts)
                            if masked_number is not None:
                                node[index] = masked_number
                    elif cls not in _PLAIN_SCALARS:
                        self._odd_value(node, index, value, push, counts)

    def _odd_value(
        self, node: Any, key: Any, value: Any, push: Callable[[Any], None], counts: dict[str, int]
    ) -> None:
        """Subclasses of ``str``, ``dict``, ``list`` (never from a JSON decoder, but harmless)."""
        if isinstance(value, str):
            masked = self.scan(value, counts)
            if masked is not value:
                node[key] = masked
        elif isinstance(value, dict | list):
            push(value)

    def __repr__(self) -> str:
        return (
            f"<KeyMasker {self.key_name!r} keys={len(self._rules)} "
            f"cached={len(self._cache)} detectors={self._detectors.names}>"
        )


def _mask_leaves(
    root: dict[Any, Any] | list[Any],
    rule: _Rule,
    counts: dict[str, int],
    masked_key: Callable[[Any, dict[str, int]], str | None],
) -> None:
    """Every scalar inside ``root`` (any depth) replaced by ``rule``; the structure stays,
    its keys scanned as everywhere else (``masked_key``)."""
    stack: list[Any] = [root]
    label = rule.label
    while stack:
        node = stack.pop()
        renamed: dict[Any, str] | None = None
        if isinstance(node, dict):
            for key in node:
                new_key = masked_key(key, counts)
                if new_key is not None:
                    renamed = renamed or {}
                    renamed[key] = new_key
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            if isinstance(value, dict | list):
                stack.append(value)
            else:
                node[key] = rule.apply(value)
                counts[label] = counts.get(label, 0) + 1
        if renamed is not None:
            _rename_keys(node, renamed)


def _rename_keys(node: dict[Any, Any], renamed: dict[Any, str]) -> None:
    """``node`` with the keys in ``renamed`` replaced, in place and in order. A masked key
    equal to one already there (two addresses masking alike) gets ``#2``, ``#3``, ...: no
    value is dropped."""
    items = list(node.items())
    node.clear()
    for key, value in items:
        new_key = renamed.get(key, key)
        if new_key in node:
            n = 2
            while f"{new_key}#{n}" in node:
                n += 1
            new_key = f"{new_key}#{n}"
        node[new_key] = value


class Masker:
    """The masking configuration compiled once; ``for_key`` hands out cached ``KeyMasker``s."""

    def __init__(self, settings: MaskingSettings) -> None:
        self.settings = settings
        self._detectors = _Detectors(settings.builtin_detectors, settings.detectors)
        # The baseline is the hard-coded default keys plus the configured ones: even
        # settings built without validation cannot switch it off.
        self._base_keys = list(dict.fromkeys([*DEFAULT_BASELINE_KEYS, *settings.baseline_keys]))
        self._maskers: dict[str, KeyMasker] = {}

    @property
    def hash_without_secret(self) -> bool:
        """Whether a ``hash: true`` rule exists while ``hash_secret`` is empty."""
        if self.settings.hash_secret:
            return False
        rules = [*self.settings.partial_rules.values()]
        for override in self.settings.overrides.values():
            rules.extend(override.partial_rules.values())
        return any(rule.hash for rule in rules)

    def for_key(self, key_name: str) -> KeyMasker:
        masker = self._maskers.get(key_name)
        if masker is None:
            masker = self._maskers[key_name] = self._build(key_name)
        return masker

    def _build(self, key_name: str) -> KeyMasker:
        override = self.settings.overrides.get(key_name)
        keys = list(self._base_keys)
        partial_rules = dict(self.settings.partial_rules)
        if override is not None:
            keys.extend(override.keys)
            partial_rules.update(override.partial_rules)
        # A partial rule names a key to mask: it is masked even if not listed in ``keys``.
        keys.extend(partial_rules)
        by_normal: dict[str, PartialRule] = {}
        for name, partial in partial_rules.items():
            by_normal[normalise_key(name)] = partial  # later (override) spellings win
        rules: dict[str, _Rule] = {}
        for name in keys:
            normal = normalise_key(name)
            if normal and normal not in rules:
                rules[normal] = _Rule(name, by_normal.get(normal), self.settings.hash_secret)
        return KeyMasker(key_name, rules, self._detectors)

    def __repr__(self) -> str:
        return (
            f"<Masker baseline={len(self._base_keys)} overrides={len(self.settings.overrides)} "
            f"builtin={list(self.settings.builtin_detectors)} "
            f"detectors={len(self.settings.detectors)} keys_built={len(self._maskers)}>"
        )
