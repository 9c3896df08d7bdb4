"""Run one stage between real trio memory channels, and check that it behaves like a stage.

The plugin author's side of ``logstack._pipeline``: ``open_stage`` starts a stage's ``run``
exactly as ``logstack serve`` does (same channel capacity, same ``EndOfChannel`` drain), so
a stage tested here behaves the same in the server. ``check_stage_conformance`` runs the
checks every stage must pass: the registry's class checks, start, answer or pass on every
request, survive a rejected request, drain and return when its inbox closes (closing its
outbox), and stop promptly when cancelled.

    async with open_stage(MyStage, options={"keep_last": 2}) as harness:
        result = await harness.process(make_envelope(entries=[make_entry(message="...")]))
        assert result.passed and not result.rejections
"""

from __future__ import annotations

import math
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import (
    AbstractAsyncContextManager,
    AbstractContextManager,
    asynccontextmanager,
    contextmanager,
)
from dataclasses import dataclass
from typing import Any

import msgspec
import trio
import trio.lowlevel
import trio.testing

from .._config import ApiKey, Settings
from .._context import StageContext
from .._envelope import Envelope
from .._errors import InternalError, LogstackError, PluginError, RejectError
from .._pipeline import STAGE_CHANNEL_CAPACITY
from .._registry import check_stage_class, summary_of, validate_options
from .._schema import validate_entries
from .._stage import Stage

DEFAULT_TIMEOUT_S = 10.0
"""How long a harness waits for the stage (to answer, to emit, to return) before failing."""

CANCEL_TIMEOUT_S = 1.0
"""How soon after cancellation a stage must have returned, in ``check_stage_conformance``."""

WATCHDOG_TICK_S = 0.01
"""How often the conformance check's watchdog wakes to see whether the loop was held."""


class ConformanceError(LogstackError, AssertionError):
    """A stage broke the stage contract; ``problems`` lists every violation found.

    An ``AssertionError`` too, so pytest reports it as a failed check, not as a crash.
    """

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("stage contract broken:\n" + "\n".join(f"  - {p}" for p in problems))


# --------------------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------------------


def make_entry(**fields: Any) -> dict[str, Any]:
    """A valid log entry as a client sends it (decoded JSON); ``fields`` replace or add keys."""
    entry: dict[str, Any] = {
        "timestamp": "2025-09-24T12:00:00.000Z",
        "level": "INFO",
        "message": "hello from the test kit",
        "service": "payments-api",
        "env": "prod",
    }
    entry.update(fields)
    return entry


def make_envelope(
    entries: Sequence[Any] | None = None,
    *,
    key_name: str | None = "payments-api",
    body: bytes | None = None,
    authorization: str | None = None,
    idempotency_key: str | None = None,
    validated: bool = False,
    settings: Settings | None = None,
) -> Envelope:
    """One ingest request as the HTTP layer hands it to the pipeline.

    ``entries`` (default: one ``make_entry()``) become the JSON body, decoded by the stage
    that first calls ``envelope.document()``, as in the server. ``key_name`` is the API key
    ``auth`` would have found (``None``: not authenticated yet). ``body`` sends raw bytes
    instead (malformed JSON, say). ``validated=True`` also runs the schema, filling
    ``envelope.entries`` with ``LogEntry`` objects, as after the ``validate`` stage.
    """
    if body is None:
        body = msgspec.json.encode({"entries": list(entries or [make_entry()])})
    elif entries is not None:
        raise TypeError("pass entries or body, not both")
    envelope = Envelope(
        request_id=str(uuid.uuid4()),
        authorization=authorization,
        body=body,
        idempotency_key=idempotency_key,
        key=ApiKey(name=key_name) if key_name is not None else None,
    )
    if validated:
        schema = (settings or Settings()).schema_
        envelope.entries = validate_entries(envelope.document(), schema)
    return envelope


def _as_settings(settings: Settings | Mapping[str, Any] | None) -> Settings:
    if settings is None:
        return Settings()
    if isinstance(settings, Settings):
        return settings
    return Settings.model_validate(dict(settings))


