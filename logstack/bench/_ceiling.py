"""The ceiling the benchmark compares against: bare Hypercorn + Quart-Trio that only
decodes the body (msgspec) and answers 202. Same server stack, no LogStack work.

    python -m logstack.bench._ceiling --port-file PATH
    python -m logstack.bench._ceiling --port-file PATH --asgi   # the same without Quart
    python -m logstack.bench._ceiling --port-file PATH --reuse-port PORT

``--reuse-port`` joins a group of processes listening on ``PORT`` with ``SO_REUSEPORT``, as
``logstack serve --workers N`` does: the bench measures how far the bare stack itself
scales from one process to two on this machine (``--scenario workers-2``).

``--asgi`` serves the same route as a plain ASGI function under the same Hypercorn: what
is left is Hypercorn's, h11's and trio's own cost (``benchmarks/server_instructions.py``
counts both).
"""

from __future__ import annotations

import argparse
import signal
from pathlib import Path
from typing import Any

import msgspec
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart import Response, request
from quart_trio import QuartTrio

from .._workers import bind_socket
from ..testing._loki import answer_lifespan

_decoder = msgspec.json.Decoder()


def create_app() -> QuartTrio:
    app = QuartTrio("ceiling")
    app.config["MAX_CONTENT_LENGTH"] = 1024 * 1024

    @app.post("/v1/logs:ingest")
    async def ingest() -> Response:
        body = await request.get_data(cache=False)
        assert isinstance(body, bytes)
        doc = _decoder.decode(body)
        count = len(doc["entries"])
        return Response(
            b'{"message":"Logs accepted for processing","entries_accepted":%d}' % count,
            status=202,
            content_type="application/json",
        )

    return app


_ANSWER_HEADERS = [(b"content-type", b"application/json")]


async def plain_asgi(scope: Any, receive: Any, send: Any) -> None:
    """``create_app``'s route as a bare ASGI function (any path, any method)."""
    if scope["type"] == "lifespan":
        await answer_lifespan(receive, send)
    if scope["type"] != "http":
        return
    chunks = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    count = len(_decoder.decode(b"".join(chunks))["entries"])
    body = b'{"message":"Logs accepted for processing","entries_accepted":%d}' % count
    headers = [*_ANSWER_HEADERS, (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 202, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def main(port_file: Path, asgi: bool = False, reuse_port: int | None = None) -> None:
    config = Config()
    if reuse_port is None:
        config.bind = ["127.0.0.1:0"]
    else:  # bound, not listening: Hypercorn listens on it (as logstack._service does)
        config.bind = [f"fd://{bind_socket('127.0.0.1', reuse_port, reuse_port=True).detach()}"]
    config.accesslog = None
    shutdown = trio.Event()

    async def on_signal() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                shutdown.set()
                return

    async with trio.open_nursery() as nursery:
        nursery.start_soon(on_signal)
        binds = await nursery.start(
            lambda task_status: serve(
                plain_asgi if asgi else create_app(),
                config,
                shutdown_trigger=shutdown.wait,
                task_status=task_status,
            )
        )
        await trio.Path(port_file).write_text(binds[0] + "\n")
        await shutdown.wait()
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port-file", type=Path, required=True)
    parser.add_argument("--asgi", action="store_true", help="a plain ASGI function, no Quart")
    parser.add_argument(
        "--reuse-port", type=int, help="listen on this port with SO_REUSEPORT (one of several)"
    )
    arguments = parser.parse_args()
    trio.run(main, arguments.port_file, arguments.asgi, arguments.reuse_port)
