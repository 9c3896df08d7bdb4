"""Stage discovery and validation (``logstack._registry``), driven by fake entry points.

Fake ``EntryPoint`` objects point at classes in a helper module written to ``tmp_path``; a
small stand-in plays the distribution (``EntryPoint._for(dist)`` sets ``ep.dist``).
"""

from __future__ import annotations

import itertools
import sys
import textwrap
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import pytest
from pydantic import Field, ValidationError

from logstack import _cli
from logstack._config import DEFAULT_PIPELINE, Settings, StageSpec, load_settings
from logstack._context import StageContext
from logstack._errors import ConfigError, PluginError
from logstack._pipeline import build_stages
from logstack._registry import (
    GROUP,
    builtin_stage_problems,
    check_stage_class,
    describe_options,
    describe_stages,
    discover,
    load_stage_class,
    resolve_pipeline,
    resolve_stages,
)
from logstack._stage import Stage, StageConfig

PLUGIN_SOURCE = '''
from pydantic import ConfigDict, Field, field_validator

from logstack import Stage, StageConfig


class AcmeConfig(StageConfig):
    pattern: str = Field("[0-9]+", description="Regular expression of what to mask.")
    max_hits: int = Field(10, description="Most replacements per entry.")


class GoodStage(Stage):
    """Mask things the acme way.

    A longer description that ``stages list`` does not show.
    """

    Config = AcmeConfig

    def process(self, envelope):
        pass


class OtherGoodStage(Stage):
    def process(self, envelope):
        pass


class RunStage(Stage):
    """A stage with its own loop."""

    async def run(self, inbox, outbox):
        async with inbox, outbox:
            async for batch in inbox:
                await outbox.send(batch)


class NotAStage:
    def process(self, envelope):
        pass


class PlainConfig:
    pattern: str = "x"


class BadConfigStage(Stage):
    Config = PlainConfig

    def process(self, envelope):
        pass


class NothingStage(Stage):
    """Implements neither process nor run."""


class SyncRunStage(Stage):
    def run(self, inbox, outbox):
        pass


class AsyncProcessStage(Stage):
    async def process(self, envelope):
        pass


class BadRunSignatureStage(Stage):
    async def run(self, receive, send):
        pass


class NoArgProcessStage(Stage):
    def process(self):
        pass


class OtherNameProcessStage(Stage):
    """Parameter names are the author's choice; the runtime passes the envelope by position."""

    def process(self, env):
        pass


class LooseConfig(StageConfig):
    model_config = ConfigDict(extra="ignore")


class LooseConfigStage(Stage):
    Config = LooseConfig

    def process(self, envelope):
        pass


class ExplodingConfig(StageConfig):
    value: int = 1

    @field_validator("value")
    @classmethod
    def _explode(cls, value):
        raise TypeError("validator bug")


class ExplodingValidatorStage(Stage):
    Config = ExplodingConfig

    def process(self, envelope):
        pass


class ExplodingInitStage(Stage):
    def __init__(self, config, context):
        raise KeyError("needs_a_service")

    def process(self, envelope):
        pass


not_a_class = 42
'''

BROKEN_SOURCE = """
import os

raise RuntimeError("kaboom at import")
"""

SYNTAX_ERROR_SOURCE = """
def oops(:
    pass
"""

_counter = itertools.count()


@dataclass(frozen=True)
class FakeDist:
    """Just what ``discover()`` reads from ``ep.dist``."""

    name: str
    version: str = "1.2.3"


@dataclass(frozen=True)
class Modules:
    plugin: str
    broken: str
    syntax: str
    imported: Callable[[str], bool]


