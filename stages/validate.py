"""The ``validate`` stage: enforce the entry schema and turn the request into ``LogEntry``s.

Runs after ``mask``, so it sees (and the WAL stores) masked values only. A request with any
invalid entry is rejected whole with a ``ValidationError`` listing every problem (SPEC §3.1).
"""

from __future__ import annotations

from typing import Any

from logstack._config import SchemaSettings, Settings
from logstack._envelope import Envelope
from logstack._schema import validate_entries
from logstack._schema_fast import validate_body
from logstack._stage import Stage, StageConfig


class ValidateStage(Stage):
    """Check every entry against the schema; fill ``envelope.entries`` or reject the request."""

    def __init__(self, config: StageConfig, context: Any) -> None:
        super().__init__(config, context)
        self._schema: SchemaSettings = context.settings.schema_

    def process(self, envelope: Envelope) -> None:
        if envelope.raw_entries is None:
            # Nobody needed the decoded document (nothing to mask): try the typed decode,
            # which proves most bodies valid in one C pass.
            entries = validate_body(envelope.json_body(), self._schema)
            if entries is not None:
                envelope.entries = entries
                return
        # The rule-by-rule check decides, and explains every problem.
        envelope.entries = validate_entries(envelope.document(), self._schema)

    def reload(self, settings: Settings) -> None:
        self._schema = settings.schema_

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} max_entries={self._schema.max_entries}>"
