"""Stage discovery through the ``logstack.stages`` entry-point group (flake8's finder model).

Discover from metadata, import only the stages the pipeline uses, validate each one
(name pattern, class, config class, ``process``/``run``), and report every problem at once,
naming the culprit as ``distribution[name]``.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from pydantic import ValidationError as PydanticValidationError

from ._config import Settings, StageSpec
from ._errors import PluginError
from ._stage import Stage, StageConfig, overrides

GROUP = "logstack.stages"
STAGE_NAME = re.compile(r"^[a-z][a-z0-9_]{1,63}$")


@dataclass(frozen=True)
class StagePlugin:
    """One registered stage: where it comes from and (once loaded) its class."""

    name: str
    distribution: str
    version: str
    entry_point: EntryPoint

    @property
    def culprit(self) -> str:
        return f"{self.distribution}[{self.name}]"


def discover(eps: Iterable[EntryPoint] | None = None) -> tuple[dict[str, StagePlugin], list[str]]:
    """All registered stages by name, plus problems (duplicates, bad names). Imports nothing."""
    found: dict[str, StagePlugin] = {}
    problems: list[str] = []
    for ep in entry_points(group=GROUP) if eps is None else eps:
        dist = ep.dist.name if ep.dist is not None else "<unknown>"
        version = ep.dist.version if ep.dist is not None else "?"
        plugin = StagePlugin(ep.name, dist, version, ep)
        if not STAGE_NAME.match(ep.name):
            problems.append(
                f"{plugin.culprit}: stage name must match {STAGE_NAME.pattern} "
                "(snake_case; third-party stages carry a prefix such as acme_)"
            )
            continue
        if ep.name in found:
            first = found[ep.name]
            if first.distribution == dist and first.entry_point.value == ep.value:
                continue  # the same distribution seen twice on sys.path
            problems.append(
                f"{plugin.culprit}: stage name {ep.name!r} is already registered by "
                f"{found[ep.name].culprit}"
            )
            continue
        found[ep.name] = plugin
    return found, problems


def load_stage_class(plugin: StagePlugin) -> type[Stage]:
    """Import and validate one stage class; raise ``PluginError`` naming the culprit."""
    try:
        obj = plugin.entry_point.load()
    except Exception as exc:
        where = f"{plugin.culprit}: cannot import {plugin.entry_point.value}"
        raise PluginError([f"{where}: {type(exc).__name__}: {exc}"]) from None
    problems = check_stage_class(obj)
    if problems:
        raise PluginError([f"{plugin.culprit}: {p}" for p in problems])
    stage_cls: type[Stage] = obj
    return stage_cls


def check_stage_class(obj: Any) -> list[str]:
    """The conformance rules a stage class must satisfy before it is instantiated."""
    if not (inspect.isclass(obj) and issubclass(obj, Stage)):
        return [f"{obj!r} is not a subclass of logstack.Stage"]
    problems = []
    config_cls = getattr(obj, "Config", None)
    if not (inspect.isclass(config_cls) and issubclass(config_cls, StageConfig)):
        problems.append("Config must be a subclass of logstack.StageConfig")
    has_process = overrides(obj, "process")
    has_run = overrides(obj, "run")
    if not (has_process or has_run):
        problems.append("implements neither process(envelope) nor run(inbox, outbox)")
    if has_run and not inspect.iscoroutinefunction(obj.run):
        problems.append("run must be an async function")
    if has_run:
        params = list(inspect.signature(obj.run).parameters)
        if params[:3] != ["self", "inbox", "outbox"]:
            problems.append("run must have the signature run(self, inbox, outbox)")
    if has_process and inspect.iscoroutinefunction(obj.process):
        problems.append("process must be a plain (non-async) function; use run for I/O")
    return problems


def summary_of(stage_cls: type[Stage]) -> str:
    # The first line of the stage's own (or a plugin base class's) docstring, never the
    # docstring of ``Stage`` itself, which ``inspect.getdoc`` would otherwise inherit.
    mro = stage_cls.__mro__
    own = mro[: mro.index(Stage)] if Stage in mro else mro[:1]
    doc = inspect.cleandoc(next((c.__doc__ for c in own if c.__doc__), ""))
    return doc.strip().splitlines()[0] if doc.strip() else ""


@dataclass(frozen=True)
class ResolvedStage:
    spec: StageSpec
    plugin: StagePlugin
    stage_cls: type[Stage]
    config: StageConfig


def resolve_pipeline(
    settings: Settings, eps: Iterable[EntryPoint] | None = None
) -> list[ResolvedStage]:
    """Turn ``settings.pipeline`` into validated stage classes and configs, or fail listing all."""
    available, problems = discover(eps)
    resolved: list[ResolvedStage] = []
    seen_names: dict[str, int] = {}
    for index, spec in enumerate(settings.pipeline):
        where = f"pipeline[{index}] ({spec.type})"
        if spec.instance_name in seen_names:
            problems.append(
                f"{where}: duplicate stage name {spec.instance_name!r} "
                f"(also pipeline[{seen_names[spec.instance_name]}]); give one a distinct `name`"
            )
            continue
        seen_names[spec.instance_name] = index
        plugin = available.get(spec.type)
        if plugin is None:
            known = ", ".join(sorted(available)) or "none"
            problems.append(f"{where}: unknown stage type {spec.type!r} (installed: {known})")
            continue
        try:
            stage_cls = load_stage_class(plugin)
        except PluginError as exc:
            problems.extend(f"{where}: {p}" for p in exc.problems)
            continue
        try:
            config = stage_cls.Config.model_validate(spec.options)
        except PydanticValidationError as exc:
            for error in exc.errors():
                field = ".".join(str(p) for p in error["loc"]) or "options"
                msg = (
                    f"unknown field {field!r}"
                    if error["type"] == "extra_forbidden"
                    else (f"{field}: {error['msg']}")
                )
                problems.append(f"{where}: {msg}")
            continue
        resolved.append(ResolvedStage(spec, plugin, stage_cls, config))
    if problems:
        raise PluginError(problems)
    return resolved


def describe_stages(eps: Iterable[EntryPoint] | None = None) -> list[dict[str, Any]]:
    """Name, distribution, version, summary and options of every stage (``stages list``)."""
    available, problems = discover(eps)
    rows: list[dict[str, Any]] = []
    for name in sorted(available):
        plugin = available[name]
        row: dict[str, Any] = {
            "name": name,
            "distribution": plugin.distribution,
            "version": plugin.version,
        }
        try:
            stage_cls = load_stage_class(plugin)
        except PluginError as exc:
            row["error"] = "; ".join(exc.problems)
        else:
            row["summary"] = summary_of(stage_cls)
            row["options"] = {
                field: (info.description or "")
                for field, info in stage_cls.Config.model_fields.items()
            }
        rows.append(row)
    for problem in problems:
        rows.append({"name": "?", "error": problem})
    return rows
