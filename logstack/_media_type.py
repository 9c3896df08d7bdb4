"""A parameter of a ``Content-Type`` value, for both sides of LogStack's HTTP (the ingest
route reads the client's, the Loki client reads Loki's answers)."""

from __future__ import annotations

import codecs

__all__ = ["charset_of", "codec_name"]


def charset_of(content_type: str) -> str | None:
    """The ``charset`` parameter as written (quotes removed), or ``None``."""
    for parameter in content_type.split(";")[1:]:
        name, _, value = parameter.strip().partition("=")
        if name.strip().lower() == "charset":
            return value.strip().strip('"') or None
    return None


def codec_name(charset: str) -> str | None:
    """Python's name for ``charset`` (``UTF8`` → ``utf-8``), ``None`` if it has none."""
    try:
        return codecs.lookup(charset).name
    except LookupError:
        return None
