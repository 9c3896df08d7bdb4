"""``serve_pipeline``: stages between memory channels, replies, coalescing and draining."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio
import trio.testing

from logstack._config import load_settings
from logstack._context import StageContext
from logstack._envelope import Accepted, Envelope
from logstack._errors import InternalError, RejectError
from logstack._pipeline import STAGE_CHANNEL_CAPACITY, serve_pipeline
from logstack._stage import COALESCE_MAX, Stage, StageConfig, coalesce, pass_on

TIMEOUT_S = 5


class TeapotError(RejectError):
    status = 418
    code = "teapot"


class Gatekeeper(Stage):
    """Rejects ``reject-*`` requests, crashes on ``boom-*``, passes the rest on."""

    def __init__(self, config: StageConfig, context: Any) -> None:
        super().__init__(config, context)
        self.seen: list[str] = []

    def process(self, envelope: Envelope) -> None:
        self.seen.append(envelope.request_id)
        if envelope.request_id.startswith("reject"):
            raise TeapotError(f"no {envelope.request_id}")
        if envelope.request_id.startswith("boom"):
            raise ValueError("bug in the stage")
        if envelope.request_id.startswith("accept"):
            envelope.accept(0)  # answered here: not passed on


class Recorder(Stage):
    """Own ``run``: records every batch it receives, answers each request, passes it on.

    With ``answer = False`` it passes requests on without answering them.

    On ``EndOfChannel`` it notes its name in ``closed`` before closing its own outbox.
    """

    def __init__(self, config: StageConfig, context: Any) -> None:
        super().__init__(config, context)
        self.batches: list[list[str]] = []
        self.closed: list[str] = []
        self.answer = True

    async def run(
        self, inbox: trio.MemoryReceiveChannel[Any], outbox: trio.MemorySendChannel[Any]
    ) -> None:
        async with inbox, outbox:
            async for batch in inbox:
                self.batches.append([e.request_id for e in batch])
                if self.answer:
                    for envelope in batch:
                        envelope.accept(len(batch))
                await outbox.send(batch)
            self.closed.append(self.name)

    @property
    def received(self) -> list[str]:
        return [rid for batch in self.batches for rid in batch]


class ClosingSpy:
    """Wraps a send channel to note when its owner closes it."""

    def __init__(self, channel: trio.MemorySendChannel[Any], name: str, log: list[str]) -> None:
        self.channel, self.name, self.log = channel, name, log

    async def send(self, value: Any) -> None:
        await self.channel.send(value)

    def send_nowait(self, value: Any) -> None:
        self.channel.send_nowait(value)

    async def __aenter__(self) -> ClosingSpy:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.log.append(self.name)
        await self.channel.aclose()


class Tagger(Stage):
    """Simple stage (the runtime's ``run``) that notes its name on each request."""

    def __init__(self, config: StageConfig, context: Any) -> None:
        super().__init__(config, context)
        self.closed: list[str] = []

    def process(self, envelope: Envelope) -> None:
        envelope.masked_fields[self.name] = len(envelope.masked_fields)

    async def run(
        self, inbox: trio.MemoryReceiveChannel[Any], outbox: trio.MemorySendChannel[Any]
    ) -> None:
        await super().run(inbox, ClosingSpy(outbox, self.name, self.closed))  # type: ignore[arg-type]


@pytest.fixture
def context() -> StageContext:
    return StageContext(settings=load_settings(env={}))


def make(cls: type[Stage], context: StageContext, name: str | None = None) -> Any:
    stage = cls(StageConfig(), context)
    if name is not None:
        stage.name = name
    return stage


def envelope(request_id: str) -> Envelope:
    return Envelope(request_id=request_id, authorization=None, body=b'{"entries": []}')


async def test_process_stage_rejects_fails_and_passes(context: StageContext) -> None:
    gate, tail = make(Gatekeeper, context), make(Recorder, context)
    ok, rejected, boom, answered = (
        envelope("ok-1"),
        envelope("reject-1"),
        envelope("boom-1"),
        envelope("accept-1"),
    )
    later = envelope("ok-2")
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            head = await nursery.start(partial_serve([gate, tail]))
            async with head:
                await head.send([ok, rejected, boom, answered])
                await ok.reply.wait()
                # The stage survived its own exception and keeps serving.
                await head.send([later])
                assert isinstance(await later.reply.wait(), Accepted)

    outcome = await rejected.reply.wait()
    assert isinstance(outcome, TeapotError)
    assert outcome.message == "no reject-1"
    assert outcome.status == 418

    failure = await boom.reply.wait()
    assert isinstance(failure, InternalError)
    assert failure.status == 500
    assert "bug in the stage" not in failure.message  # internals are not leaked to clients

    assert isinstance(await answered.reply.wait(), Accepted)
    assert (await answered.reply.wait()).entries_accepted == 0  # answered by the gatekeeper

    assert isinstance(await ok.reply.wait(), Accepted)
    # Only still-pending requests travel on.
    assert tail.received == ["ok-1", "ok-2"]
    assert gate.seen == ["ok-1", "reject-1", "boom-1", "accept-1", "ok-2"]


async def test_already_answered_requests_are_skipped(context: StageContext) -> None:
    gate, tail = make(Gatekeeper, context), make(Recorder, context)
    done, fresh = envelope("ok-done"), envelope("ok-fresh")
    done.reject(TeapotError("answered before"))
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            head = await nursery.start(partial_serve([gate, tail]))
            async with head:
                await head.send([done, fresh])
    assert gate.seen == ["ok-fresh"]
    assert tail.received == ["ok-fresh"]
    assert isinstance(done.reply.outcome, TeapotError)


async def test_waiting_batches_coalesce_into_one_pass(context: StageContext) -> None:
    gate, tail = make(Gatekeeper, context), make(Recorder, context)
    batches = [[envelope(f"ok-{i}-{j}") for j in range(i + 1)] for i in range(5)]
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            head = await nursery.start(partial_serve([gate, tail]))
            async with head:
                # No checkpoint between the sends: all five wait for the gatekeeper.
                for batch in batches:
                    head.send_nowait(batch)
    expected = [e.request_id for batch in batches for e in batch]
    assert gate.seen == expected
    # One process pass over all 15 requests produced a single batch downstream.
    assert tail.batches == [expected]


async def test_passing_on_into_a_channel_with_room_ends_no_step() -> None:
    send, receive = trio.open_memory_channel[int](1)
    with trio.testing.assert_no_checkpoints():
        await pass_on(send, 1)
    assert receive.receive_nowait() == 1


async def test_passing_on_into_a_full_channel_waits_for_room() -> None:
    send, receive = trio.open_memory_channel[int](1)
    send.send_nowait(0)
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pass_on, send, 1)
            await trio.testing.wait_all_tasks_blocked()
            assert receive.receive_nowait() == 0  # room: the waiting sender goes on
    assert receive.receive_nowait() == 1


