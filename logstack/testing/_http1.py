"""One keep-alive HTTP/1.1 connection spoken with h11, for tests of the HTTP layer.

Unlike httpx, it sends a request's head and body apart and reads the answer whenever the
test says, so a test can make the server answer before the body (a refusal on the headers)
and then go on with the body, another request, or nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import h11
import trio

RECEIVE_BYTES = 65536


class Http1Client:
    """A client connection: ``send_head``/``send_body``/``read_answer`` in any order the
    protocol allows; the connection moves to its next request once both sides are done."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1") -> Http1Client:
        return cls(await trio.open_tcp_stream(host, port))

    async def send_head(
        self, path: str, length: int | None, headers: Sequence[tuple[str, str]] = ()
    ) -> None:
        """A POST's head alone; ``length`` ``None`` announces a chunked body."""
        size = (
            ("content-length", str(length))
            if length is not None
            else ("transfer-encoding", "chunked")
        )
        request = h11.Request(
            method="POST", target=path, headers=[("host", "test"), size, *headers]
        )
        await self.stream.send_all(self.h11.send(request))

    async def send_body(self, body: bytes, end: bool = True) -> None:
        """Part of the body; ``end`` ends it."""
        data = self.h11.send(h11.Data(data=body)) if body else b""
        await self.stream.send_all(data + (self.h11.send(h11.EndOfMessage()) if end else b""))
        if end and self.h11.our_state is self.h11.their_state is h11.DONE:
            self.h11.start_next_cycle()  # the answer came first

    async def send_request(self, path: str, body: bytes) -> None:
        await self.send_head(path, len(body))
        await self.send_body(body)

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        await self.send_request(path, body)
        return await self.read_answer()

    async def read_answer(self) -> tuple[int, bytes]:
        status, body, _ = await self.read_answer_with_head()
        return status, body

    async def read_answer_with_head(self) -> tuple[int, bytes, dict[bytes, bytes]]:
        """Status, body and headers (lower-case names) of the next final answer."""
        status, body, headers = 0, b"", {}
        while True:
            event = self.h11.next_event()
            if event is h11.NEED_DATA:
                self.h11.receive_data(await self.stream.receive_some(RECEIVE_BYTES))
            elif isinstance(event, h11.Response):
                status, headers = event.status_code, dict(event.headers)
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                if self.h11.our_state is h11.DONE:
                    self.h11.start_next_cycle()
                return status, body, headers
            else:
                raise AssertionError(f"unexpected {event!r}")

    async def closed_by_server(self, within: float) -> bool:
        """Whether the server ends the connection within ``within`` seconds."""
        with trio.move_on_after(within):
            return await self.stream.receive_some(RECEIVE_BYTES) == b""
        return False
