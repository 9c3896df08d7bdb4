"""What flows through the ingest half of the pipeline: one request with its reply slot."""

from __future__ import annotations

import re
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec
import trio

from ._body_budget import BodyBudget, held_for
from ._config import ApiKey
from ._entry import LogEntry
from ._errors import PayloadTooLargeError, RejectError, ValidationError
from ._schema import MAX_PROBLEMS, shown_key


@dataclass(slots=True, frozen=True)
class Accepted:
    """The positive answer: the entries are in the WAL and fsynced."""

    entries_accepted: int
    request_id: str


Outcome = Accepted | RejectError


class Reply:
    """A one-shot reply slot: the first ``resolve`` wins, later ones are ignored."""

    __slots__ = ("_event", "outcome")

    def __init__(self) -> None:
        self._event = trio.Event()
        self.outcome: Outcome | None = None

    @property
    def resolved(self) -> bool:
        return self.outcome is not None

    def resolve(self, outcome: Outcome) -> bool:
        if self.outcome is not None:
            return False
        self.outcome = outcome
        self._event.set()
        return True

    async def wait(self) -> Outcome:
        await self._event.wait()
        assert self.outcome is not None
        return self.outcome

    def __repr__(self) -> str:
        return f"<Reply {'pending' if self.outcome is None else type(self.outcome).__name__}>"


_json_decoder = msgspec.json.Decoder()


@dataclass(slots=True, eq=False)
class Envelope:
    """One ingest request travelling the pipeline.

    The HTTP layer fills ``authorization``, ``body`` and ``idempotency_key`` (and ``key``
    and ``rate_checked`` when it applied the ``auth`` stage's checks to the headers);
    ``auth`` sets ``key``; ``document()`` decodes the body once for whichever stage needs it first;
    ``validate`` fills ``entries``; ``wal_append`` drops ``entries`` (and the decoded
    document) once they are written, and resolves ``reply`` after the fsync.

    ``held`` is what the request holds of the worker's ``budget`` (its body and the
    estimate of its decoded form); whoever answers the request calls ``release``.
    """

    request_id: str
    authorization: str | None
    body: bytes
    idempotency_key: str | None = None
    content_encoding: str = "identity"
    max_body_bytes: int = 1024 * 1024
    received_at: float = field(default_factory=time.time)
    key: ApiKey | None = None
    rate_checked: bool = False
    """The HTTP layer already took this request's token from its key's rate limit."""
    raw_entries: list[Any] | None = None
    entries: list[LogEntry] | None = None
    masked_fields: dict[str, int] = field(default_factory=dict)
    reply: Reply = field(default_factory=Reply)
    budget: BodyBudget | None = None
    held: int = 0

    @property
    def key_name(self) -> str:
        return self.key.name if self.key is not None else "unauthenticated"

    @property
    def pending(self) -> bool:
        return not self.reply.resolved

    def reject(self, error: RejectError) -> None:
        # Kept as the answer, the error's traceback (and that of the error it was raised
        # from) would hold the frames that raised it, and through them this envelope and
        # its decoded body: a reference cycle that only a rare full collection frees.
        error.__traceback__ = error.__context__ = error.__cause__ = None
        self.raw_entries = self.entries = None
        self.reply.resolve(error)

    def accept(self, entries_accepted: int) -> bool:
        """Answer ``202``; ``False`` if the request was answered already (it timed out)."""
        return self.reply.resolve(Accepted(entries_accepted, self.request_id))

    def json_body(self) -> bytes:
        """The body as JSON bytes: gzip bodies are decompressed here (once, after
        authentication, and never past the limit), and from then on hold their inflated
        size and its decoded form (``503`` if that does not fit in the budget)."""
        if self.content_encoding == "gzip":
            inflated = gunzip_bounded(self.body, self.max_body_bytes)
            self.hold(held_for(len(inflated)) - self.held)
            self.body = inflated
            self.content_encoding = "identity"
        return self.body

    def hold(self, n: int) -> None:
        """Hold ``n`` more bytes of the budget for this request; ``UnavailableError``
        (503) if they do not fit."""
        if self.budget is not None and n > 0:
            self.budget.take(n, own=self.held)
            self.held += n

    def release(self) -> None:
        """Give back everything the request holds (it has been answered)."""
        if self.budget is not None:
            self.budget.give_back(self.held)
        self.held = 0

    def document(self) -> list[Any]:
        """The decoded ``entries`` array of the body (decoded on first use, then cached).

        Raises ``ValidationError`` for malformed JSON or a body that is not
        ``{"entries": [...]}``; entry contents are checked later by ``validate``.
        """
        if self.raw_entries is not None:
            return self.raw_entries
        try:
            doc = _json_decoder.decode(self.json_body())
        except RecursionError:
            raise ValidationError(
                "request body is nested too deeply",
                details={"errors": [{"field": "body", "message": "JSON nested too deeply"}]},
                reason="malformed_json",
            ) from None
        except UnicodeDecodeError as exc:  # msgspec reports bad UTF-8 this way
            raise ValidationError(
                "request body is not valid UTF-8",
                details={"errors": [{"field": "body", "message": _utf8_problem(exc)}]},
                reason="malformed_json",
            ) from None
        except msgspec.DecodeError as exc:
            raise _decode_error(str(exc)) from None
        if not isinstance(doc, dict):
            raise _shape_error("body", "must be a JSON object with an 'entries' array")
        unknown = sorted(shown_key(k) for k in doc if k != "entries")
        if unknown:
            problems = [
                {"field": k, "message": f"unknown field {k!r}; only 'entries' is allowed"}
                for k in unknown[:MAX_PROBLEMS]
            ]
            details: dict[str, Any] = {"errors": problems}
            if len(unknown) > MAX_PROBLEMS:
                details["truncated"] = True  # as validate says it: the answer stays small
            raise ValidationError(
                f"{unknown[0]}: {problems[0]['message']}"
                + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""),
                details=details,
                reason="schema",
            )
        entries = doc.get("entries")
        if not isinstance(entries, list):
            raise _shape_error("entries", "required: a JSON array of log entries")
        self.raw_entries = entries
        return entries

    def __repr__(self) -> str:
        return (
            f"<Envelope {self.request_id} key={self.key_name} bytes={len(self.body)} "
            f"{self.reply!r}>"
        )


