"""LogStack: a durable, masking log-ingestion gateway in front of Grafana Loki.

This module is the one public surface for plugin authors: ``Stage``, ``StageConfig``,
``StageContext``, ``Envelope``, ``LogEntry`` and the error types. Everything in ``_*``
modules is private.
"""

from __future__ import annotations

import itertools as _itertools
import signal as _signal
import sys as _sys

if _sys.argv[1:2] == ["serve"] and (
    # ``python -m logstack serve``: while ``-m`` loads the package, ``argv[0]`` is ``-m``;
    # ``orig_argv`` says which module (``python -m myapp serve`` is not ours).
    ("-m", "logstack") in _itertools.pairwise(getattr(_sys, "orig_argv", []))
    if _sys.argv[0] == "-m"
    else _sys.argv[0].rsplit("/", 1)[-1] == "logstack"  # the console script
):
    # Before the imports below (~0.5 s): until the service's signal loop takes over,
    # SIGHUP's default action killed a starting process without a word (a
    # ``systemctl reload`` right after a restart). A starting process reads its settings
    # anyway. Nothing else that imports ``logstack`` is touched.
    _signal.signal(_signal.SIGHUP, _signal.SIG_IGN)

__version__ = "0.1.0"

from ._config import Settings, load_settings
from ._context import HealthState, StageContext
from ._entry import LogEntry
from ._envelope import Accepted, Batch, Envelope
from ._errors import (
    AuthenticationError,
    ConfigError,
    ForbiddenError,
    InternalError,
    LogstackError,
    PayloadTooLargeError,
    PluginError,
    QuotaExceededError,
    RateLimitedError,
    RejectError,
    UnavailableError,
    UnsupportedMediaTypeError,
    ValidationError,
    WalCorruptionError,
    WalError,
)
from ._stage import Stage, StageConfig

__all__ = [
    "Accepted",
    "AuthenticationError",
    "Batch",
    "ConfigError",
    "Envelope",
    "ForbiddenError",
    "HealthState",
    "InternalError",
    "LogEntry",
    "LogstackError",
    "PayloadTooLargeError",
    "PluginError",
    "QuotaExceededError",
    "RateLimitedError",
    "RejectError",
    "Settings",
    "Stage",
    "StageConfig",
    "StageContext",
    "UnavailableError",
    "UnsupportedMediaTypeError",
    "ValidationError",
    "WalCorruptionError",
    "WalError",
    "__version__",
    "load_settings",
]
