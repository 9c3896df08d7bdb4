"""The memory bound on requests being received and served (``server.max_body_bytes_in_flight``).

A request holds part of one budget per worker from its first body byte until it is answered:
its body as the bytes arrive, then, once the whole body is in, an estimate of what it becomes
when decoded (``DECODED_BYTES_PER_BYTE`` per JSON byte: a decoded 100-line body takes 4.2-5.2
times its size in Python objects). A gzip body holds its compressed size until a stage inflates
it; the inflated size is held from then on. A request that does not fit is answered ``503`` +
``Retry-After``, so clients' retries spread the load instead of the server growing.
"""

from __future__ import annotations

from typing import Final

from ._errors import UnavailableError

DECODED_BYTES_PER_BYTE: Final = 4
"""Estimate of the memory a JSON body's decoded form takes, per byte of JSON. Measured with
``tracemalloc`` on msgspec decodes: 4.2-5.2 for the benchmark's bodies; 8.6 for entries of
2,000 small integer metadata fields, 14.6 for lists of one-letter strings and 24 for lists of
empty objects, the worst shapes found: such bodies can take up to ~5x the budget's share."""


def held_for(json_bytes: int) -> int:
    """What a body of ``json_bytes`` holds once whole: itself and its decoded form."""
    return json_bytes * (1 + DECODED_BYTES_PER_BYTE)


class BodyBudget:
    """Bytes held at once by requests, over every connection of a worker: without a bound, a
    thousand clients sending 1 MiB bodies at once would hold a GiB, and gzip bodies or their
    decoded form many times that. A body takes from it as its bytes arrive (an announced
    ``Content-Length`` reserves nothing: sixty-four connections announcing 1 MiB and sending
    a byte a second would otherwise hold it all), and only after its key was authenticated
    on the headers; a request that does not fit is answered ``503``."""

    __slots__ = ("held", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, n: int, *, own: int = 0) -> None:
        """Hold ``n`` more bytes, or raise ``UnavailableError`` (503) if they do not fit.

        ``own`` is what the caller's request already holds: a request holding everything
        that is held may always take more, because alone it is bounded by the body limit
        (and would otherwise never be served when that exceeds the budget).
        """
        if self.held + n > self.limit and self.held > own:
            raise _no_room(self.limit)
        self.held += n

    def check_room(self, n: int) -> None:
        """Raise the ``503`` that ``take`` would, now, for a body announcing ``n`` JSON bytes
        (what it will hold once whole), without taking anything: under overload a body
        that cannot fit was read before it was refused, on CPU the accepted ones needed."""
        if self.held + held_for(n) > self.limit and self.held > 0:
            raise _no_room(self.limit)

    def give_back(self, n: int) -> None:
        self.held -= n

    def __repr__(self) -> str:
        return f"<BodyBudget {self.held}/{self.limit}>"


def _no_room(limit: int) -> UnavailableError:
    return UnavailableError(
        "too many request bodies are in flight at once; retry later",
        retry_after=1,
        details={"max_body_bytes_in_flight": limit},
        reason="bodies_in_flight",
    )
