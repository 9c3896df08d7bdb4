"""The public API is exported from one place and nothing private leaks (trio's test_exports).

Plugin authors import from ``logstack`` (``Stage``, ``StageConfig``, ``Envelope``, ...) and
``logstack.testing`` only; everything else lives in ``_*`` modules that may change.
"""

from __future__ import annotations
import __future__

import importlib
import inspect
import pkgutil
from types import ModuleType

import pytest

import logstack
import logstack.testing

PUBLIC_MODULES = [logstack, logstack.testing]

PLUGIN_API = {
    logstack: {
        "Stage",
        "StageConfig",
        "StageContext",
        "Envelope",
        "LogEntry",
        "Batch",
        "LogstackError",
        "RejectError",
        "ValidationError",
        "InternalError",
        "PluginError",
    },
    logstack.testing: {
        "open_stage",
        "make_stage",
        "make_envelope",
        "make_entry",
        "check_stage_conformance",
        "ConformanceError",
        "StageHarness",
        "Processed",
        "LogstackProcess",
        "make_test_config",
        "TEST_TOKEN",
        "open_loki_receiver",
    },
}


def public_names(module: ModuleType) -> set[str]:
    """What a reader of ``dir(module)`` would take for API: no ``_`` prefix, no submodules,
    no ``from __future__`` feature flags."""
    return {
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and not inspect.ismodule(value)
        and not isinstance(value, __future__._Feature)
    }


@pytest.mark.parametrize("module", PUBLIC_MODULES, ids=lambda m: m.__name__)
def test_all_names_exist_and_are_unique(module: ModuleType) -> None:
    names = list(module.__all__)
    assert len(names) == len(set(names)), "duplicates in __all__"
    for name in names:
        assert hasattr(module, name), f"{module.__name__}.{name} is in __all__ but missing"


@pytest.mark.parametrize("module", PUBLIC_MODULES, ids=lambda m: m.__name__)
def test_all_is_exactly_the_public_namespace(module: ModuleType) -> None:
    """Nothing public that is not in ``__all__`` (an accidental export), nothing private in
    ``__all__`` (a leak)."""
    exported = set(module.__all__)
    assert public_names(module) == exported - {"__version__"}
    assert not [n for n in exported if n.startswith("_") and n != "__version__"]


@pytest.mark.parametrize("module", PUBLIC_MODULES, ids=lambda m: m.__name__)
def test_exports_are_defined_in_private_modules_of_the_package(module: ModuleType) -> None:
    """Each exported class or function lives in a ``_private`` module of this package and
    is re-exported here: one public name, one place to import it from."""
    for name in module.__all__:
        value = getattr(module, name)
        if not (inspect.isclass(value) or inspect.isfunction(value)):
            continue
        home = value.__module__
        assert home.startswith(module.__name__ + "._"), f"{name} is defined in {home}"


def test_each_name_is_exported_from_one_place() -> None:
    assert set(logstack.__all__).isdisjoint(logstack.testing.__all__)


@pytest.mark.parametrize("module", PUBLIC_MODULES, ids=lambda m: m.__name__)
def test_the_plugin_api_is_exported(module: ModuleType) -> None:
    assert PLUGIN_API[module] <= set(module.__all__)


def test_star_import_gives_exactly_all() -> None:
    for module in PUBLIC_MODULES:
        namespace: dict[str, object] = {}
        exec(f"from {module.__name__} import *", namespace)
        assert set(namespace) - {"__builtins__"} == set(module.__all__)


def test_private_modules_are_private() -> None:
    """Every submodule of ``logstack`` but the public ones is ``_``-prefixed (``__main__``
    and the ``python -m`` entry points aside), so nobody imports internals by accident."""
    allowed = {"logstack.testing", "logstack.testing.loki", "logstack.bench", "logstack.__main__"}
    for info in pkgutil.walk_packages(logstack.__path__, "logstack."):
        if info.name.startswith("logstack.bench."):
            continue
        leaf = info.name.rsplit(".", 1)[1]
        assert leaf.startswith("_") or info.name in allowed, info.name
        if info.name in allowed and info.name != "logstack.__main__":
            importlib.import_module(info.name)