def make_stage(
    stage_cls: type[Stage],
    options: Mapping[str, Any] | None = None,
    *,
    settings: Settings | Mapping[str, Any] | None = None,
    context: StageContext | None = None,
    name: str | None = None,
) -> Stage:
    """Validate ``stage_cls`` and its ``options`` as the registry does, and instantiate it.

    Raises ``PluginError`` with the registry's messages when the class or the options are
    not acceptable. ``settings`` (a ``Settings`` or the mapping a ``config.yaml`` holds) is
    what the stage sees as ``context.settings``; pass ``context`` to share one (with its
    ``metrics``) between stages.
    """
    label = stage_cls.__qualname__ if isinstance(stage_cls, type) else repr(stage_cls)
    problems = check_stage_class(stage_cls)
    if problems:
        raise PluginError([f"{label}: {p}" for p in problems])
    config, problems = validate_options(stage_cls, options)
    if config is None:
        raise PluginError([f"{label} options: {p}" for p in problems])
    if context is None:
        context = StageContext(_as_settings(settings))
    elif settings is not None:
        raise TypeError("pass settings or context, not both")
    stage = stage_cls(config, context)
    stage.name = name or stage_cls.__name__
    return stage


# --------------------------------------------------------------------------------------
# The harness
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Processed:
    """What became of the envelopes of one ``StageHarness.process`` call."""

    passed: list[Envelope]
    """Sent on to the next stage (normally still pending)."""
    answered: list[Envelope]
    """Answered by the stage: ``envelope.reply.outcome`` is the answer."""

    @property
    def rejections(self) -> list[RejectError]:
        return [e.reply.outcome for e in self.answered if isinstance(e.reply.outcome, RejectError)]