@pytest.fixture
def modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Modules]:
    """A plugin module and a module that raises at import, with names unique to the test."""
    n = next(_counter)
    plugin, broken, syntax = f"lstest_plugin_{n}", f"lstest_broken_{n}", f"lstest_syntax_{n}"
    (tmp_path / f"{plugin}.py").write_text(textwrap.dedent(PLUGIN_SOURCE), encoding="utf-8")
    (tmp_path / f"{broken}.py").write_text(BROKEN_SOURCE, encoding="utf-8")
    (tmp_path / f"{syntax}.py").write_text(SYNTAX_ERROR_SOURCE, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield Modules(plugin, broken, syntax, lambda name: name in sys.modules)
    for name in (plugin, broken, syntax):
        sys.modules.pop(name, None)


def ep(
    name: str, value: str, dist: str | None = "logstack-acme", version: str = "1.2.3"
) -> EntryPoint:
    point = EntryPoint(name=name, value=value, group=GROUP)
    return point._for(FakeDist(dist, version)) if dist is not None else point


def settings_with(*specs: dict[str, Any]) -> Settings:
    return Settings.model_validate({"pipeline": list(specs)})


def problems_of(settings: Settings, eps: list[EntryPoint]) -> list[str]:
    """Resolving alone (``resolve_stages``): these pipelines hold only the stages under
    test, without the built-ins ``resolve_pipeline`` also requires."""
    with pytest.raises(PluginError) as info:
        resolve_stages(settings, eps)
    assert isinstance(info.value, ConfigError)
    # Every problem is also in the message, one per line.
    for problem in info.value.problems:
        assert problem in str(info.value)
    return info.value.problems


def only(problems: list[str]) -> str:
    assert len(problems) == 1, problems
    return problems[0]


# --------------------------------------------------------------------------------------
# The real installed metadata
# --------------------------------------------------------------------------------------


def test_default_pipeline_resolves_from_installed_metadata() -> None:
    resolved = resolve_pipeline(load_settings(env={}))
    assert [r.spec.instance_name for r in resolved] == list(DEFAULT_PIPELINE)
    assert [r.spec.instance_name for r in resolved] == [
        "auth",
        "mask",
        "validate",
        "wal_append",
        "batch",
        "forward_loki",
    ]
    for item in resolved:
        assert item.plugin.distribution == "logstack"
        assert item.plugin.culprit == f"logstack[{item.spec.type}]"
        assert issubclass(item.stage_cls, Stage)
        assert isinstance(item.config, item.stage_cls.Config)
        assert check_stage_class(item.stage_cls) == []


def test_stages_up_to_mask_are_told_their_entries_are_unmasked() -> None:
    """Their failures are logged without the exception's text (it may quote entries)."""
    settings = load_settings(env={})
    stages = build_stages(resolve_pipeline(settings), StageContext(settings=settings))
    assert {stage.name: stage.sees_unmasked for stage in stages} == {
        "auth": True,
        "mask": True,
        "validate": False,
        "wal_append": False,
        "batch": False,
        "forward_loki": False,
    }


BUILTINS_RULE = (
    "pipeline: the built-in stages must each be there once, in the order auth -> mask -> "
    "validate -> wal_append -> batch -> forward_loki, with plugins between them"
)


@pytest.mark.parametrize(
    ("pipeline", "problem"),
    [
        (["mask", "validate", "wal_append", "batch", "forward_loki"], "missing: auth"),
        (["auth", "validate", "wal_append", "batch", "forward_loki"], "missing: mask"),
        (
            ["auth", "wal_append", "mask", "validate", "batch", "forward_loki"],
            "listed as auth -> wal_append -> mask -> validate -> batch -> forward_loki",
        ),
        (
            [*DEFAULT_PIPELINE, {"type": "wal_append", "name": "again"}],
            "listed more than once: wal_append",
        ),
    ],
)
def test_the_builtin_stages_must_each_run_once_in_order(pipeline: list[Any], problem: str) -> None:
    """An audit found a pipeline without ``auth`` served anyone (202, key
    ``unauthenticated``), and one with ``wal_append`` first answered 202 for nothing
    stored, then died: both passed ``check-config``."""
    with pytest.raises(PluginError) as info:
        resolve_pipeline(Settings.model_validate({"pipeline": pipeline}))
    assert info.value.problems == [f"{BUILTINS_RULE} ({problem})"]


@pytest.mark.parametrize("position", [4, 5, 6])
def test_a_plugin_stage_after_wal_append_is_refused(position: int) -> None:
    """A plugin after ``wal_append`` passed ``check-config``; then the first request
    crashed the service (the channel there carries key names, after ``batch`` pushes), or,
    after ``forward_loki``, the stage was never called and what it masks reached Loki."""
    pipeline = [*DEFAULT_PIPELINE]
    pipeline.insert(position, "acme_mask_pan")
    specs = Settings.model_validate({"pipeline": pipeline}).pipeline
    assert builtin_stage_problems(specs) == [
        f"pipeline[{position}] (acme_mask_pan): a plugin stage must come before wal_append "
        "(after it the pipeline carries what was written to the WAL, not requests)"
    ]
    pipeline.remove("acme_mask_pan")
    pipeline.insert(3, "acme_mask_pan")  # just before wal_append: fine
    assert builtin_stage_problems(Settings.model_validate({"pipeline": pipeline}).pipeline) == []


def test_plugins_go_anywhere_between_the_builtins_and_a_type_alone_is_enough() -> None:
    settings = Settings.model_validate(
        {"pipeline": ["auth", "mask", {"type": "mask", "name": "x"}, "validate", "wal_append"]}
    )
    assert [s.instance_name for s in settings.pipeline][:3] == ["auth", "mask", "x"]
    with pytest.raises(PluginError) as info:
        resolve_pipeline(settings)
    assert info.value.problems == [
        f"{BUILTINS_RULE} (missing: batch, forward_loki; listed more than once: mask)"
    ]


def test_installed_builtins_are_discovered_without_problems() -> None:
    found, problems = discover()
    assert problems == []
    for name in DEFAULT_PIPELINE:
        assert found[name].distribution == "logstack"


# --------------------------------------------------------------------------------------
# Discovery
# --------------------------------------------------------------------------------------


def test_good_plugin_resolves_with_options(modules: Modules) -> None:
    eps = [ep("acme_mask", f"{modules.plugin}:GoodStage")]
    settings = settings_with({"type": "acme_mask", "options": {"pattern": "[a-z]+", "max_hits": 3}})
    [item] = resolve_stages(settings, eps)
    assert item.stage_cls.__name__ == "GoodStage"
    assert item.plugin.culprit == "logstack-acme[acme_mask]"
    assert item.plugin.version == "1.2.3"
    assert item.config.pattern == "[a-z]+"  # type: ignore[attr-defined]
    assert item.config.max_hits == 3  # type: ignore[attr-defined]


def test_discover_imports_nothing_and_only_used_stages_are_imported(modules: Modules) -> None:
    eps = [
        ep("acme_mask", f"{modules.plugin}:GoodStage"),
        ep("acme_broken", f"{modules.broken}:Anything"),
    ]
    found, problems = discover(eps)
    assert problems == []
    assert set(found) == {"acme_mask", "acme_broken"}
    assert not modules.imported(modules.plugin)
    # The broken module is installed but unused: the pipeline still resolves.
    resolve_stages(settings_with({"type": "acme_mask"}), eps)
    assert modules.imported(modules.plugin)
    assert not modules.imported(modules.broken)


def test_unknown_stage_type_lists_installed(modules: Modules) -> None:
    eps = [ep("acme_mask", f"{modules.plugin}:GoodStage")]
    problem = only(problems_of(settings_with({"type": "acme_nope"}), eps))
    assert problem.startswith("pipeline[0] (acme_nope): unknown stage type 'acme_nope'")
    assert "acme_mask" in problem


@pytest.mark.parametrize("bad", ["Acme", "a", "1acme", "acme-mask", "acme.mask", "x" * 65])
def test_bad_stage_name_pattern(modules: Modules, bad: str) -> None:
    eps = [ep(bad, f"{modules.plugin}:GoodStage")]
    found, problems = discover(eps)
    assert bad not in found
    problem = only(problems)
    assert problem.startswith(f"logstack-acme[{bad}]: stage name must match")
    # Reported at start-up even though the pipeline does not use it.
    all_problems = problems_of(
        settings_with({"type": "acme_good"}),
        [
            *eps,
            ep("acme_good", f"{modules.plugin}:GoodStage"),
        ],
    )
    assert all_problems == [problem]


def test_entry_point_without_distribution(modules: Modules) -> None:
    found, problems = discover([ep("acme_mask", f"{modules.plugin}:GoodStage", dist=None)])
    assert problems == []
    assert found["acme_mask"].culprit == "<unknown>[acme_mask]"


def test_duplicate_registration_by_two_distributions(modules: Modules) -> None:
    eps = [
        ep("acme_mask", f"{modules.plugin}:GoodStage", dist="logstack-acme"),
        ep("acme_mask", f"{modules.plugin}:OtherGoodStage", dist="logstack-evil"),
    ]
    found, problems = discover(eps)
    problem = only(problems)
    assert problem == (
        f"stage name 'acme_mask' is registered 2 times: "
        f"logstack-acme[acme_mask] ({modules.plugin}:GoodStage), "
        f"logstack-evil[acme_mask] ({modules.plugin}:OtherGoodStage); "
        "uninstall all but one of these distributions (or have one rename its stage)"
    )
    assert "acme_mask" not in found  # neither wins: not silently first-wins (pluggy's mistake)
    # A pipeline using the name fails with that one message (not also "unknown stage").
    assert problems_of(settings_with({"type": "acme_mask"}), eps) == [problem]
    # Discovery order does not change the message.
    assert discover(list(reversed(eps)))[1] == [problem]
    # Nothing was imported to find out.
    assert not modules.imported(modules.plugin)


def test_third_party_registering_a_builtin_name(modules: Modules) -> None:
    eps = [
        ep("mask", f"{modules.plugin}:GoodStage", dist="logstack-evil"),
        ep("mask", "stages.mask:MaskStage", dist="logstack", version="0.1.0"),
    ]
    problem = only(problems_of(settings_with({"type": "mask"}), eps))
    assert "logstack[mask] (stages.mask:MaskStage)" in problem
    assert f"logstack-evil[mask] ({modules.plugin}:GoodStage)" in problem


def test_three_registrations_are_one_problem(modules: Modules) -> None:
    eps = [ep("acme_x", f"{modules.plugin}:GoodStage", dist=f"logstack-{n}") for n in "abc"]
    problem = only(discover(eps)[1])
    assert "registered 3 times" in problem
    for n in "abc":
        assert f"logstack-{n}[acme_x]" in problem


def test_duplicate_registration_of_the_same_value_by_two_distributions(
    modules: Modules,
) -> None:
    eps = [
        ep("acme_mask", f"{modules.plugin}:GoodStage", dist="logstack-acme"),
        ep("acme_mask", f"{modules.plugin}:GoodStage", dist="logstack-acme-fork"),
    ]
    problem = only(discover(eps)[1])
    assert "logstack-acme-fork[acme_mask]" in problem
    assert "logstack-acme[acme_mask]" in problem


def test_same_distribution_seen_twice_is_not_a_duplicate(modules: Modules) -> None:
    eps = [
        ep("acme_mask", f"{modules.plugin}:GoodStage"),
        ep("acme_mask", f"{modules.plugin}:GoodStage"),
    ]
    found, problems = discover(eps)
    assert problems == []
    assert list(found) == ["acme_mask"]


# --------------------------------------------------------------------------------------
# Loading and validating the class
# --------------------------------------------------------------------------------------


def test_import_error_names_culprit_and_exception(modules: Modules) -> None:
    eps = [ep("acme_broken", f"{modules.broken}:Anything")]
    problem = only(problems_of(settings_with({"type": "acme_broken"}), eps))
    assert problem.startswith("pipeline[0] (acme_broken): logstack-acme[acme_broken]: ")
    assert "cannot import" in problem
    assert "RuntimeError: kaboom at import" in problem


def test_import_error_says_where_the_plugin_failed(modules: Modules) -> None:
    eps = [ep("acme_broken", f"{modules.broken}:Anything")]
    problem = only(problems_of(settings_with({"type": "acme_broken"}), eps))
    # The plugin's own line, not importlib's or the registry's.
    assert problem.endswith(f"{modules.broken}.py:4)"), problem
    assert "importlib" not in problem


def test_syntax_error_in_a_plugin(modules: Modules) -> None:
    eps = [ep("acme_syntax", f"{modules.syntax}:Anything")]
    problem = only(problems_of(settings_with({"type": "acme_syntax"}), eps))
    assert "logstack-acme[acme_syntax]: cannot import" in problem
    assert "SyntaxError" in problem
    assert f"{modules.syntax}.py, line 2" in problem


def test_missing_attribute_is_an_import_problem(modules: Modules) -> None:
    eps = [ep("acme_gone", f"{modules.plugin}:DoesNotExist")]
    problem = only(problems_of(settings_with({"type": "acme_gone"}), eps))
    assert "logstack-acme[acme_gone]: cannot import" in problem
    assert "AttributeError" in problem


def test_missing_module_is_an_import_problem(modules: Modules) -> None:
    eps = [ep("acme_gone", "lstest_no_such_module_anywhere:Stage")]
    problem = only(problems_of(settings_with({"type": "acme_gone"}), eps))
    assert "logstack-acme[acme_gone]: cannot import" in problem
    assert "ModuleNotFoundError" in problem


@pytest.mark.parametrize("attr", ["NotAStage", "not_a_class"])
def test_not_a_stage_subclass(modules: Modules, attr: str) -> None:
    eps = [ep("acme_x", f"{modules.plugin}:{attr}")]
    problem = only(problems_of(settings_with({"type": "acme_x"}), eps))
    assert problem.startswith("pipeline[0] (acme_x): logstack-acme[acme_x]: ")
    assert "is not a subclass of logstack.Stage" in problem


def test_config_not_a_stage_config(modules: Modules) -> None:
    eps = [ep("acme_x", f"{modules.plugin}:BadConfigStage")]
    problem = only(problems_of(settings_with({"type": "acme_x"}), eps))
    assert problem == (
        "pipeline[0] (acme_x): logstack-acme[acme_x]: "
        "Config must be a subclass of logstack.StageConfig"
    )


def test_neither_process_nor_run(modules: Modules) -> None:
    eps = [ep("acme_x", f"{modules.plugin}:NothingStage")]
    problem = only(problems_of(settings_with({"type": "acme_x"}), eps))
    assert problem.endswith(
        "logstack-acme[acme_x]: implements neither process(envelope) nor run(inbox, outbox)"
    )


def test_non_async_run(modules: Modules) -> None:
    eps = [ep("acme_x", f"{modules.plugin}:SyncRunStage")]
    problem = only(problems_of(settings_with({"type": "acme_x"}), eps))
    assert problem.endswith("logstack-acme[acme_x]: run must be an async function")


def test_async_process_and_bad_run_signature(modules: Modules) -> None:
    eps = [
        ep("acme_p", f"{modules.plugin}:AsyncProcessStage"),
        ep("acme_r", f"{modules.plugin}:BadRunSignatureStage"),
    ]
    problems = problems_of(settings_with({"type": "acme_p"}, {"type": "acme_r"}), eps)
    assert len(problems) == 2, problems
    assert problems[0].startswith("pipeline[0] (acme_p): logstack-acme[acme_p]: ")
    assert "process must be a plain (non-async) function" in problems[0]
    assert problems[1].startswith("pipeline[1] (acme_r): logstack-acme[acme_r]: ")
    assert "run(self, inbox, outbox)" in problems[1]


def test_process_must_take_the_envelope(modules: Modules) -> None:
    eps = [
        ep("acme_noarg", f"{modules.plugin}:NoArgProcessStage"),
        ep("acme_other", f"{modules.plugin}:OtherNameProcessStage"),
    ]
    problem = only(problems_of(settings_with({"type": "acme_noarg"}, {"type": "acme_other"}), eps))
    assert problem == (
        "pipeline[0] (acme_noarg): logstack-acme[acme_noarg]: "
        "process must have the signature process(self, envelope)"
    )


def test_config_must_refuse_unknown_options(modules: Modules) -> None:
    eps = [ep("acme_loose", f"{modules.plugin}:LooseConfigStage")]
    problem = only(problems_of(settings_with({"type": "acme_loose"}), eps))
    assert problem.startswith("pipeline[0] (acme_loose): logstack-acme[acme_loose]: Config must")
    assert "extra='forbid'" in problem


def test_a_validator_raising_an_unexpected_error(modules: Modules) -> None:
    eps = [ep("acme_x", f"{modules.plugin}:ExplodingValidatorStage")]
    settings = settings_with({"type": "acme_x", "options": {"value": 2}})
    problem = only(problems_of(settings, eps))
    assert problem.startswith("pipeline[0] (acme_x): options could not be validated: ")
    assert "TypeError: validator bug" in problem


def test_bad_name_used_in_the_pipeline_is_one_problem(modules: Modules) -> None:
    eps = [ep("Acme", f"{modules.plugin}:GoodStage")]
    problem = only(problems_of(settings_with({"type": "Acme"}), eps))
    assert problem.startswith("logstack-acme[Acme]: stage name must match")


def test_a_constructor_that_raises_fails_start_up_naming_the_culprit(modules: Modules) -> None:
    eps = [
        ep("acme_good", f"{modules.plugin}:GoodStage"),
        ep("acme_init", f"{modules.plugin}:ExplodingInitStage", dist="logstack-init"),
    ]
    settings = settings_with({"type": "acme_good"}, {"type": "acme_init", "name": "second"})
    resolved = resolve_stages(settings, eps)
    with pytest.raises(PluginError) as info:
        build_stages(resolved, StageContext(settings))
    assert info.value.problems == [
        "pipeline[1] (acme_init): logstack-init[acme_init]: failed to start: "
        "KeyError: 'needs_a_service'"
    ]
    stages = build_stages(resolved[:1], StageContext(settings))
    assert [s.name for s in stages] == ["acme_good"]


def test_stage_with_own_run_is_valid(modules: Modules) -> None:
    eps = [ep("acme_run", f"{modules.plugin}:RunStage")]
    [item] = resolve_stages(settings_with({"type": "acme_run"}), eps)
    assert item.stage_cls.__name__ == "RunStage"
    assert type(item.config) is StageConfig


def test_load_stage_class_raises_plugin_error_naming_culprit(modules: Modules) -> None:
    found, _ = discover([ep("acme_x", f"{modules.plugin}:NothingStage", dist="logstack-x")])
    with pytest.raises(PluginError) as info:
        load_stage_class(found["acme_x"])
    assert info.value.problems == [
        "logstack-x[acme_x]: implements neither process(envelope) nor run(inbox, outbox)"
    ]


# --------------------------------------------------------------------------------------
# Options and pipeline shape
# --------------------------------------------------------------------------------------


def test_unknown_option_field(modules: Modules) -> None:
    eps = [
        ep("auth_like", f"{modules.plugin}:OtherGoodStage"),
        ep("noop", f"{modules.plugin}:OtherGoodStage"),
        ep("acme_x", f"{modules.plugin}:GoodStage"),
    ]
    settings = settings_with(
        {"type": "auth_like"},
        {"type": "noop"},
        {"type": "acme_x", "options": {"patern": "[0-9]+"}},
    )
    assert only(problems_of(settings, eps)) == "pipeline[2] (acme_x): unknown field 'patern'"


def test_option_of_the_wrong_type(modules: Modules) -> None:
    eps = [ep("acme_x", f"{modules.plugin}:GoodStage")]
    settings = settings_with({"type": "acme_x", "options": {"max_hits": "many"}})
    problem = only(problems_of(settings, eps))
    assert problem.startswith("pipeline[0] (acme_x): max_hits: ")
    assert "integer" in problem


def test_a_boolean_is_not_a_number_option(modules: Modules) -> None:
    """``keep_last: true`` passed check-config as 1, as booleans did for the settings."""
    eps = [ep("acme_x", f"{modules.plugin}:GoodStage")]
    settings = settings_with({"type": "acme_x", "options": {"max_hits": True}})
    problem = only(problems_of(settings, eps))
    assert problem.startswith("pipeline[0] (acme_x): max_hits: ")
    assert "must be a number, not true" in problem


def test_options_on_a_stage_without_options(modules: Modules) -> None:
    eps = [ep("acme_x", f"{modules.plugin}:OtherGoodStage")]
    settings = settings_with({"type": "acme_x", "options": {"anything": 1}})
    assert only(problems_of(settings, eps)) == "pipeline[0] (acme_x): unknown field 'anything'"


def test_duplicate_instance_names(modules: Modules) -> None:
    eps = [ep("acme_x", f"{modules.plugin}:GoodStage")]
    settings = settings_with({"type": "acme_x"}, {"type": "acme_x"})
    problem = only(problems_of(settings, eps))
    assert problem.startswith("pipeline[1] (acme_x): duplicate stage name 'acme_x'")
    assert "pipeline[0]" in problem
    # A distinct ``name`` makes two instances of one type legal.
    resolved = resolve_stages(
        settings_with({"type": "acme_x"}, {"type": "acme_x", "name": "acme_x_again"}), eps
    )
    assert [r.spec.instance_name for r in resolved] == ["acme_x", "acme_x_again"]
    # The duplicate's own bad options are reported with it, not hidden behind it.
    settings = settings_with(
        {"type": "acme_x"}, {"type": "acme_x", "options": {"max_hits": "many"}}
    )
    problems = problems_of(settings, eps)
    assert problems[0].startswith("pipeline[1] (acme_x): duplicate stage name 'acme_x'")
    assert problems[1].startswith("pipeline[1] (acme_x): max_hits:")
    assert len(problems) == 2


def test_explicit_name_clashing_with_a_type(modules: Modules) -> None:
    eps = [
        ep("acme_x", f"{modules.plugin}:GoodStage"),
        ep("acme_y", f"{modules.plugin}:OtherGoodStage"),
    ]
    settings = settings_with({"type": "acme_x"}, {"type": "acme_y", "name": "acme_x"})
    assert "duplicate stage name 'acme_x'" in only(problems_of(settings, eps))


def test_every_problem_is_reported_in_one_error(modules: Modules) -> None:
    eps = [
        ep("acme_good", f"{modules.plugin}:GoodStage"),
        ep("acme_broken", f"{modules.broken}:Anything"),
        ep("acme_notstage", f"{modules.plugin}:NotAStage"),
        ep("acme_cfg", f"{modules.plugin}:BadConfigStage"),
        ep("acme_nothing", f"{modules.plugin}:NothingStage"),
        ep("acme_sync", f"{modules.plugin}:SyncRunStage"),
        ep("acme_dup", f"{modules.plugin}:GoodStage", dist="logstack-one"),
        ep("acme_dup", f"{modules.plugin}:OtherGoodStage", dist="logstack-two"),
        ep("Bad-Name", f"{modules.plugin}:GoodStage"),
    ]
    settings = settings_with(
        {"type": "acme_good"},
        {"type": "acme_unknown"},
        {"type": "acme_broken"},
        {"type": "acme_notstage"},
        {"type": "acme_cfg"},
        {"type": "acme_nothing"},
        {"type": "acme_sync"},
        {"type": "acme_good", "name": "second", "options": {"patern": "x", "max_hits": "lots"}},
        {"type": "acme_good"},
    )
    problems = problems_of(settings, eps)
    expected_fragments = [
        "logstack-two[acme_dup]",  # discovery problems come first
        "logstack-acme[Bad-Name]",
        "pipeline[1] (acme_unknown): unknown stage type",
        "pipeline[2] (acme_broken): logstack-acme[acme_broken]: cannot import",
        "pipeline[3] (acme_notstage): logstack-acme[acme_notstage]: ",
        "pipeline[4] (acme_cfg): logstack-acme[acme_cfg]: Config must be",
        "pipeline[5] (acme_nothing): logstack-acme[acme_nothing]: implements neither",
        "pipeline[6] (acme_sync): logstack-acme[acme_sync]: run must be an async function",
        "pipeline[7] (acme_good): unknown field 'patern'",
        "pipeline[7] (acme_good): max_hits: ",
        "pipeline[8] (acme_good): duplicate stage name 'acme_good'",
    ]
    assert len(problems) == len(expected_fragments), problems
    for fragment in expected_fragments:
        assert sum(fragment in p for p in problems) == 1, (fragment, problems)
    assert not any(p.startswith("pipeline[0]") for p in problems)


def test_stage_spec_rejects_unknown_keys() -> None:
    with pytest.raises(ValueError, match="opts"):
        StageSpec.model_validate({"type": "mask", "opts": {}})


# --------------------------------------------------------------------------------------
# describe_stages
# --------------------------------------------------------------------------------------


def test_describe_stages(modules: Modules) -> None:
    eps = [
        ep("acme_mask", f"{modules.plugin}:GoodStage", version="2.0.1"),
        ep("acme_plain", f"{modules.plugin}:OtherGoodStage", dist="logstack-plain"),
        ep("acme_broken", f"{modules.broken}:Anything"),
        ep("acme_dup", f"{modules.plugin}:GoodStage", dist="logstack-one"),
        ep("acme_dup", f"{modules.plugin}:RunStage", dist="logstack-two", version="3.0"),
        ep("Bad-Name", f"{modules.plugin}:GoodStage"),
    ]
    rows = describe_stages(eps)
    by_name = {row["name"]: row for row in rows}
    assert [row["name"] for row in rows] == sorted(by_name)
    assert set(by_name) == {"Bad-Name", "acme_broken", "acme_dup", "acme_mask", "acme_plain"}
    assert by_name["acme_mask"] == {
        "name": "acme_mask",
        "distribution": "logstack-acme",
        "version": "2.0.1",
        "summary": "Mask things the acme way.",
        "options": {
            "pattern": {
                "type": "str",
                "default": "[0-9]+",
                "description": "Regular expression of what to mask.",
            },
            "max_hits": {
                "type": "int",
                "default": 10,
                "description": "Most replacements per entry.",
            },
        },
    }
    # No docstring of its own: no summary (not the docstring of the ``Stage`` base class).
    assert by_name["acme_plain"]["summary"] == ""
    assert by_name["acme_plain"]["distribution"] == "logstack-plain"
    assert by_name["acme_plain"]["options"] == {}
    assert "error" not in by_name["acme_plain"]
    broken = by_name["acme_broken"]
    assert "summary" not in broken
    assert "logstack-acme[acme_broken]: cannot import" in broken["error"]
    assert "RuntimeError: kaboom at import" in broken["error"]
    dup = by_name["acme_dup"]
    assert dup["distribution"] == "logstack-one, logstack-two"
    assert dup["version"] == "1.2.3, 3.0"
    assert "logstack-two[acme_dup]" in dup["error"]
    assert "logstack-one[acme_dup]" in dup["error"]
    assert by_name["Bad-Name"]["error"].startswith("logstack-acme[Bad-Name]: stage name must")
    # Listing imports the stages to describe them, but the broken one breaks nothing else.
    assert modules.imported(modules.plugin)


def test_describe_options_types_defaults_and_required() -> None:
    class Options(StageConfig):
        keep: int = Field(4, ge=0, description="Characters kept.")
        pattern: str = Field(description="What to look for.")
        keys: frozenset[str] = Field(frozenset({"iban"}), description="Keys.")
        label: str | None = Field(None, description="")

    assert describe_options(Options) == {
        "keep": {"type": "int", "default": 4, "description": "Characters kept."},
        "pattern": {"type": "str", "required": True, "description": "What to look for."},
        "keys": {"type": "frozenset[str]", "default": ["iban"], "description": "Keys."},
        "label": {"type": "str | None", "default": None, "description": ""},
    }


def test_stages_list_prints_options_under_their_stage(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class Options(StageConfig):
        keep_last: int = Field(4, description="Characters kept at the end.")
        pattern: str = Field(description="What to look for.")

    rows = [
        {
            "name": "acme_mask_iban",
            "distribution": "logstack-acme-iban",
            "version": "0.1.0",
            "summary": "Mask IBANs.",
            "options": describe_options(Options),
        },
        {"name": "auth", "distribution": "logstack", "version": "0.1.0", "summary": "Auth."},
    ]
    monkeypatch.setattr(_cli, "describe_stages", lambda: rows)
    assert _cli.main(["stages", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split() == ["acme_mask_iban", "logstack-acme-iban", "0.1.0", "Mask", "IBANs."]
    assert out[2] == "    option keep_last (int, default 4): Characters kept at the end."
    assert out[3] == "    option pattern (str, required): What to look for."
    assert out[4].split()[0] == "auth"
    assert len(out) == 5


def test_describe_installed_builtins() -> None:
    rows = {row["name"]: row for row in describe_stages()}
    for name in DEFAULT_PIPELINE:
        row = rows[name]
        assert row["distribution"] == "logstack"
        assert row["version"]
        assert row["summary"]
        assert "error" not in row
        assert isinstance(row["options"], dict)


@pytest.mark.parametrize("name", ["Bad Name!", "iban-strict", "", "_x", "x" * 65])
def test_a_stage_name_is_a_word_for_logs(name: str) -> None:
    """``name: "Bad Name!"`` was accepted and shown as ``auth -> Bad Name! -> mask``."""
    with pytest.raises(ValidationError):
        Settings.model_validate({"pipeline": ["auth", {"type": "mask", "name": name}]})
    Settings.model_validate({"pipeline": ["auth", {"type": "mask", "name": "mask_2"}]})
