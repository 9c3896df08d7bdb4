"""The ceiling the benchmark compares against: bare Hypercorn + Quart-Trio that only
decodes the body (msgspec) and answers 202. Same server stack, no LogStack work.

    python -m logstack.bench._ceiling --port-file PATH
"""

from __future__ import annotations

import argparse
import signal
from pathlib import Path

import msgspec
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart import Response, request
from quart_trio import QuartTrio

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


async def main(port_file: Path) -> None:
    config = Config()
    config.bind = ["127.0.0.1:0"]
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
                create_app(), config, shutdown_trigger=shutdown.wait, task_status=task_status
            )
        )
        await trio.Path(port_file).write_text(binds[0] + "\n")
        await shutdown.wait()
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port-file", type=Path, required=True)
    trio.run(main, parser.parse_args().port_file)