class StepCounter(trio.abc.Instrument):
    def __init__(self, task_name: str) -> None:
        self.task_name, self.steps = task_name, 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task.name == self.task_name:
            self.steps += 1


async def test_a_simple_stage_takes_one_step_per_batch(context: StageContext) -> None:
    # Its work and the hand-over; the next receive is its checkpoint (no second step that
    # only comes back to wait on the inbox).
    gate, tail = make(Gatekeeper, context, "gate"), make(Recorder, context)
    counter = StepCounter("stage:gate")
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            head = await nursery.start(partial_serve([gate, tail]))
            await trio.testing.wait_all_tasks_blocked()
            trio.lowlevel.add_instrument(counter)
            try:
                for i in range(10):
                    head.send_nowait([envelope(f"ok-{i}")])
                    await trio.testing.wait_all_tasks_blocked()
            finally:
                trio.lowlevel.remove_instrument(counter)
            await head.aclose()
    assert gate.seen == [f"ok-{i}" for i in range(10)]
    assert counter.steps == 10


async def test_rejections_inside_a_coalesced_batch(context: StageContext) -> None:
    gate, tail = make(Gatekeeper, context), make(Recorder, context)
    sent = [envelope("ok-a"), envelope("reject-b"), envelope("boom-c"), envelope("ok-d")]
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            head = await nursery.start(partial_serve([gate, tail]))
            async with head:
                for item in sent:
                    head.send_nowait([item])
    assert tail.batches == [["ok-a", "ok-d"]]
    assert [type(e.reply.outcome).__name__ for e in sent] == [
        "Accepted",
        "TeapotError",
        "InternalError",
        "Accepted",
    ]


def test_coalesce_stops_at_the_limit() -> None:
    send, receive = trio.open_memory_channel[Any](COALESCE_MAX + 10)
    waiting = [[envelope(f"r{i}")] for i in range(COALESCE_MAX + 5)]
    for batch in waiting:
        send.send_nowait(batch)
    first = [envelope("first")]
    merged = coalesce(first, receive)
    assert len(merged) == 1 + COALESCE_MAX
    assert merged[0] is first[0]
    assert [e.request_id for e in merged[1:]] == [f"r{i}" for i in range(COALESCE_MAX)]
    assert first == [merged[0]]  # the caller's list is not mutated
    # The rest is left for the next pass.
    assert len(coalesce([], receive)) == 5


def test_coalesce_on_a_closed_empty_channel() -> None:
    send, receive = trio.open_memory_channel[Any](1)
    send.close()
    only = [envelope("x")]
    assert coalesce(only, receive) == only


