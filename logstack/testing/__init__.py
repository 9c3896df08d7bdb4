"""Test kit for LogStack and its plugins.

- Run one stage between real trio channels and check it keeps the stage contract:
  ``open_stage``, ``make_stage``, ``make_envelope``, ``make_entry``,
  ``check_stage_conformance`` (see ``docs/writing-a-stage.md``).
- Drive the real server as a child process on a loopback port: ``LogstackProcess`` with a
  config from ``make_test_config`` (API keys ``TEST_TOKEN``, ``TEST_TOKEN_2``, admin token
  ``TEST_ADMIN_TOKEN``).
- A real Loki-compatible receiver: ``open_loki_receiver`` (in-process) or
  ``LokiReceiverProcess`` (``python -m logstack.testing.loki``).
"""

from ._loki import (
    LokiReceiver,
    PushRecord,
    ReceiverTransport,
    open_loki_receiver,
    serve_loki_receiver,
)
from ._process import (
    TEST_ADMIN_TOKEN,
    TEST_TOKEN,
    TEST_TOKEN_2,
    LogstackProcess,
    LokiReceiverProcess,
    make_test_config,
)
from ._stages import (
    ConformanceError,
    Processed,
    StageHarness,
    check_stage_conformance,
    make_entry,
    make_envelope,
    make_stage,
    open_stage,
)

__all__ = [
    "TEST_ADMIN_TOKEN",
    "TEST_TOKEN",
    "TEST_TOKEN_2",
    "ConformanceError",
    "LogstackProcess",
    "LokiReceiver",
    "LokiReceiverProcess",
    "Processed",
    "PushRecord",
    "ReceiverTransport",
    "StageHarness",
    "check_stage_conformance",
    "make_entry",
    "make_envelope",
    "make_stage",
    "make_test_config",
    "open_loki_receiver",
    "open_stage",
    "serve_loki_receiver",
]
