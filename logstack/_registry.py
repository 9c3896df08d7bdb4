"""Stage discovery through the ``logstack.stages`` entry-point group (flake8's finder model).

Discover from metadata, import only the stages the pipeline uses, validate each one
(name pattern, class, config class, ``process``/``run``), and report every problem at once,
naming the culprit as ``distribution[name]``.
"""

from __future__ import annotations

import inspect
import re
import traceback
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter
from pydantic import ValidationError as PydanticValidationError
from pydantic_core import PydanticUndefined

from ._config import DEFAULT_PIPELINE, Settings, StageSpec
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


@dataclass
class Discovery:
    """What the installed metadata registers, without importing anything."""

    stages: dict[str, StagePlugin] = field(default_factory=dict)
    """Usable stages by name: well named and registered exactly once."""
    problems: list[str] = field(default_factory=list)
    """Bad names and duplicates, each naming its culprits; they fail start-up."""
    unusable: dict[str, list[StagePlugin]] = field(default_factory=dict)
    """Registered names that cannot be used (bad name, duplicate); already in ``problems``."""
    problems_by_name: dict[str, list[str]] = field(default_factory=dict)

    def report(self, name: str, problem: str) -> None:
        self.problems.append(problem)
        self.problems_by_name.setdefault(name, []).append(problem)


def _plugin_of(ep: EntryPoint) -> StagePlugin:
    dist = ep.dist.name if ep.dist is not None else "<unknown>"
    version = ep.dist.version if ep.dist is not None else "?"
    return StagePlugin(ep.name, dist, version, ep)


def discover_all(eps: Iterable[EntryPoint] | None = None) -> Discovery:
    """Read every ``logstack.stages`` registration; report bad names and duplicates."""
    found = Discovery()
    by_name: dict[str, list[StagePlugin]] = {}
    for ep in entry_points(group=GROUP) if eps is None else eps:
        plugin = _plugin_of(ep)
        same = by_name.setdefault(ep.name, [])
        if any(
            p.distribution == plugin.distribution and p.entry_point.value == ep.value for p in same
        ):
            continue  # the same distribution seen twice on sys.path
        same.append(plugin)
    for name, plugins in by_name.items():
        if not STAGE_NAME.match(name):
            for plugin in plugins:
                found.report(
                    name,
                    f"{plugin.culprit}: stage name must match {STAGE_NAME.pattern} "
                    "(snake_case; third-party stages carry a prefix such as acme_)",
                )
            found.unusable[name] = plugins
        elif len(plugins) > 1:
            culprits = ", ".join(
                f"{p.culprit} ({p.entry_point.value})"
                for p in sorted(plugins, key=lambda p: (p.distribution, p.entry_point.value))
            )
            found.report(
                name,
                f"stage name {name!r} is registered {len(plugins)} times: {culprits}; "
                "uninstall all but one of these distributions (or have one rename its stage)",
            )
            found.unusable[name] = plugins
        else:
            found.stages[name] = plugins[0]
    return found


def discover(eps: Iterable[EntryPoint] | None = None) -> tuple[dict[str, StagePlugin], list[str]]:
    """Usable stages by name, plus problems (duplicates, bad names). Imports nothing."""
    found = discover_all(eps)
    return found.stages, found.problems


def load_stage_class(plugin: StagePlugin) -> type[Stage]:
    """Import and validate one stage class; raise ``PluginError`` naming the culprit."""
    try:
        obj = plugin.entry_point.load()
    except Exception as exc:
        where = f"{plugin.culprit}: cannot import {plugin.entry_point.value}"
        raise PluginError([f"{where}: {_describe_exception(exc)}"]) from None
    problems = check_stage_class(obj)
    if problems:
        raise PluginError([f"{plugin.culprit}: {p}" for p in problems])
    stage_cls: type[Stage] = obj
    return stage_cls


_IMPORT_MACHINERY = (str(Path(inspect.getfile(traceback)).parent / "importlib"), __file__)


def _describe_exception(exc: BaseException) -> str:
    """``Type: message (at file:line)``, the line being the last one outside the import
    machinery: where the plugin's own code failed, not where we asked to import it."""
    text = f"{type(exc).__name__}: {exc}"
    frames = [
        frame
        for frame in traceback.extract_tb(exc.__traceback__)
        if not frame.filename.startswith(("<frozen ", *_IMPORT_MACHINERY))
    ]
    if frames and not isinstance(exc, SyntaxError):  # a SyntaxError names its own line
        text += f" (at {frames[-1].filename}:{frames[-1].lineno})"
    return text


