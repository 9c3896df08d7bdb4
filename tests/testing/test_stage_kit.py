"""The plugin author's test kit: ``open_stage``, ``make_envelope``, ``check_stage_conformance``.

The built-in simple stages pass the conformance check; each broken stage below breaks one
rule of the stage contract and the check names it. Timeouts run on trio's autojump clock.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from pydantic import ConfigDict, Field

from logstack import (
    Envelope,
    InternalError,
    LogEntry,
    PluginError,
    Settings,
    Stage,
    StageConfig,
    StageContext,
    ValidationError,
)
from logstack._wal import WalStore
from logstack.testing import (
    ConformanceError,
    check_stage_conformance,
    make_entry,
    make_envelope,
    make_stage,
    open_stage,
)
from stages.auth import AuthStage
from stages.mask import MaskStage
from stages.validate import ValidateStage
from stages.wal_append import WalAppendStage

# --------------------------------------------------------------------------------------
# Stages used by the tests: good ones first, then one per broken rule
# --------------------------------------------------------------------------------------


class TagConfig(StageConfig):
    tag: str = Field("seen", description="Value written into metadata.tag.")


class TagStage(Stage):
    """Write ``metadata.tag`` into every entry; refuse entries whose message is ``reject``."""

    Config = TagConfig

    def process(self, envelope: Envelope) -> None:
        assert isinstance(self.config, TagConfig)
        for entry in envelope.document():
            if entry.get("message") == "reject":
                raise ValidationError("rejected by the tag stage", reason="tagged")
            entry.setdefault("metadata", {})["tag"] = self.config.tag


class ForwardStage(Stage):
    """A stage with its own loop that forwards every batch unchanged."""

    async def run(
        self, inbox: trio.MemoryReceiveChannel[Any], outbox: trio.MemorySendChannel[Any]
    ) -> None:
        async with inbox, outbox:
            async for batch in inbox:
                await outbox.send(batch)


class CountingStage(Stage):
    """Emits the number of items of each batch (a run stage emitting non-batches)."""

    async def run(
        self, inbox: trio.MemoryReceiveChannel[Any], outbox: trio.MemorySendChannel[Any]
    ) -> None:
        async with inbox, outbox:
            async for item in inbox:
                await outbox.send(len(item))


class UndescribedConfig(StageConfig):
    level: int = 1


class UndescribedStage(Stage):
    Config = UndescribedConfig

    def process(self, envelope: Envelope) -> None:
        pass


class CatchAllStage(Stage):
    """Turns every failure, even the client's malformed JSON, into a 500."""

    def process(self, envelope: Envelope) -> None:
        try:
            envelope.document()
        except Exception:
            raise InternalError("something went wrong") from None


class DiesOnRejectStage(Stage):
    """Its own loop lets a RejectError escape: one bad request kills the stage."""

    async def run(
        self, inbox: trio.MemoryReceiveChannel[Any], outbox: trio.MemorySendChannel[Any]
    ) -> None:
        async with inbox, outbox:
            async for batch in inbox:
                for envelope in batch:
                    envelope.document()
                await outbox.send(batch)


class LeavesOutboxOpenStage(Stage):
    """Forwards, but never closes its outbox: the next stage would never drain."""

    async def run(
        self, inbox: trio.MemoryReceiveChannel[Any], outbox: trio.MemorySendChannel[Any]
    ) -> None:
        async with inbox:
            async for batch in inbox:
                await outbox.send(batch)


class NeverReturnsStage(Stage):
    """Forwards, then keeps waiting after its inbox closed."""

    async def run(
        self, inbox: trio.MemoryReceiveChannel[Any], outbox: trio.MemorySendChannel[Any]
    ) -> None:
        async with inbox, outbox:
            async for batch in inbox:
                await outbox.send(batch)
            await trio.sleep_forever()


class DropsStage(Stage):
    """Neither passes on nor answers anything: clients would wait forever."""

    async def run(
        self, inbox: trio.MemoryReceiveChannel[Any], outbox: trio.MemorySendChannel[Any]
    ) -> None:
        async with inbox, outbox:
            async for _ in inbox:
                pass


class SlowToCancelStage(Stage):
    """Shields a 5 s clean-up from cancellation."""

    async def run(
        self, inbox: trio.MemoryReceiveChannel[Any], outbox: trio.MemorySendChannel[Any]
    ) -> None:
        async with inbox, outbox:
            try:
                async for batch in inbox:
                    await outbox.send(batch)
            finally:
                with trio.CancelScope(shield=True):
                    await trio.sleep(5)


class BlockingStage(Stage):
    """A ``process`` that calls ``time.sleep``: every request, and /healthz, waits for it."""

    def process(self, envelope: Envelope) -> None:
        time.sleep(0.4)


