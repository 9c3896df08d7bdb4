"""The service's own logs: JSON lines (default) with the request id on every line.

* ``request_id`` comes from a context variable that the HTTP layer sets for each request
  before the app runs, so every line written while serving that request carries it (trio
  tasks started from the request inherit it). Lines about a request written elsewhere (a
  pipeline stage) pass ``extra={"request_id": ...}``.
* Tokens are never printed: keys are named by their ``name`` everywhere, and as a last line
  of defence every formatted line goes through ``redact``: the configured API tokens and the
  admin token (``set_secrets``, refreshed on reload) and anything after ``Bearer `` become
  ``<redacted>``.
"""

from __future__ import annotations

import contextvars
import logging
import re
import sys
import time
from collections.abc import Iterable
from typing import Any, Final

import msgspec

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "logstack_request_id", default=None
)

REDACTED: Final = "<redacted>"
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
_encoder = msgspec.json.Encoder(enc_hook=repr)
_BEARER = re.compile(r"(?i)(bearer)(\s+|%20|\\u0020)(?!<redacted>|realm=)[^\s\"'\\,;]+")
_secrets: re.Pattern[str] | None = None
_process_fields: dict[str, str] = {}
"""Fields on every line of this process (a worker's ``worker``), set by ``configure_logging``."""


def set_secrets(secrets: Iterable[str | None]) -> None:
    """Strings that must never appear in a log line (API tokens, the admin token)."""
    global _secrets
    values = sorted({s for s in secrets if s}, key=len, reverse=True)
    _secrets = re.compile("|".join(re.escape(v) for v in values)) if values else None


def redact(text: str) -> str:
    """``text`` without known secrets or bearer credentials."""
    text = _BEARER.sub(lambda m: f"{m[1]}{m[2]}{REDACTED}", text)
    pattern = _secrets
    if pattern is not None:
        text = pattern.sub(REDACTED, text)
    return text


def _timestamp(record: logging.LogRecord) -> str:
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        + f".{int(record.msecs):03d}Z"
    )


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, request_id, then any ``extra``."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update(_process_fields)
        request_id = request_id_var.get()
        if request_id is not None:
            doc["request_id"] = request_id
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        try:
            line = _encoder.encode(doc).decode("utf-8", "replace")
        except (TypeError, ValueError, OverflowError, msgspec.EncodeError):
            # A non-string key or similar in an ``extra``: never lose the line for it.
            doc = {
                k: v if isinstance(v, str | int | float | bool) else repr(v) for k, v in doc.items()
            }
            line = _encoder.encode(doc).decode("utf-8", "replace")
        return redact(line)


class TextFormatter(logging.Formatter):
    """The format string's line, then ``request_id`` and every ``extra`` as ``key=value``
    (values with spaces or quotes JSON-quoted), then the exception, if any: the same facts
    as a JSON line (the stage that failed, the token, the reason)."""

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        if self.usesTime():
            record.asctime = self.formatTime(record, self.datefmt)
        parts = [self.formatMessage(record)]
        parts += [f"{key}={value}" for key, value in _process_fields.items()]
        request_id = request_id_var.get()
        if request_id:
            parts.append(f"request_id={request_id}")
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                parts.append(f"{key}={_text_value(value)}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return redact(line)


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    if not text or any(c.isspace() or c in '"=' for c in text):
        return _encoder.encode(text).decode("utf-8", "replace")
    return text


def configure_logging(level: str, fmt: str, fields: dict[str, str] | None = None) -> None:
    """Log to stderr at ``level`` in ``fmt`` (``json`` or ``text``); ``fields`` go on every
    line (a worker's ``worker``: with several workers, which one's WAL shard a line is
    about was otherwise unknown)."""
    _process_fields.clear()
    _process_fields.update(fields or {})
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