def check_stage_class(obj: Any) -> list[str]:
    """The conformance rules a stage class must satisfy before it is instantiated."""
    if not (inspect.isclass(obj) and issubclass(obj, Stage)):
        return [f"{obj!r} is not a subclass of logstack.Stage"]
    problems = []
    config_cls = getattr(obj, "Config", None)
    if not (inspect.isclass(config_cls) and issubclass(config_cls, StageConfig)):
        problems.append("Config must be a subclass of logstack.StageConfig")
    elif config_cls.model_config.get("extra") != "forbid":
        problems.append(
            "Config must refuse unknown options (keep StageConfig's model_config extra='forbid')"
        )
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
    if has_process:
        if inspect.iscoroutinefunction(obj.process):
            problems.append("process must be a plain (non-async) function; use run for I/O")
        elif not _accepts(obj.process, 2):
            problems.append("process must have the signature process(self, envelope)")
    return problems


def _accepts(function: Any, n_positional: int) -> bool:
    """Whether ``function`` can be called with ``n_positional`` positional arguments."""
    try:
        inspect.signature(function).bind(*range(n_positional))
    except (TypeError, ValueError):
        return False
    return True


def validate_options(
    stage_cls: type[Stage], options: Mapping[str, Any] | None
) -> tuple[StageConfig | None, list[str]]:
    """Build the stage's config from its ``options``; or ``None`` and every problem."""
    try:
        return stage_cls.Config.model_validate(dict(options or {})), []
    except PydanticValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = ".".join(str(p) for p in error["loc"]) or "options"
            if error["type"] == "extra_forbidden":
                problems.append(f"unknown field {loc!r}")
            else:
                problems.append(f"{loc}: {error['msg']}")
        return None, problems
    except Exception as exc:  # a plugin validator raising something pydantic does not wrap
        return None, [f"options could not be validated: {_describe_exception(exc)}"]


def summary_of(stage_cls: type[Stage]) -> str:
    # The first line of the stage's own (or a plugin base class's) docstring, never the
    # docstring of ``Stage`` itself, which ``inspect.getdoc`` would otherwise inherit.
    mro = stage_cls.__mro__
    own = mro[: mro.index(Stage)] if Stage in mro else mro[:1]
    doc = inspect.cleandoc(next((c.__doc__ for c in own if c.__doc__), ""))
    return doc.strip().splitlines()[0] if doc.strip() else ""


def describe_options(config_cls: type[StageConfig]) -> dict[str, dict[str, Any]]:
    """Type, default and description of every option, from the config class itself."""
    described: dict[str, dict[str, Any]] = {}
    for name, info in config_cls.model_fields.items():
        option: dict[str, Any] = {"type": _type_name(info.annotation)}
        default = info.get_default(call_default_factory=True)
        if default is PydanticUndefined:
            option["required"] = True
        else:
            try:
                adapter: TypeAdapter[Any] = TypeAdapter(info.annotation or Any)
                option["default"] = adapter.dump_python(default, mode="json")
            except Exception:
                option["default"] = repr(default)
        option["description"] = info.description or ""
        described[name] = option
    return described


def _type_name(annotation: Any) -> str:
    if inspect.isclass(annotation) and not getattr(annotation, "__args__", None):
        return annotation.__name__
    return re.sub(r"\b(?:typing|collections\.abc|pathlib)\.", "", str(annotation))


@dataclass(frozen=True)
class ResolvedStage:
    spec: StageSpec
    plugin: StagePlugin
    stage_cls: type[Stage]
    config: StageConfig
    index: int = 0
    """Position in ``pipeline:``."""

    @property
    def where(self) -> str:
        return f"pipeline[{self.index}] ({self.spec.type})"


def resolve_pipeline(
    settings: Settings, eps: Iterable[EntryPoint] | None = None
) -> list[ResolvedStage]:
    """``settings.pipeline`` as the service runs it: :func:`resolve_stages`, and the
    built-in stages there, once each and in order; every problem listed at once."""
    return resolve_stages(settings, eps, builtin_stage_problems(settings.pipeline))