class RejectsAndForwardsStage(Stage):
    """Answers a request and still sends it on."""

    async def run(
        self, inbox: trio.MemoryReceiveChannel[Any], outbox: trio.MemorySendChannel[Any]
    ) -> None:
        async with inbox, outbox:
            async for batch in inbox:
                for envelope in batch:
                    envelope.reject(ValidationError("no"))
                await outbox.send(batch)


class BadReloadStage(Stage):
    """Cannot take a reload."""

    def process(self, envelope: Envelope) -> None:
        pass

    def reload(self, settings: Any) -> None:
        raise RuntimeError("reload is broken")


class BadInitStage(Stage):
    """Raises in its constructor."""

    def __init__(self, config: StageConfig, context: Any) -> None:
        raise KeyError("wal")

    def process(self, envelope: Envelope) -> None:
        pass


class LooseStage(Stage):
    """Accepts (and ignores) unknown options."""

    class Config(StageConfig):
        model_config = ConfigDict(extra="ignore")

    def process(self, envelope: Envelope) -> None:
        pass


class NotAStage:
    def process(self, envelope: Envelope) -> None:
        pass


# --------------------------------------------------------------------------------------
# make_entry / make_envelope / make_stage
# --------------------------------------------------------------------------------------


def test_make_envelope_builds_a_request_as_the_http_layer_does() -> None:
    envelope = make_envelope(entries=[make_entry(message="m", metadata={"a": 1})])
    assert envelope.key is not None and envelope.key_name == "payments-api"
    assert envelope.pending
    assert envelope.raw_entries is None  # decoded by whichever stage asks first
    [entry] = envelope.document()
    assert entry == {
        "timestamp": "2025-09-24T12:00:00.000Z",
        "level": "INFO",
        "message": "m",
        "service": "payments-api",
        "env": "prod",
        "metadata": {"a": 1},
    }
    assert make_envelope(key_name=None).key_name == "unauthenticated"
    assert make_envelope(key_name="user-service").key_name == "user-service"
    assert len(make_envelope().document()) == 1


def test_make_envelope_with_a_raw_body_and_validated() -> None:
    with pytest.raises(ValidationError):
        make_envelope(body=b"{not json").document()
    with pytest.raises(TypeError):
        make_envelope(entries=[make_entry()], body=b"{}")
    validated = make_envelope(entries=[make_entry(level="warning")], validated=True)
    assert validated.entries is not None
    [entry] = validated.entries
    assert isinstance(entry, LogEntry)
    assert entry.level == "WARN"
    with pytest.raises(ValidationError):
        make_envelope(entries=[make_entry(level="LOUD")], validated=True)


def test_make_stage_validates_like_the_registry() -> None:
    stage = make_stage(TagStage, {"tag": "x"}, name="acme_tag")
    assert stage.name == "acme_tag"
    assert stage.config == TagConfig(tag="x")
    assert isinstance(stage.context, StageContext)
    with pytest.raises(PluginError) as info:
        make_stage(TagStage, {"tga": "x"})
    assert info.value.problems == ["TagStage options: unknown field 'tga'"]
    with pytest.raises(PluginError) as info:
        make_stage(NotAStage)  # type: ignore[arg-type]
    assert "is not a subclass of logstack.Stage" in info.value.problems[0]
    settings = Settings.model_validate({"schema": {"max_entries": 3}})
    assert make_stage(ValidateStage, settings=settings).context.settings is settings
    mapped = make_stage(ValidateStage, settings={"schema": {"max_entries": 3}})
    assert mapped.context.settings.schema_.max_entries == 3


# --------------------------------------------------------------------------------------
# open_stage
# --------------------------------------------------------------------------------------


async def test_process_passes_on_and_answers() -> None:
    async with open_stage(TagStage, options={"tag": "acme"}) as harness:
        good = make_envelope(entries=[make_entry(message="fine")])
        bad = make_envelope(entries=[make_entry(message="reject")])
        result = await harness.process([good, bad])
        assert result.passed == [good]
        assert result.answered == [bad]
        [rejection] = result.rejections
        assert isinstance(rejection, ValidationError)
        assert rejection.reason == "tagged"
        assert good.document()[0]["metadata"] == {"tag": "acme"}
        assert good.pending
        # The stage lives on after a rejection.
        again = await harness.process(make_envelope())
        assert len(again.passed) == 1
        assert harness.passed == [good, *again.passed]
    assert harness.finished
    assert harness.closed_outbox


