"""The batcher's pacing: how often long delivery work gives the event loop back."""

from __future__ import annotations

import trio
import trio.lowlevel

from logstack._config import load_settings
from logstack._context import StageContext
from stages.batch import BUSY_STEP_ENTRIES, READ_STEP_ENTRIES, Pacer


class _StepCounter(trio.abc.Instrument):
    """Counts the steps of one task: each checkpoint it passes starts a new one."""

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.steps += 1


async def _checkpoints(context: StageContext, record_sizes: list[int]) -> int:
    counter = _StepCounter(trio.lowlevel.current_task())
    trio.lowlevel.add_instrument(counter)
    try:
        pacer = Pacer(context)
        for size in record_sizes:
            await pacer.worked(size)
    finally:
        trio.lowlevel.remove_instrument(counter)
    return counter.steps


async def test_the_pacer_pauses_after_each_record_while_requests_are_served() -> None:
    context = StageContext(load_settings(env={}))
    records = [100] * 10  # ten requests of 100 entries: 1000, one push
    assert await _checkpoints(context, records) == 1000 // READ_STEP_ENTRIES
    context.requests_in_flight = 1
    assert BUSY_STEP_ENTRIES <= 100
    assert await _checkpoints(context, records) == 10


async def test_the_read_step_follows_the_requests_in_flight() -> None:
    context = StageContext(load_settings(env={}))
    assert Pacer.step_for(context) == READ_STEP_ENTRIES
    context.requests_in_flight = 3
    assert Pacer.step_for(context) == BUSY_STEP_ENTRIES
