"""The ``mask`` stage: masks sensitive keys and values before anything touches disk."""

from __future__ import annotations

import logging
from typing import Any, NoReturn

from logstack._envelope import Envelope
from logstack._errors import InternalError
from logstack._masking import Masker
from logstack._schema import check_entry_count
from logstack._stage import Stage, StageConfig

log = logging.getLogger("logstack.stage.mask")


class MaskStage(Stage):
    """Mask sensitive keys and values (baseline, per-key overrides, value detectors).

    Runs on the decoded body, before schema validation and the WAL: every entry of the
    request is masked in place, ``masked_fields_total{token,key}`` counts what was masked,
    and if masking fails for any reason the request is refused with a 500 so that
    unmasked data is never written.
    """

    def __init__(self, config: StageConfig, context: Any) -> None:
        super().__init__(config, context)
        self.masker = self._build(context.settings)

    def process(self, envelope: Envelope) -> None:
        body = envelope.json_body()  # a bad gzip body is the client's 400, not ours
        key_name = envelope.key_name
        try:
            key_masker = self.masker.for_key(key_name)
            # One pass over the raw bytes proves most bodies hold nothing to mask: those
            # are not even decoded here (``validate`` can then decode them straight into
            # typed entries); only the others pay for the per-entry walk.
            if not key_masker.could_match(body):
                return
        except Exception as exc:
            self._refuse(envelope, exc)
        entries = envelope.document()  # a malformed body is the client's 400, not ours
        # ``validate`` would refuse a request of too many entries without looking at them:
        # refused here, they are not walked first (1,600 entries of 51 keys: ~20 ms).
        check_entry_count(entries, self.context.settings.schema_)
        counts: dict[str, int] = {}
        try:
            for entry in entries:
                key_masker.mask_entry(entry, counts)
        except Exception as exc:
            self._refuse(envelope, exc)
        if not counts:
            return
        masked = envelope.masked_fields
        metric = self.context.metrics.masked_fields
        for key, n in counts.items():
            masked[key] = masked.get(key, 0) + n
            metric.labels(token=key_name, key=key).inc(n)

    def _refuse(self, envelope: Envelope, exc: Exception) -> NoReturn:
        """Masking failed: refuse the request (500) so that unmasked data is never written."""
        self.context.metrics.masking_errors.inc()
        # Only the type: an exception's message could quote the data being masked.
        log.error(
            "masking failed (%s); request refused",
            type(exc).__name__,
            extra={"stage": self.name, "request_id": envelope.request_id},
        )
        raise InternalError("masking failed; nothing was stored") from None

    def reload(self, settings: Any) -> None:
        self.masker = self._build(settings)

    def _build(self, settings: Any) -> Masker:
        masker = Masker(settings.masking)
        if masker.hash_without_secret:
            log.warning(
                "masking.hash_secret is empty: 'hash: true' rules mask fully instead of hashing",
                extra={"stage": self.name},
            )
        return masker

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} {self.masker!r}>"