async def test_send_and_receive_batches_in_order() -> None:
    async with open_stage(ForwardStage) as harness:
        first, second = make_envelope(), make_envelope()
        await harness.send(first)
        await harness.send([second])
        assert await harness.receive() == [first]
        assert await harness.receive() == [second]
        await harness.close()
        with pytest.raises(trio.EndOfChannel):
            await harness.receive()
    assert harness.emitted == [[first], [second]]


async def test_send_item_for_stages_that_take_something_else() -> None:
    async with open_stage(CountingStage) as harness:
        await harness.send_item([1, 2, 3])
        assert await harness.receive() == 3
        with pytest.raises(TypeError):
            await harness.send([1, 2])  # type: ignore[list-item]


async def test_a_simple_stage_coalesces_waiting_batches() -> None:
    async with open_stage(TagStage) as harness:
        batches = [[make_envelope()] for _ in range(3)]
        for batch in batches[:2]:
            await harness.send(batch)
        await harness.process(batches[2])
        # Several waiting batches left the stage as one (the runtime's ``coalesce``).
        assert len(harness.emitted) < 3
        assert harness.passed == [b[0] for b in batches]


async def test_errors_in_the_block_and_in_the_stage_are_not_wrapped() -> None:
    with pytest.raises(KeyError):
        async with open_stage(TagStage):
            raise KeyError("from the test")

    class Crashes(Stage):
        """Raises on its first batch."""

        async def run(
            self, inbox: trio.MemoryReceiveChannel[Any], outbox: trio.MemorySendChannel[Any]
        ) -> None:
            async with inbox, outbox:
                await inbox.receive()
                raise ZeroDivisionError("stage bug")

    with pytest.raises(ZeroDivisionError, match="stage bug"):
        async with open_stage(Crashes) as harness:
            await harness.send(make_envelope())
            await trio.sleep_forever()


async def test_leaving_the_block_checks_the_drain(autojump_clock: trio.abc.Clock) -> None:
    with pytest.raises(ConformanceError, match="did not return within 10s"):
        async with open_stage(NeverReturnsStage) as harness:
            await harness.process(make_envelope())
    with pytest.raises(ConformanceError, match="without closing its outbox"):
        async with open_stage(LeavesOutboxOpenStage) as harness:
            await harness.process(make_envelope())


async def test_waiting_too_long_says_what_did_not_happen(autojump_clock: trio.abc.Clock) -> None:
    with pytest.raises(trio.TooSlowError, match="did not pass on or answer a batch within 2s"):
        async with open_stage(DropsStage, timeout_s=2) as harness:
            await harness.process(make_envelope())
    with pytest.raises(trio.TooSlowError, match="did not emit anything within 3s"):
        async with open_stage(DropsStage, timeout_s=3) as harness:
            await harness.receive()


async def test_process_fails_at_once_if_the_stage_returns_holding_requests() -> None:
    class ReturnsEarly(Stage):
        """Returns after its first batch without handling it."""

        async def run(
            self, inbox: trio.MemoryReceiveChannel[Any], outbox: trio.MemorySendChannel[Any]
        ) -> None:
            async with inbox, outbox:
                await inbox.receive()

    with pytest.raises(ConformanceError, match=r"returned with 1 request\(s\) neither"):
        async with open_stage(ReturnsEarly) as harness:
            await harness.process(make_envelope())


async def test_stages_share_a_context() -> None:
    context = StageContext(Settings())
    async with open_stage(MaskStage, context=context, name="mask") as harness:
        await harness.process(make_envelope(entries=[make_entry(metadata={"password": "pw"})]))
    assert harness.context is context
    labels = {"token": "payments-api", "key": "password"}
    assert context.metrics.registry.get_sample_value("masked_fields_total", labels) == 1


# --------------------------------------------------------------------------------------
# check_stage_conformance
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage_cls", [AuthStage, MaskStage, ValidateStage])
async def test_builtin_simple_stages_conform(stage_cls: type[Stage]) -> None:
    await check_stage_conformance(stage_cls)


async def test_a_run_stage_with_services_conforms(tmp_path: Path) -> None:
    """``wal_append`` needs the WAL in ``context.services``: ``make_context`` provides it,
    fresh for every check."""
    contexts: list[StageContext] = []

    def make_context() -> StageContext:
        context = StageContext(Settings())
        store = WalStore(tmp_path / str(len(contexts)), 1 << 20, context.metrics)
        store.open()
        context.services["wal"] = store
        contexts.append(context)
        return context

    await check_stage_conformance(
        WalAppendStage,
        make_context=make_context,
        envelopes=lambda: [make_envelope(validated=True)],
    )
    assert len(contexts) >= 6
    with pytest.raises(TypeError):
        await check_stage_conformance(WalAppendStage, settings={}, make_context=make_context)


