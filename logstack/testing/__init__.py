"""Test kit for LogStack and its plugins: a real Loki-compatible receiver, and more to come."""

from ._loki import LokiReceiver, open_loki_receiver, serve_loki_receiver

__all__ = ["LokiReceiver", "open_loki_receiver", "serve_loki_receiver"]
