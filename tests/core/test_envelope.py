"""The request body as the stages read it: gzip members, limits, UTF-8; what a request
holds of the memory budget, and that an answered one holds nothing."""

from __future__ import annotations

import gc
import gzip
import weakref
from collections.abc import Iterator

import msgspec
import pytest

from logstack._body_budget import BodyBudget, held_for
from logstack._envelope import GZIP_MAX_MEMBERS, Envelope, gunzip_bounded
from logstack._errors import PayloadTooLargeError, UnavailableError, ValidationError
from logstack._schema import MAX_PROBLEMS

DOC = b'{"entries": [{"message": "hello"}]}'


def test_one_member_inflates() -> None:
    assert gunzip_bounded(gzip.compress(DOC), 1024) == DOC


def test_members_one_after_another_inflate_as_one_body() -> None:
    """RFC 1952 §2.2: what ``cat a.gz b.gz`` makes is one valid gzip file."""
    body = gzip.compress(DOC[:10]) + gzip.compress(DOC[10:20]) + gzip.compress(DOC[20:])
    assert gunzip_bounded(body, 1024) == DOC


def test_the_limit_counts_every_member() -> None:
    body = gzip.compress(b"x" * 600) + gzip.compress(b"y" * 600)
    assert gunzip_bounded(body, 1200) == b"x" * 600 + b"y" * 600
    with pytest.raises(PayloadTooLargeError):
        gunzip_bounded(body, 1199)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (gzip.compress(DOC) + b"trailing", "8 bytes after the end of the gzip stream"),
        (gzip.compress(DOC) + b"\0\0", "2 bytes after the end of the gzip stream"),
        (gzip.compress(DOC) + gzip.compress(DOC)[:-3], "truncated gzip stream"),
        (gzip.compress(DOC) + b"\x1f\x8bjunk", "invalid gzip stream"),
        (gzip.compress(DOC)[:-4], "truncated gzip stream"),
        (b"not gzip at all", "invalid gzip stream"),
    ],
)
def test_anything_else_after_a_member_is_refused(body: bytes, problem: str) -> None:
    with pytest.raises(ValidationError) as info:
        gunzip_bounded(body, 1024)
    assert info.value.reason == "bad_encoding"
    assert info.value.body()["details"]["errors"] == [{"field": "body", "message": problem}]


def test_members_are_counted() -> None:
    empty = gzip.compress(b"")
    assert gunzip_bounded(empty * GZIP_MAX_MEMBERS, 10) == b""
    with pytest.raises(ValidationError) as info:
        gunzip_bounded(empty * (GZIP_MAX_MEMBERS + 1), 10)
    assert f"more than {GZIP_MAX_MEMBERS} gzip members" in info.value.message


@pytest.mark.parametrize(
    "body",
    [
        b'{"entries": [{"message": "bad \xff"}]}',
        b'{"entries": [{"\xc0\xaf": 1}]}',
        b'{"entries": [{"message": "cut \xe2\x82"}]}',
    ],
)
def test_a_body_that_is_not_utf8_is_the_clients_error(body: bytes) -> None:
    envelope = Envelope(request_id="r", authorization="Bearer x", body=body)
    with pytest.raises(ValidationError) as info:
        envelope.document()
    assert info.value.reason == "malformed_json"
    [problem] = info.value.body()["details"]["errors"]
    assert problem["field"] == "body"
    assert problem["message"].startswith("a string is not valid UTF-8 (")


def test_every_unknown_top_level_field_is_listed() -> None:
    body = b'{"zzz": 2, "entries": [], "extra": 1}'
    with pytest.raises(ValidationError) as info:
        Envelope(request_id="r", authorization="Bearer x", body=body).document()
    assert info.value.reason == "schema"
    assert (
        info.value.message == "extra: unknown field 'extra'; only 'entries' is allowed (and 1 more)"
    )
    assert [p["field"] for p in info.value.body()["details"]["errors"]] == ["extra", "zzz"]


def test_a_long_unknown_field_name_is_shown_cut_to_64_characters() -> None:
    """A 500 KB key name once came back three times in the answer (2 MB)."""
    name = "s3cr3t-" + "A" * 500_000
    body = msgspec.json.encode({"entries": [], name: 1})
    with pytest.raises(ValidationError) as info:
        Envelope(request_id="r", authorization="Bearer x", body=body).document()
    shown = name[:64] + "..."
    assert info.value.message == f"{shown}: unknown field {shown!r}; only 'entries' is allowed"
    assert [p["field"] for p in info.value.body()["details"]["errors"]] == [shown]
    assert len(msgspec.json.encode(info.value.body())) < 500


