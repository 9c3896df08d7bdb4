"""The service's own logs: JSON lines, request ids from the context, secrets redacted."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from logstack._logging import (
    REDACTED,
    JsonFormatter,
    TextFormatter,
    configure_logging,
    redact,
    request_id_var,
    set_secrets,
)

TOKEN = "logstack_1a2b3c4d5e6f7890abcdef12"
ADMIN = "logstack_admin123456789abcdef0123"


@pytest.fixture(autouse=True)
def secrets() -> Iterator[None]:
    set_secrets([TOKEN, ADMIN, None])
    yield
    set_secrets([])


def record(msg: str, *args: Any, exc_info: Any = None, **extra: Any) -> logging.LogRecord:
    rec = logging.LogRecord("logstack.test", logging.WARNING, __file__, 1, msg, args, exc_info)
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def as_json(rec: logging.LogRecord) -> dict[str, Any]:
    line = JsonFormatter().format(rec)
    assert "\n" not in line
    doc: dict[str, Any] = json.loads(line)
    return doc


def test_json_line_fields_and_extras() -> None:
    doc = as_json(record("pushed %d entries", 3, token="payments-api", status=204))
    assert doc["level"] == "WARNING"
    assert doc["logger"] == "logstack.test"
    assert doc["msg"] == "pushed 3 entries"
    assert doc["token"] == "payments-api" and doc["status"] == 204
    assert doc["ts"].endswith("Z") and "T" in doc["ts"]
    assert "request_id" not in doc


def test_request_id_comes_from_the_context() -> None:
    reset = request_id_var.set("req-42")
    try:
        assert as_json(record("x"))["request_id"] == "req-42"
        assert "request_id=req-42" in TextFormatter("%(message)s").format(record("x"))
    finally:
        request_id_var.reset(reset)
    assert "request_id" not in as_json(record("x"))


def test_an_explicit_request_id_wins() -> None:
    """Stages log about a request outside its context and name it explicitly."""
    reset = request_id_var.set("outer")
    try:
        assert as_json(record("x", request_id="inner"))["request_id"] == "inner"
    finally:
        request_id_var.reset(reset)


def test_exceptions_are_one_field() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        doc = as_json(record("failed", exc_info=sys.exc_info()))
    assert "ValueError: boom" in doc["exception"]


def test_unencodable_extras_never_lose_the_line() -> None:
    doc = as_json(record("odd", thing=object(), mapping={1: "int key"}))
    assert doc["msg"] == "odd"
    assert "object" in doc["thing"]


@pytest.mark.parametrize(
    "text",
    [
        f"token {TOKEN} leaked",
        f"Authorization: Bearer {TOKEN}",
        f"admin={ADMIN}",
        "authorization: bearer some-unknown-credential",
        'headers={"Authorization": "Bearer abc.def.ghi"}',
    ],
)
def test_secrets_and_bearer_credentials_are_redacted(text: str) -> None:
    out = redact(text)
    assert TOKEN not in out and ADMIN not in out
    assert "some-unknown-credential" not in out and "abc.def.ghi" not in out
    assert REDACTED in out


def test_redaction_applies_to_formatted_lines() -> None:
    doc = as_json(record("saw %s", TOKEN, header=f"Bearer {ADMIN}", nested={"t": TOKEN}))
    line = json.dumps(doc)
    assert TOKEN not in line and ADMIN not in line
    text = TextFormatter("%(message)s").format(record("saw %s", TOKEN))
    assert TOKEN not in text


def test_ordinary_text_is_left_alone() -> None:
    for text in (
        "masked key detector:bearer",
        "payments-api: 3 entries",
        "bearer",
        'WWW-Authenticate: Bearer realm="logstack"',
    ):
        assert redact(text) == text


def test_secrets_follow_reloads() -> None:
    set_secrets(["a_new_token_0123456789"])
    assert REDACTED in redact("a_new_token_0123456789")
    assert redact(TOKEN) == TOKEN  # no longer configured: no longer special
    set_secrets([])
    assert redact("a_new_token_0123456789") == "a_new_token_0123456789"


def test_configure_logging_installs_one_handler(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging("INFO", "json")
        configure_logging("DEBUG", "json")  # idempotent: still one handler
        assert len(root.handlers) == 1 and root.level == logging.DEBUG
        logging.getLogger("logstack.x").info("hello %s", TOKEN)
        err = capsys.readouterr().err
        assert json.loads(err.strip().splitlines()[-1])["msg"] == f"hello {REDACTED}"
        configure_logging("WARNING", "text")
        assert isinstance(root.handlers[0].formatter, TextFormatter)
        configure_logging("INFO", "json", {"worker": "1"})  # a worker's lines say whose
        logging.getLogger("logstack.x").info("from a worker", extra={"token": "alpha"})
        doc = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
        assert (doc["worker"], doc["token"]) == ("1", "alpha")
        configure_logging("INFO", "text", {"worker": "1"})
        logging.getLogger("logstack.x").info("from a worker")
        assert capsys.readouterr().err.rstrip().endswith("from a worker worker=1")
    finally:
        configure_logging("INFO", "json")  # no fields left behind for other tests
        root.handlers[:], level = saved
        root.setLevel(level)


def test_the_services_secrets_include_lokis_credentials() -> None:
    from logstack._config import load_settings
    from logstack._service import _secrets_of

    basic = load_settings(
        env={"LOGSTACK_LOKI_USERNAME": "123456", "LOGSTACK_LOKI_PASSWORD": "glc_0123456789"}
    )
    set_secrets(_secrets_of(basic))
    assert redact("sent glc_0123456789") == f"sent {REDACTED}"
    header = basic.loki.authorization()
    assert header is not None and redact(header) == REDACTED
    set_secrets(_secrets_of(load_settings(env={"LOGSTACK_LOKI_BEARER_TOKEN": "t0k3n-for-loki"})))
    assert redact("t0k3n-for-loki") == REDACTED
    short = load_settings(env={"LOGSTACK_LOKI_USERNAME": "u", "LOGSTACK_LOKI_PASSWORD": "abc"})
    set_secrets(_secrets_of(short))
    assert redact("abc def") == "abc def"  # too short to redact without mangling every line


def test_the_text_format_keeps_the_extras() -> None:
    """A failed stage's name, the token and the reason were in JSON lines only: the text
    line said just "stage failed"."""
    line = TextFormatter("%(levelname)s %(name)s: %(message)s").format(
        record("stage failed", stage="audit_boom", reason="two words", status=500)
    )
    assert (
        line == 'WARNING logstack.test: stage failed stage=audit_boom reason="two words" status=500'
    )


def test_the_text_format_puts_the_exception_after_the_line() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        rec = record("failed", exc_info=sys.exc_info(), stage="x")
    first, *rest = TextFormatter("%(message)s").format(rec).splitlines()
    assert first == "failed stage=x"
    assert rest[0].startswith("Traceback") and rest[-1] == "ValueError: boom"
