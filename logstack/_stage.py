"""The stage plugin API: a typed config class plus ``process`` (simple) or ``run`` (stateful).

A *simple* stage implements ``process(envelope)``: it inspects or rewrites one request in
place, or raises a ``RejectError`` to answer it. The runtime moves whole batches of requests
between channels and calls ``process`` for each still-pending one, so plugin authors never
pay a channel hop per entry. Stages with timers or I/O override ``run(inbox, outbox)``.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any, ClassVar, TypeVar

import trio
from pydantic import ConfigDict

from ._config import NumbersNotBooleans
from ._envelope import Batch, Envelope
from ._errors import InternalError, RejectError
from ._logging import request_id_var

log = logging.getLogger("logstack.stage")

T = TypeVar("T")

COALESCE_MAX = 256
"""Most batches merged into one when a stage finds several waiting in its inbox."""


class StageConfig(NumbersNotBooleans):
    """Options of a stage, from the ``options:`` of its ``pipeline:`` entry.

    Subclass it and declare fields with ``Field(description=...)``: the same declaration
    validates the options, is shown by ``logstack stages list`` and documents the stage.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)


class Stage:
    """Base class of every pipeline stage (built-in or plugin)."""

    Config: ClassVar[type[StageConfig]] = StageConfig

    sees_unmasked: bool = False
    """Set by the pipeline for a stage placed before ``mask``: the entries it sees are not
    masked yet, so a failure of its ``process`` is logged without the exception's text,
    which may quote them (the log is on disk; secrets must not reach it)."""

    def __init__(self, config: StageConfig, context: Any) -> None:
        # ``context`` is a ``logstack.StageContext``; typed loosely here to avoid a cycle.
        self.config = config
        self.context = context
        self.name = type(self).__name__

    def process(self, envelope: Envelope) -> None:
        """Inspect or rewrite one request; raise ``RejectError`` to refuse it."""
        raise NotImplementedError

    def reload(self, settings: Any) -> None:
        """Called after a successful SIGHUP reload with the new ``Settings``."""

    async def run(
        self,
        inbox: trio.MemoryReceiveChannel[Any],
        outbox: trio.MemorySendChannel[Any],
    ) -> None:
        """Default loop for simple stages: ``process`` each pending request, pass batches on.

        Several waiting batches are merged before processing so that under load a hop
        carries many requests. Closing ``outbox`` when ``inbox`` ends drains the next stage.
        """
        async with inbox, outbox:
            async for batch in inbox:
                batch = coalesce(batch, inbox)
                passed: Batch = []
                for envelope in batch:
                    if not envelope.pending:
                        continue
                    # Log lines a stage writes for this request carry its request id.
                    request_id_var.set(envelope.request_id)
                    try:
                        self.process(envelope)
                    except RejectError as error:
                        envelope.reject(error)
                        continue
                    except Exception as exc:
                        self._log_failure(exc, envelope.request_id)
                        envelope.reject(
                            InternalError("internal error while processing the request")
                        )
                        continue
                    if envelope.pending:
                        passed.append(envelope)
                request_id_var.set(None)  # later lines (stopping, say) are no request's
                if passed:
                    await pass_on(outbox, passed)

    def _log_failure(self, exc: Exception, request_id: str) -> None:
        where = {"stage": self.name, "request_id": request_id}
        if not self.sees_unmasked:
            log.exception("stage failed", extra=where)
            return
        # Where it failed, not what it said: the frames are code, the text may be entries.
        frames = "".join(traceback.format_tb(exc.__traceback__))
        log.error(
            "stage failed (before mask: the exception's text is not logged)",
            extra={**where, "error_type": type(exc).__qualname__, "traceback": frames},
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


async def pass_on(outbox: trio.MemorySendChannel[T], item: T) -> None:
    """Send ``item`` to the next stage, waiting only while its channel is full.

    ``await outbox.send`` always ends the task's step at a checkpoint, so a stage took two
    steps per batch: its work, then one that only came back to wait on its inbox. A stage's
    loop reaches a checkpoint at its next ``receive`` anyway (a memory channel's
    ``receive`` is one whether or not an item is waiting), so the extra step bought no
    fairness.
    """
    try:
        outbox.send_nowait(item)
    except trio.WouldBlock:
        await outbox.send(item)


def coalesce(batch: list[T], inbox: trio.MemoryReceiveChannel[Any]) -> list[T]:
    """Append every batch already waiting in ``inbox`` to ``batch`` (non-blocking)."""
    for _ in range(COALESCE_MAX):
        try:
            more = inbox.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel):
            break
        if batch is more:
            continue
        batch = [*batch, *more]
    return batch


def overrides(stage_cls: type[Stage], method: str) -> bool:
    """Whether ``stage_cls`` provides its own ``method`` rather than ``Stage``'s."""
    return getattr(stage_cls, method) is not getattr(Stage, method)