def test_a_flood_of_unknown_fields_gets_a_bounded_answer() -> None:
    body = msgspec.json.encode({"entries": [], **{f"k{i:06d}": 1 for i in range(5000)}})
    with pytest.raises(ValidationError) as info:
        Envelope(request_id="r", authorization="Bearer x", body=body).document()
    details = info.value.body()["details"]
    assert len(details["errors"]) == MAX_PROBLEMS and details["truncated"] is True
    assert info.value.message.endswith("(and 4999 more)")


class _Held:
    """Something a stage's frame refers to while it refuses a request."""


def _refuse_in_a_frame(envelope: Envelope, held: _Held, chained: bool) -> None:
    """A stage's ``process`` refusing a request, as the runtime catches and answers it."""

    def process(envelope: Envelope, held: _Held) -> None:
        envelope.document()
        if not chained:
            raise ValidationError("refused")
        try:
            msgspec.json.decode(b"{")
        except msgspec.DecodeError:
            raise ValidationError("refused") from None

    try:
        process(envelope, held)
    except ValidationError as error:
        envelope.reject(error)


@pytest.fixture
def no_collector() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


@pytest.mark.usefixtures("no_collector")
@pytest.mark.parametrize("chained", [False, True], ids=["raised", "raised-from-another"])
def test_a_refused_request_is_freed_once_answered_without_the_collector(chained: bool) -> None:
    """The answer's traceback held the frames that raised it, and through them the
    envelope: a reference cycle that kept every refused body, decoded, until a rare full
    collection (300 refused 1 MiB requests left the server at 850 MiB, growing with each
    round)."""
    envelope = Envelope(request_id="r", authorization=None, body=DOC)
    held = _Held()
    alive = weakref.ref(held)
    _refuse_in_a_frame(envelope, held, chained)
    assert isinstance(envelope.reply.outcome, ValidationError)
    assert envelope.raw_entries is None  # its decoded body is dropped at once
    del envelope, held
    assert alive() is None


def test_a_whole_body_holds_itself_and_its_decoded_form_until_released() -> None:
    budget = BodyBudget(10 * len(DOC))
    envelope = Envelope(request_id="r", authorization=None, body=DOC, budget=budget)
    envelope.hold(held_for(len(DOC)))
    assert budget.held == envelope.held == held_for(len(DOC)) == 5 * len(DOC)
    other = Envelope(request_id="s", authorization=None, body=DOC, budget=budget)
    other.hold(held_for(len(DOC)))
    with pytest.raises(UnavailableError) as refused:  # a third would pass the bound
        Envelope(request_id="t", authorization=None, body=DOC, budget=budget).hold(1)
    assert refused.value.status == 503 and refused.value.reason == "bodies_in_flight"
    envelope.release()
    other.release()
    assert budget.held == envelope.held == other.held == 0


def test_a_request_alone_may_pass_the_bound() -> None:
    """Alone, a request is bounded by the body limit; refusing it would refuse it forever."""
    budget = BodyBudget(len(DOC))
    envelope = Envelope(request_id="r", authorization=None, body=DOC, budget=budget)
    envelope.hold(len(DOC))
    envelope.hold(held_for(len(DOC)) - len(DOC))
    assert budget.held == held_for(len(DOC))


def test_an_inflated_body_holds_its_inflated_size() -> None:
    padded = b'{"entries": [{"message": "' + b"x" * 4000 + b'"}]}'
    packed = gzip.compress(padded)
    budget = BodyBudget(held_for(len(padded)) + len(packed))
    envelope = Envelope(
        request_id="r",
        authorization=None,
        body=packed,
        content_encoding="gzip",
        budget=budget,
    )
    envelope.hold(len(packed))
    assert envelope.json_body() == padded
    assert budget.held == envelope.held == held_for(len(padded))
    beside = Envelope(request_id="s", authorization=None, body=packed, budget=budget)
    beside.hold(len(packed))
    beside.content_encoding = "gzip"
    with pytest.raises(UnavailableError):
        beside.json_body()
    assert beside.body == packed  # refused before it was replaced: nothing more is held
    assert budget.held == held_for(len(padded)) + len(packed)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"entries": [{"a": 1}, {"metadata": {"x": 1e400}}]}', "entries[1]"),
        (b'{"entries": [{"metadata": {"x": ' + b"9" * 5000 + b"}}]}", "entries[0]"),
    ],
)
def test_a_number_out_of_range_is_a_schema_problem_naming_its_entry(
    body: bytes, field: str
) -> None:
    """Valid JSON that the schema refuses was answered "not valid JSON" with no field."""
    with pytest.raises(ValidationError) as info:
        Envelope(request_id="r", authorization="Bearer x", body=body).document()
    assert info.value.reason == "schema"
    [problem] = info.value.body()["details"]["errors"]
    assert problem == {
        "field": field,
        "message": "holds a number out of range (integers must fit 64 bits, others a double)",
    }