class StageHarness:
    """One running stage between channels. Made by ``open_stage``; see its docstring."""

    def __init__(self, stage: Stage, *, timeout_s: float) -> None:
        self.stage = stage
        self.timeout_s = timeout_s
        self.emitted: list[Any] = []
        """Everything the stage sent to its outbox, in order."""
        self.passed: list[Envelope] = []
        """Every envelope the stage sent on (inside the batches in ``emitted``)."""
        self.finished = False
        """Whether ``run`` has returned (or raised)."""
        self.closed_outbox: bool | None = None
        """Once ``finished``: whether the stage closed its outbox itself, as it must."""
        self._passed_ids: set[int] = set()
        self._queue: deque[Any] = deque()
        self._drained = False
        self._lot = trio.lowlevel.ParkingLot()
        self._inbox, self._stage_inbox = trio.open_memory_channel[Any](STAGE_CHANNEL_CAPACITY)
        self._stage_outbox, self._outbox = trio.open_memory_channel[Any](STAGE_CHANNEL_CAPACITY)
        self._watchers: trio.Nursery | None = None
        self._closing = trio.Event()

    @property
    def context(self) -> StageContext:
        context: StageContext = self.stage.context
        return context

    # -- driving the stage ------------------------------------------------------------

    async def send(self, envelopes: Envelope | Iterable[Envelope]) -> None:
        """Put one batch (an envelope or several) into the stage's inbox."""
        batch = _as_batch(envelopes)
        assert self._watchers is not None, "the harness is not running"
        for envelope in batch:
            if envelope.pending:
                self._watchers.start_soon(self._watch, envelope)
        await self.send_item(batch)

    async def send_item(self, item: Any) -> None:
        """Put anything into the inbox (for stages that receive something else than batches)."""
        with self._deadline("accept an item into its inbox"):
            await self._inbox.send(item)

    async def receive(self) -> Any:
        """The next item the stage emitted (a batch, for ingest stages), in order.

        Raises ``trio.EndOfChannel`` once the stage closed its outbox and all was received.
        Every item is also kept in ``emitted``, whoever received it.
        """
        await self._wait_for(lambda: bool(self._queue) or self._drained, "emit anything")
        if self._queue:
            return self._queue.popleft()
        raise trio.EndOfChannel

    async def process(self, envelopes: Envelope | Iterable[Envelope]) -> Processed:
        """Send one batch and wait until the stage passed on or answered each envelope."""
        batch = _as_batch(envelopes)
        await self.send(batch)

        def settled() -> bool:
            return all(self.settled(e) for e in batch)

        await self._wait_for(lambda: settled() or self.finished, "pass on or answer a batch")
        if not settled():
            await self._wait_for(lambda: settled() or self._drained, "pass on its last batch")
        if not settled():
            stuck = sum(not self.settled(e) for e in batch)
            raise ConformanceError(
                [
                    f"{self.stage.name}: returned with {stuck} request(s) neither passed on "
                    "nor answered"
                ]
            )
        return Processed(
            passed=[e for e in batch if id(e) in self._passed_ids],
            answered=[e for e in batch if e.reply.resolved],
        )

    def settled(self, envelope: Envelope) -> bool:
        """Whether the stage passed ``envelope`` on or answered it."""
        return id(envelope) in self._passed_ids or envelope.reply.resolved

    async def close(self) -> None:
        """Close the inbox, as the previous stage does at shutdown, and wait for ``run`` to
        return. Raises ``ConformanceError`` if it does not return in time or leaves its
        outbox open (the next stage would then never see the end of its input)."""
        await self._inbox.aclose()
        with trio.move_on_after(self.timeout_s):
            while not self.finished:
                await self._lot.park()
        problems = []
        if not self.finished:
            problems.append(
                f"{self.stage.name}: run did not return within {self.timeout_s:g}s after its "
                "inbox was closed (iterate the inbox with `async for`, and return at its end)"
            )
        elif not self.closed_outbox:
            problems.append(
                f"{self.stage.name}: run returned without closing its outbox "
                "(use `async with inbox, outbox:`)"
            )
        if problems:
            raise ConformanceError(problems)

    # -- internals --------------------------------------------------------------------

    async def _start(self, nursery: trio.Nursery) -> None:
        await nursery.start(self._host_watchers)
        nursery.start_soon(self._drain)
        nursery.start_soon(self._run, name=f"stage:{self.stage.name}")

    async def _run(self) -> None:
        try:
            await self.stage.run(self._stage_inbox, self._stage_outbox)
        finally:
            self.finished = True
            self.closed_outbox = self._outbox.statistics().open_send_channels == 0
            self._stage_outbox.close()  # so that the drain ends even if the stage forgot
            self._lot.unpark_all()

    async def _drain(self) -> None:
        async with self._outbox:
            async for item in self._outbox:
                self.emitted.append(item)
                self._queue.append(item)
                if isinstance(item, list):
                    for envelope in item:
                        if isinstance(envelope, Envelope):
                            self.passed.append(envelope)
                            self._passed_ids.add(id(envelope))
                self._lot.unpark_all()
        self._drained = True
        self._lot.unpark_all()

    async def _host_watchers(self, task_status: trio.TaskStatus[None]) -> None:
        async with trio.open_nursery() as nursery:
            self._watchers = nursery
            task_status.started()
            await self._closing.wait()
            nursery.cancel_scope.cancel()

    async def _watch(self, envelope: Envelope) -> None:
        await envelope.reply.wait()
        self._lot.unpark_all()

    def _stop(self) -> None:
        self._closing.set()

    def _deadline(self, what: str) -> AbstractContextManager[None]:
        return _deadline(f"{self.stage.name} did not {what}", self.timeout_s)

    async def _wait_for(self, condition: Callable[[], bool], what: str) -> None:
        with self._deadline(what):
            while not condition():
                await self._lot.park()

    def __repr__(self) -> str:
        state = "finished" if self.finished else "running"
        return (
            f"<StageHarness {self.stage.name!r} {state} emitted={len(self.emitted)} "
            f"passed={len(self.passed)}>"
        )


@contextmanager
def _deadline(message: str, timeout_s: float) -> Iterator[None]:
    """``trio.fail_after`` whose ``TooSlowError`` says what did not happen in time."""
    with trio.move_on_after(timeout_s) as scope:
        yield
    if scope.cancelled_caught:
        raise trio.TooSlowError(f"{message} within {timeout_s:g}s")


def _as_batch(envelopes: Envelope | Iterable[Envelope]) -> list[Envelope]:
    batch = [envelopes] if isinstance(envelopes, Envelope) else list(envelopes)
    for item in batch:
        if not isinstance(item, Envelope):
            raise TypeError(f"expected Envelope objects, got {type(item).__name__}")
    return batch