async def test_closing_the_head_drains_every_stage_in_order(context: StageContext) -> None:
    stages = [
        make(Tagger, context, "first"),
        make(Recorder, context, "middle"),
        make(Tagger, context, "third"),
        make(Recorder, context, "last"),
    ]
    stages[1].answer = False
    closed: list[str] = []
    for stage in stages:
        stage.closed = closed
    sent = [envelope(f"ok-{i}") for i in range(50)]
    returned = False

    async def run_pipeline(task_status: trio.TaskStatus[Any]) -> None:
        nonlocal returned
        await serve_pipeline(stages, head_capacity=4, task_status=task_status)
        returned = True

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            head = await nursery.start(run_pipeline)
            async with head:
                for item in sent:
                    await head.send([item])
            # Closed: nothing is cancelled; the nursery ends once every stage drained.
    assert returned
    assert closed == ["first", "middle", "third", "last"]
    # Everything sent before the close went through every stage, in order.
    assert stages[1].received == [e.request_id for e in sent]
    assert stages[3].received == [e.request_id for e in sent]
    assert all(e.masked_fields == {"first": 0, "third": 1} for e in sent)
    assert all(isinstance(e.reply.outcome, Accepted) for e in sent)


async def test_the_tail_output_never_blocks_the_pipeline(context: StageContext) -> None:
    # The last stage emits far more batches than a channel holds; nobody downstream reads.
    gate = make(Gatekeeper, context)
    sent = [envelope(f"ok-{i}") for i in range(STAGE_CHANNEL_CAPACITY * 3)]
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            head = await nursery.start(partial_serve([gate], head_capacity=1))
            async with head:
                for item in sent:
                    await head.send([item])
                    await trio.testing.wait_all_tasks_blocked()
    assert gate.seen == [e.request_id for e in sent]


async def test_head_capacity_gives_backpressure(context: StageContext) -> None:
    class Stuck(Stage):
        async def run(
            self, inbox: trio.MemoryReceiveChannel[Any], outbox: trio.MemorySendChannel[Any]
        ) -> None:
            async with inbox, outbox:
                await trio.sleep_forever()

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            head = await nursery.start(partial_serve([make(Stuck, context)], head_capacity=2))
            head.send_nowait([envelope("a")])
            head.send_nowait([envelope("b")])
            with pytest.raises(trio.WouldBlock):
                head.send_nowait([envelope("c")])
            nursery.cancel_scope.cancel()


async def test_a_crashing_run_stage_fails_the_pipeline(context: StageContext) -> None:
    class Crash(Stage):
        async def run(
            self, inbox: trio.MemoryReceiveChannel[Any], outbox: trio.MemorySendChannel[Any]
        ) -> None:
            async with inbox, outbox:
                async for _batch in inbox:
                    raise RuntimeError("crashed")

    with trio.fail_after(TIMEOUT_S), pytest.raises(BaseException) as info:
        async with trio.open_nursery() as nursery:
            head = await nursery.start(partial_serve([make(Crash, context)]))
            async with head:
                await head.send([envelope("x")])
                await trio.sleep_forever()
    assert leaves(info.value) == [("RuntimeError", "crashed")]


def leaves(exc: BaseException) -> list[tuple[str, str]]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in leaves(sub)]
    return [(type(exc).__name__, str(exc))]


def partial_serve(stages: list[Stage], head_capacity: int = 16) -> Any:
    async def run(task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED) -> None:
        await serve_pipeline(stages, head_capacity=head_capacity, task_status=task_status)

    return run


class Leaky(Stage):
    """Fails with the request's text in its exception, as careless plugin code might."""

    def process(self, envelope: Envelope) -> None:
        raise ValueError(f"cannot parse {envelope.body!r}")


@pytest.mark.parametrize("unmasked", [True, False])
async def test_a_failure_before_mask_is_logged_without_its_text(
    context: StageContext, caplog: pytest.LogCaptureFixture, unmasked: bool
) -> None:
    leaky, tail = make(Leaky, context, name="leaky"), make(Recorder, context)
    leaky.sees_unmasked = unmasked
    request = Envelope(request_id="r-1", authorization=None, body=b'{"password": "hunter2-secret"}')
    with trio.fail_after(TIMEOUT_S), caplog.at_level(logging.ERROR, logger="logstack"):
        async with trio.open_nursery() as nursery:
            head = await nursery.start(partial_serve([leaky, tail]))
            async with head:
                await head.send([request])
                assert isinstance(await request.reply.wait(), InternalError)
    [failure] = [r for r in caplog.records if r.getMessage().startswith("stage failed")]
    assert failure.stage == "leaky" and failure.request_id == "r-1"  # type: ignore[attr-defined]
    if unmasked:
        assert "hunter2" not in caplog.text and failure.exc_info is None
        assert failure.error_type == "ValueError"  # type: ignore[attr-defined]
        assert "in process" in failure.traceback  # type: ignore[attr-defined]
    else:
        assert failure.exc_info is not None and "hunter2" in caplog.text
