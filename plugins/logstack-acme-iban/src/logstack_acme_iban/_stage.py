"""The ``acme_mask_iban`` stage: a simple ``process`` stage over the decoded request."""

from __future__ import annotations

import logging
from typing import Any

from pydantic import Field

from logstack import Envelope, InternalError, LogEntry, Stage, StageConfig, StageContext

from ._iban import IbanMasker

log = logging.getLogger("logstack_acme_iban")

STAGE_TYPE = "acme_mask_iban"
"""The entry-point name (``pyproject.toml``), as ``pipeline:`` lists it."""
METRIC_KEY = "detector:iban"
"""The ``key`` label of ``masked_fields_total`` for IBANs, like the built-in detectors'."""


class MaskIbanConfig(StageConfig):
    """Options of ``acme_mask_iban`` (the ``options:`` of its ``pipeline:`` entry)."""

    keep_last: int = Field(
        4,
        ge=0,
        le=8,
        description="Characters kept at the end of a masked IBAN (0 keeps none).",
    )
    keep_country: bool = Field(
        True, description="Keep the two-letter country code in front of the mask."
    )
    scan_labels: bool = Field(
        True, description="Also mask IBANs in the values of `labels` (Loki stream labels)."
    )


class MaskIbanStage(Stage):
    """Mask IBANs (length and mod-97 checked) in the message, metadata and labels.

    Place it after ``auth`` and before ``mask``: it masks the decoded request in place, so
    nothing downstream (the schema, the WAL, Loki) sees the account numbers. After ``mask``
    it would see IBANs that ``mask``'s card detector has already cut: the detector masks any
    13-19 of their digits that pass the Luhn check (a quarter of German or Polish IBANs in
    groups of four hold such a run), what is left is no IBAN any more, and the rest of the
    account number stays in clear; so a start-up warning says so. Before ``auth`` it would
    decode bodies of unauthenticated requests. Every IBAN counts in
    ``masked_fields_total{token, key="detector:iban"}``.
    """

    Config = MaskIbanConfig

    def __init__(self, config: MaskIbanConfig, context: StageContext) -> None:
        super().__init__(config, context)
        self.options = config
        self.masker = IbanMasker(keep_last=config.keep_last, keep_country=config.keep_country)
        order = [spec.type for spec in context.settings.pipeline]
        if STAGE_TYPE in order and "mask" in order[: order.index(STAGE_TYPE)]:
            log.warning(
                "acme_mask_iban runs after mask, whose card detector can cut an IBAN's digits "
                "before this stage sees it, leaving part of the account number in clear; "
                "place it before mask"
            )

    def process(self, envelope: Envelope) -> None:
        # Before validate: the request's decoded JSON, whatever its shape (a malformed body
        # raises ValidationError here: the client's 400). After validate: LogEntry objects.
        document = envelope.document() if envelope.entries is None else None
        try:
            if document is not None:
                found = sum(self._mask_raw(entry) for entry in document)
            else:
                found = sum(self._mask_validated(entry) for entry in envelope.entries or ())
        except Exception as exc:
            # Never let a request through half-masked. Log the type only: the message of
            # an exception could quote the data being masked.
            self.context.metrics.masking_errors.inc()
            log.error(
                "IBAN masking failed (%s); request refused",
                type(exc).__name__,
                extra={"stage": self.name, "request_id": envelope.request_id},
            )
            raise InternalError("masking failed; nothing was stored") from None
        if found:
            masked = envelope.masked_fields
            masked[METRIC_KEY] = masked.get(METRIC_KEY, 0) + found
            self.context.metrics.masked_fields.labels(token=envelope.key_name, key=METRIC_KEY).inc(
                found
            )

    def _mask_raw(self, entry: Any) -> int:
        """Mask one entry as the client sent it; anything not shaped like an entry is left
        for ``validate`` to refuse."""
        if not isinstance(entry, dict):
            return 0
        found = 0
        message = entry.get("message")
        if isinstance(message, str):
            entry["message"], found = self.masker.mask_text(message)
        found += self._mask_tree(entry.get("metadata"))
        if self.options.scan_labels:
            found += self._mask_tree(entry.get("labels"))
        return found

    def _mask_validated(self, entry: LogEntry) -> int:
        entry.message, found = self.masker.mask_text(entry.message)
        found += self._mask_tree(entry.metadata)
        if self.options.scan_labels:
            found += self._mask_tree(entry.labels)
        return found

    def _mask_tree(self, root: Any) -> int:
        """Mask every string value in nested dicts and lists, in place (keys untouched)."""
        found = 0
        stack = [root]
        while stack:
            node = stack.pop()
            if isinstance(node, dict):
                items: Any = node.items()
            elif isinstance(node, list):
                items = enumerate(node)
            else:
                continue
            for key, value in list(items):
                if isinstance(value, str):
                    masked, n = self.masker.mask_text(value)
                    if n:
                        node[key] = masked
                        found += n
                elif isinstance(value, (dict, list)):
                    stack.append(value)
        return found

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} {self.masker!r}>"
