"""How masking compares key names: ``API-Key``, ``apiKey`` and ``api_key`` are one key.

Its own module because both the config (which refuses a key that could never match) and
the masker use it.
"""

from __future__ import annotations

import re
import unicodedata

__all__ = ["ascii_form", "ascii_letters", "normalise_key"]

_NOT_LETTER_OR_DIGIT = re.compile(r"[\W_]+")
_NOT_ASCII_ALNUM = re.compile(r"[^0-9a-z]+")


def normalise_key(key: str) -> str:
    """NFKC, case-folded, with only its letters and digits (of any script) kept:
    ``API-Key``, ``apiKey``, ``api_key``, ``APIKEY`` → ``apikey``; ``Пароль`` → ``пароль``."""
    return _NOT_LETTER_OR_DIGIT.sub("", unicodedata.normalize("NFKC", key).casefold())


def ascii_form(normal: str) -> str:
    """A normalised key with its non-ASCII letters and digits dropped as well
    (``passwordä`` → ``password``): the masker also tries this form of a key it receives,
    so a baseline word with a stray accented letter stays masked."""
    return normal if normal.isascii() else _NOT_ASCII_ALNUM.sub("", normal)


def ascii_letters(key: str) -> str:
    """A key's ASCII letters and digits after NFKC and lower-casing, without case folding,
    which can turn a non-ASCII letter into ASCII ones (``passwordß`` folds to
    ``passwordss``; this gives ``password``)."""
    return _NOT_ASCII_ALNUM.sub("", unicodedata.normalize("NFKC", key).lower())