def _single(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception inside nested single-member groups, or the group itself."""
    exc: BaseException = group
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


@asynccontextmanager
async def open_stage(
    stage_cls: type[Stage],
    options: Mapping[str, Any] | None = None,
    *,
    settings: Settings | Mapping[str, Any] | None = None,
    context: StageContext | None = None,
    name: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> AsyncIterator[StageHarness]:
    """Run ``stage_cls`` (with ``options``) between two memory channels until the block ends.

    ``harness.send(...)`` / ``harness.receive()`` drive it item by item;
    ``harness.process(envelopes)`` sends one batch and waits until every envelope is passed
    on or answered. Leaving the block closes the inbox and waits (up to ``timeout_s``) for
    the stage to drain and return, failing with ``ConformanceError`` if it does not or if
    it leaves its outbox open. An exception inside the block cancels the stage instead.
    An exception from the stage itself ends the block and is raised as it is (not wrapped
    in an exception group).
    """
    stage = make_stage(stage_cls, options, settings=settings, context=context, name=name)
    harness = StageHarness(stage, timeout_s=timeout_s)
    try:
        async with trio.open_nursery() as nursery:
            await harness._start(nursery)
            try:
                yield harness
                await harness.close()
            except BaseException:
                nursery.cancel_scope.cancel()
                raise
            finally:
                harness._stop()
    except BaseExceptionGroup as group:
        raise _single(group) from None


# --------------------------------------------------------------------------------------
# The conformance check
# --------------------------------------------------------------------------------------


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(_describe(e) for e in exc.exceptions)
    return f"{type(exc).__name__}: {exc}"


async def check_stage_conformance(
    stage_cls: type[Stage],
    options: Mapping[str, Any] | None = None,
    *,
    settings: Settings | Mapping[str, Any] | None = None,
    make_context: Callable[[], StageContext] | None = None,
    envelopes: Callable[[], Sequence[Envelope]] | None = None,
    rejects: Callable[[], Sequence[Envelope]] | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    cancel_timeout_s: float = CANCEL_TIMEOUT_S,
) -> None:
    """Check that ``stage_cls`` keeps the stage contract; raise ``ConformanceError`` listing
    every violation.

    - the registry's class checks pass, the options validate, every option has a
      description and the stage a docstring (``logstack stages list`` shows them);
    - it starts, and passes on or answers every request of a batch (``envelopes()``:
      fresh requests each call; default one valid entry from key ``payments-api``), also
      when two batches arrive at once;
    - a rejected request is answered and does not kill the stage: each of ``rejects()``
      (requests it must refuse) gets a ``RejectError`` and is not passed on, and so does a
      malformed JSON body if the stage reads the body (with ``400``, not ``500``); the
      stage still handles the next request;
    - when its inbox closes it drains what it holds, returns and closes its outbox;
    - it never holds the event loop longer than ``cancel_timeout_s`` while handling them;
    - cancelled, idle or busy, it returns within ``cancel_timeout_s`` seconds;
    - ``reload(settings)`` with unchanged settings does not raise.

    Each check runs on a fresh instance, with a fresh ``StageContext(settings)`` or, for
    stages that need shared services (``context.services``), ``make_context()``. A stage
    that swallows ``trio.Cancelled`` in a loop cannot be stopped by anything in the same
    thread: then this check hangs too.
    """
    label = getattr(stage_cls, "__qualname__", repr(stage_cls))
    make_envelopes = envelopes or (lambda: [make_envelope()])
    problems: list[str] = []

    def fail(problem: str) -> None:
        problems.append(f"{label}: {problem}")

    # Static checks: nothing else makes sense if these fail.
    static = check_stage_class(stage_cls)
    if static:
        raise ConformanceError([f"{label}: {p}" for p in static])
    config, option_problems = validate_options(stage_cls, options)
    if config is None:
        raise ConformanceError([f"{label}: options: {p}" for p in option_problems])
    for field_name, info in stage_cls.Config.model_fields.items():
        if not (info.description or "").strip():
            fail(
                f"option {field_name!r} has no description "
                "(declare it with Field(..., description=...))"
            )
    if not summary_of(stage_cls):
        fail("has no docstring (its first line is the summary in `logstack stages list`)")
    if make_context is not None and settings is not None:
        raise TypeError("pass settings or make_context, not both")
    resolved_settings = _as_settings(settings)

    def new_context() -> StageContext:
        return make_context() if make_context is not None else StageContext(resolved_settings)

    try:
        make_stage(stage_cls, options, context=new_context())
    except Exception as exc:
        raise ConformanceError([f"{label}: cannot be instantiated: {_describe(exc)}"]) from None

    def opened() -> AbstractAsyncContextManager[StageHarness]:
        return open_stage(stage_cls, options, context=new_context(), timeout_s=timeout_s)

    # 1. Starts; passes on or answers every request, also of coalesced batches; never
    # holds the event loop (every request and /healthz would wait for it).
    blocked_s = 0.0
    try:
        async with trio.open_nursery() as watch:

            async def watchdog() -> None:
                nonlocal blocked_s
                while True:
                    before = time.perf_counter()
                    await trio.sleep(WATCHDOG_TICK_S)
                    late = time.perf_counter() - before - WATCHDOG_TICK_S
                    blocked_s = max(blocked_s, late)

            watch.start_soon(watchdog)
            async with opened() as harness:
                first, second = list(make_envelopes()), list(make_envelopes())
                await harness.send(first)
                await harness.process(second)
                await harness._wait_for(
                    lambda: all(harness.settled(e) for e in first), "pass on or answer a batch"
                )
                for envelope in harness.passed:
                    if not envelope.pending and isinstance(envelope.reply.outcome, RejectError):
                        fail("passed on a request it had rejected")
                        break
            watch.cancel_scope.cancel()
    except Exception as exc:
        fail(f"failed on requests it should pass on or answer: {_describe(exc)}")
    if blocked_s > cancel_timeout_s:
        fail(
            f"held the event loop for {blocked_s:.2f}s while handling a batch (limit "
            f"{cancel_timeout_s:g}s): a blocking call (time.sleep, blocking I/O, long CPU "
            "work) in process or run makes every request wait; use trio's async calls or "
            "trio.to_thread.run_sync"
        )

    # 2. Rejects cleanly: the rejected request is answered, the stage lives on.
    try:
        async with opened() as harness:
            expected = list(rejects()) if rejects is not None else []
            malformed = make_envelope(body=b'{"entries": [')
            for envelope in [*expected, malformed]:
                await harness.process(envelope)
            for envelope in expected:
                outcome = envelope.reply.outcome
                if envelope in harness.passed and envelope.pending:
                    fail("passed on a request it was expected to reject")
                elif not isinstance(outcome, RejectError):
                    fail(f"answered a request it was expected to reject with {outcome!r}")
            if isinstance(malformed.reply.outcome, InternalError):
                fail(
                    "answered a malformed JSON body with 500 internal_error: let the "
                    "ValidationError of envelope.document() propagate (the client's 400)"
                )
            after = list(make_envelopes())
            await harness.process(after)
    except Exception as exc:
        fail(f"did not survive a rejected request: {_describe(exc)}")

    # 3. Drains: what is in the inbox when it closes is handled, then run returns.
    try:
        async with opened() as harness:
            batch = list(make_envelopes())
            await harness.send(batch)
            await harness.close()
            unsettled = sum(not harness.settled(e) for e in batch)
            if unsettled:
                fail(
                    f"returned after its inbox closed leaving {unsettled} request(s) neither "
                    "passed on nor answered"
                )
    except ConformanceError as exc:
        problems.extend(exc.problems)
    except Exception as exc:
        fail(f"failed while draining: {_describe(exc)}")

    # 4. Cancellation, idle and with work in flight.
    for busy in (False, True):
        state = "with a batch in flight" if busy else "while idle"
        try:
            elapsed = await _cancel_after_start(opened, make_envelopes if busy else None)
        except Exception as exc:
            fail(f"raised when cancelled {state}: {_describe(exc)}")
            continue
        if elapsed > cancel_timeout_s:
            fail(
                f"took {elapsed:.2f}s to stop when cancelled {state} (limit {cancel_timeout_s:g}s)"
            )

    # 5. Reload with unchanged settings.
    try:
        context = new_context()
        make_stage(stage_cls, options, context=context).reload(context.settings)
    except Exception as exc:
        fail(f"reload(settings) raised {_describe(exc)}")

    if problems:
        raise ConformanceError(problems)


async def _cancel_after_start(
    opened: Callable[[], AbstractAsyncContextManager[StageHarness]],
    make_envelopes: Callable[[], Sequence[Envelope]] | None,
) -> float:
    """Start a stage, optionally hand it a batch, cancel it; seconds until it stopped."""
    started = math.nan
    with trio.CancelScope() as scope:
        async with opened() as harness:
            with trio.move_on_after(harness.timeout_s):
                await trio.testing.wait_all_tasks_blocked()
            if make_envelopes is not None:
                harness._inbox.send_nowait(list(make_envelopes()))
                await trio.lowlevel.checkpoint()
            started = trio.current_time()
            scope.cancel()
            await trio.sleep_forever()
    return trio.current_time() - started