def builtin_stage_problems(pipeline: Sequence[StageSpec]) -> list[str]:
    """Without ``auth`` anyone could ingest, without ``mask`` secrets would reach the disk,
    and out of order a request would be answered before it is written: plugins go between
    the built-in stages before ``wal_append``, never instead of them."""
    types = [spec.type for spec in pipeline]
    missing = [t for t in DEFAULT_PIPELINE if t not in types]
    repeated = [t for t in DEFAULT_PIPELINE if types.count(t) > 1]
    problems = []
    if missing:
        problems.append(f"missing: {', '.join(missing)}")
    if repeated:
        problems.append(f"listed more than once: {', '.join(repeated)}")
    order = [t for t in types if t in DEFAULT_PIPELINE]
    if not problems and order != list(DEFAULT_PIPELINE):
        problems.append(f"listed as {' -> '.join(order)}")
    out = []
    if problems:
        out.append(
            f"pipeline: the built-in stages must each be there once, in the order "
            f"{' -> '.join(DEFAULT_PIPELINE)}, with plugins between them ({'; '.join(problems)})"
        )
    if "wal_append" in types:
        first_after = types.index("wal_append") + 1
        for index, kind in enumerate(types[first_after:], first_after):
            if kind not in DEFAULT_PIPELINE:
                # Past the WAL the channels carry key names and pushes, not requests: such
                # a stage crashed the service on the first request, or (after the forwarder)
                # was never called, so what it was to mask reached Loki.
                out.append(
                    f"pipeline[{index}] ({kind}): a plugin stage must come before wal_append "
                    "(after it the pipeline carries what was written to the WAL, not requests)"
                )
    return out


def resolve_stages(
    settings: Settings,
    eps: Iterable[EntryPoint] | None = None,
    problems_found: Iterable[str] = (),
) -> list[ResolvedStage]:
    """Turn ``settings.pipeline`` into validated stage classes and configs, or fail listing
    all problems (``problems_found`` too); nothing is required to be there."""
    found = discover_all(eps)
    problems = list(found.problems)
    resolved: list[ResolvedStage] = []
    seen_names: dict[str, int] = {}
    for index, spec in enumerate(settings.pipeline):
        where = f"pipeline[{index}] ({spec.type})"
        duplicate = spec.instance_name in seen_names
        if duplicate:  # reported, and its options still checked: every problem at once
            problems.append(
                f"{where}: duplicate stage name {spec.instance_name!r} "
                f"(also pipeline[{seen_names[spec.instance_name]}]); give one a distinct `name`"
            )
        else:
            seen_names[spec.instance_name] = index
        if spec.type in found.unusable:
            continue  # its registration is broken and already reported, naming the culprits
        plugin = found.stages.get(spec.type)
        if plugin is None:
            known = ", ".join(sorted(found.stages)) or "none"
            problems.append(f"{where}: unknown stage type {spec.type!r} (installed: {known})")
            continue
        try:
            stage_cls = load_stage_class(plugin)
        except PluginError as exc:
            problems.extend(f"{where}: {p}" for p in exc.problems)
            continue
        config, option_problems = validate_options(stage_cls, spec.options)
        if config is None:
            problems.extend(f"{where}: {p}" for p in option_problems)
            continue
        if not duplicate:
            resolved.append(ResolvedStage(spec, plugin, stage_cls, config, index))
    problems.extend(problems_found)
    if problems:
        raise PluginError(problems)
    return resolved


def describe_stages(eps: Iterable[EntryPoint] | None = None) -> list[dict[str, Any]]:
    """Name, distribution, version, summary and options of every stage (``stages list``)."""
    found = discover_all(eps)
    rows: list[dict[str, Any]] = []
    for name in sorted(found.stages):
        plugin = found.stages[name]
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
            row["options"] = describe_options(stage_cls.Config)
        rows.append(row)
    for name, plugins in found.unusable.items():
        rows.append(
            {
                "name": name,
                "distribution": ", ".join(sorted({p.distribution for p in plugins})),
                "version": ", ".join(sorted({p.version for p in plugins})),
                "error": "; ".join(found.problems_by_name[name]),
            }
        )
    return sorted(rows, key=lambda row: str(row["name"]))