async def test_good_plugins_conform() -> None:
    await check_stage_conformance(TagStage, {"tag": "x"})
    await check_stage_conformance(
        TagStage,
        envelopes=lambda: [make_envelope(), make_envelope(key_name="user-service")],
        rejects=lambda: [make_envelope(entries=[make_entry(message="reject")])],
    )
    await check_stage_conformance(ForwardStage)


async def problems_of(stage_cls: type[Any], **kwargs: Any) -> list[str]:
    with pytest.raises(ConformanceError) as info:
        await check_stage_conformance(stage_cls, **kwargs)
    assert isinstance(info.value, AssertionError)  # pytest shows it as a failed check
    for problem in info.value.problems:
        assert problem in str(info.value)
    return info.value.problems


def one(problems: list[str]) -> str:
    assert len(problems) == 1, problems
    return problems[0]


async def test_class_and_options_problems_stop_the_check() -> None:
    problem = one(await problems_of(NotAStage))
    assert "is not a subclass of logstack.Stage" in problem
    problem = one(await problems_of(LooseStage))
    assert problem.startswith("LooseStage: Config must refuse unknown options")
    assert one(await problems_of(TagStage, options={"tga": 1})) == (
        "TagStage: options: unknown field 'tga'"
    )
    problem = one(await problems_of(BadInitStage))
    assert problem == "BadInitStage: cannot be instantiated: KeyError: 'wal'"


async def test_a_stage_that_holds_the_event_loop_is_named() -> None:
    """The busy-cancellation check starts its clock after the batch was handled, so a
    ``process`` calling ``time.sleep(3)`` passed (an audit's plugin made every answer, and an
    unrelated GET, wait 9 s in the service)."""
    problem, *others = await problems_of(BlockingStage, cancel_timeout_s=0.2)
    assert problem.startswith("BlockingStage: held the event loop for 0.")
    assert "while handling a batch (limit 0.2s): a blocking call" in problem
    # The cancellation checks may see it too, or not: they time only the cancellation.
    assert all("to stop when cancelled" in other for other in others)


async def test_every_option_documented_and_a_summary() -> None:
    problems = await problems_of(UndescribedStage)
    assert problems == [
        "UndescribedStage: option 'level' has no description "
        "(declare it with Field(..., description=...))",
        "UndescribedStage: has no docstring "
        "(its first line is the summary in `logstack stages list`)",
    ]


async def test_a_malformed_body_is_the_clients_400_not_a_500() -> None:
    problem = one(await problems_of(CatchAllStage))
    assert "answered a malformed JSON body with 500 internal_error" in problem


async def test_a_rejection_must_not_kill_the_stage() -> None:
    problems = await problems_of(DiesOnRejectStage)
    assert any(
        p.startswith("DiesOnRejectStage: did not survive a rejected request: ValidationError")
        for p in problems
    ), problems


async def test_expected_rejections_must_happen() -> None:
    problem = one(await problems_of(ForwardStage, rejects=lambda: [make_envelope(key_name=None)]))
    assert problem == "ForwardStage: passed on a request it was expected to reject"


async def test_the_outbox_must_be_closed() -> None:
    problems = await problems_of(LeavesOutboxOpenStage)
    assert any("run returned without closing its outbox" in p for p in problems), problems


async def test_it_must_return_when_its_inbox_closes(autojump_clock: trio.abc.Clock) -> None:
    problems = await problems_of(NeverReturnsStage)
    assert any("run did not return within 10s after its inbox was closed" in p for p in problems)


async def test_requests_must_not_be_dropped(autojump_clock: trio.abc.Clock) -> None:
    problems = await problems_of(DropsStage, timeout_s=1)
    assert any(
        "failed on requests it should pass on or answer: TooSlowError" in p for p in problems
    ), problems
    assert any("leaving 1 request(s) neither passed on nor answered" in p for p in problems)


async def test_cancellation_must_be_prompt(autojump_clock: trio.abc.Clock) -> None:
    problems = await problems_of(SlowToCancelStage)
    assert problems == [
        "SlowToCancelStage: took 5.00s to stop when cancelled while idle (limit 1s)",
        "SlowToCancelStage: took 5.00s to stop when cancelled with a batch in flight (limit 1s)",
    ]


async def test_a_rejected_request_must_not_be_passed_on() -> None:
    problems = await problems_of(RejectsAndForwardsStage)
    assert "RejectsAndForwardsStage: passed on a request it had rejected" in problems


async def test_reload_must_not_raise() -> None:
    problem = one(await problems_of(BadReloadStage))
    assert problem == "BadReloadStage: reload(settings) raised RuntimeError: reload is broken"
