"""Wire stages between memory channels in one nursery (trio's channel-pipeline pattern)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import trio

from ._context import StageContext
from ._errors import PluginError
from ._registry import ResolvedStage
from ._stage import Stage

log = logging.getLogger("logstack.pipeline")

STAGE_CHANNEL_CAPACITY = 64
"""Batches (not entries) buffered between two stages."""


def build_stages(resolved: Sequence[ResolvedStage], context: StageContext) -> list[Stage]:
    """Instantiate every resolved stage; a constructor that raises fails start-up, naming
    the culprit (``PluginError`` listing every stage that failed)."""
    stages: list[Stage] = []
    problems: list[str] = []
    masked_from = next(
        (i for i, item in enumerate(resolved) if item.spec.type == "mask"), len(resolved)
    )
    for position, item in enumerate(resolved):
        try:
            stage = item.stage_cls(item.config, context)
        except Exception as exc:
            problems.append(
                f"{item.where}: {item.plugin.culprit}: failed to start: {type(exc).__name__}: {exc}"
            )
            continue
        stage.name = item.spec.instance_name
        stage.sees_unmasked = position <= masked_from  # mask itself reads them unmasked
        stages.append(stage)
    if problems:
        raise PluginError(problems)
    return stages


async def serve_pipeline(
    stages: Sequence[Stage],
    *,
    head_capacity: int,
    task_status: trio.TaskStatus[trio.MemorySendChannel[Any]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run ``stages`` in order until the head channel is closed and every stage drained.

    Hands back the head send channel through ``task_status.started``. Its owner closes it;
    ``EndOfChannel`` then flows stage by stage, each closing its outbox when done.
    """
    head_send, inbox = trio.open_memory_channel[Any](head_capacity)
    async with trio.open_nursery() as nursery:
        for index, stage in enumerate(stages):
            last = index == len(stages) - 1
            send, receive = trio.open_memory_channel[Any](STAGE_CHANNEL_CAPACITY)
            nursery.start_soon(_run_stage, stage, inbox, send, name=f"stage:{stage.name}")
            inbox = receive
            if last:
                nursery.start_soon(_discard, receive, name="pipeline-tail")
        task_status.started(head_send)


async def _discard(inbox: trio.MemoryReceiveChannel[Any]) -> None:
    """Whatever the last stage emits has nowhere to go; consume it so it never blocks."""
    async with inbox:
        async for _ in inbox:
            pass


async def _run_stage(
    stage: Stage,
    inbox: trio.MemoryReceiveChannel[Any],
    outbox: trio.MemorySendChannel[Any],
) -> None:
    log.debug("stage started", extra={"stage": stage.name})
    try:
        await stage.run(inbox, outbox)
    finally:
        log.debug("stage stopped", extra={"stage": stage.name})