def gunzip_bounded(data: bytes, limit: int) -> bytes:
    """Decompress a gzip body, refusing (413) anything that inflates past ``limit`` bytes.

    A body may be several gzip members one after another (RFC 1952 §2.2, what ``cat a.gz
    b.gz`` makes; Go's and Python's readers accept it): each is inflated in turn. Anything
    after a member that does not start another one is refused, not ignored.
    """
    parts: list[bytes] = []
    room = limit
    rest = data
    while True:
        if len(parts) == GZIP_MAX_MEMBERS:  # each costs a few µs on the event loop
            raise _bad_gzip(
                f"body has more than {GZIP_MAX_MEMBERS} gzip members",
                f"more than {GZIP_MAX_MEMBERS} gzip members",
            )
        inflater = zlib.decompressobj(wbits=31)
        try:
            out = inflater.decompress(rest, room + 1)
        except zlib.error as exc:
            raise _bad_gzip(f"body is not valid gzip: {exc}", "invalid gzip stream") from None
        if len(out) > room or inflater.unconsumed_tail:
            raise PayloadTooLargeError(
                f"decoded body exceeds {limit} bytes", details={"max_body_bytes": limit}
            )
        if not inflater.eof:
            raise _bad_gzip("body is a truncated gzip stream", "truncated gzip stream")
        parts.append(out)
        room -= len(out)
        rest = inflater.unused_data
        if not rest:
            return out if len(parts) == 1 else b"".join(parts)
        if not rest.startswith(_GZIP_MAGIC):
            raise _bad_gzip(
                "body has data after its gzip stream",
                f"{len(rest)} bytes after the end of the gzip stream",
            )


_GZIP_MAGIC: Final = b"\x1f\x8b"
GZIP_MAX_MEMBERS: Final = 64
"""Members accepted in one gzip body: clients write one, or a few when they append."""


def _bad_gzip(message: str, problem: str) -> ValidationError:
    return ValidationError(
        message,
        details={"errors": [{"field": "body", "message": problem}]},
        reason="bad_encoding",
    )


def _utf8_problem(exc: UnicodeDecodeError) -> str:
    """What is wrong, without quoting it (msgspec's offsets count from the string's start,
    not the body's, so none is given)."""
    return f"a string is not valid UTF-8 ({exc.reason})"


def _shape_error(field_name: str, message: str) -> ValidationError:
    return ValidationError(
        f"{field_name}: {message}",
        details={"errors": [{"field": field_name, "message": message}]},
        reason="schema",
    )


Batch = list[Envelope]
"""The unit moved through ingest channels: several requests per hop, never single entries."""


_OUT_OF_RANGE = re.compile(r"^(?:Number|Integer value) out of range - at `\$\[\.\.\.\]\[(\d+)\]")


def _decode_error(problem: str) -> ValidationError:
    """What msgspec could not decode. A number too large for a double or 64 bits is valid
    JSON that the schema refuses: said so, with its entry (msgspec's path does not name
    object keys), rather than "not valid JSON"."""
    found = _OUT_OF_RANGE.match(problem)
    if found is not None:
        field = f"entries[{found[1]}]"
        message = "holds a number out of range (integers must fit 64 bits, others a double)"
        return ValidationError(
            f"{field}: {message}",
            details={"errors": [{"field": field, "message": message}]},
            reason="schema",
        )
    return ValidationError(
        "request body is not valid JSON",
        details={"errors": [{"field": "body", "message": problem}]},
        reason="malformed_json",
    )
