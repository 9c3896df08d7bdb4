"""What flows through the delivery half, and what Loki's answers mean for it.

- :class:`PushBatch`: the entries of one key's WAL range ``[start, end)``, each already turned
  into a Loki stream (labels) and a Loki entry (timestamp, line, structured metadata).
- :class:`LokiTransport`: the one small interface the forwarder talks to Loki through
  (``httpx`` in production, :class:`logstack.testing.ReceiverTransport` in clock tests).
- :func:`split_by_size`: never more than Loki's burst in one push, sized as Loki sizes it.
- :func:`attribute_rejections`: which entries of a push a ``400`` refused, which Loki stored,
  and which it did not say.
"""

from __future__ import annotations

import gzip
import time
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, overload

import trio

from . import __version__
from ._config import LokiSettings
from ._entry import LogEntry
from ._errors import LogstackError
from ._loki_line import line_with_ids, render_line
from ._loki_proto import (
    PushEntry,
    PushRejection,
    PushStream,
    append_stream_field,
    compress_snappy,
    encode_entry_fields,
    encode_json_push,
    encode_push_request_steps,
    format_labels,
    parse_push_error,
    run_steps,
    sanitize_label_name,
)
from ._wal import Position
from ._wal_format import EntryRecord, LineBatch, LineEntry

_NS = 1_000_000_000

Labels = tuple[tuple[str, str], ...]
"""A stream's label set, sorted by name: hashable, and cheap to compare."""
Item = tuple[Labels, PushEntry]
"""One entry of a push with the labels of its stream."""
AnyEntry = LogEntry | LineEntry
"""An entry as a WAL record holds it (``EntryBatch``: as validated; ``LineBatch``: with its
line rendered)."""

RESERVED_LABELS = ("service", "env", "level")
USER_AGENT = f"LogStack/{__version__}"


# ------------------------------------------------------------------------ entries → Loki


def entry_metadata(entry: AnyEntry) -> dict[str, str]:
    """Loki structured metadata of an entry: its ``trace_id`` and ``span_id`` if present."""
    out: dict[str, str] = {}
    if entry.trace_id is not None:
        out["trace_id"] = entry.trace_id
    if entry.span_id is not None:
        out["span_id"] = entry.span_id
    return out


_sanitized: dict[str, str] = {}


def loki_label_name(name: str) -> str:
    """The stream label name sent for entry label ``name`` (see ``sanitize_label_name``)."""
    out = _sanitized.get(name)
    if out is None:
        out = sanitize_label_name(name)
        if len(_sanitized) < 4096:
            _sanitized[name] = out
    return out


def stream_labels(entry: AnyEntry) -> Labels:
    """The entry's Loki stream: its allowed labels plus ``service``, ``env``, ``level``.

    Label names Loki would refuse (``k8s.pod``) are sent sanitised (``k8s_pod``). Should two
    names meet after sanitising, a name that was valid as written wins; the three reserved
    labels always come from the entry's own fields.
    """
    labels: dict[str, str] = {}
    renamed: list[tuple[str, str]] = []
    for name, value in entry.labels.items():
        loki_name = loki_label_name(name)
        if loki_name == name:
            labels[name] = value
        else:
            renamed.append((loki_name, value))
    for loki_name, value in sorted(renamed):
        labels.setdefault(loki_name, value)
    labels["service"] = entry.service
    labels["env"] = entry.env
    labels["level"] = entry.level
    return tuple(sorted(labels.items()))


_streams: dict[tuple[Any, ...], Labels] = {}
_STREAMS_CACHE_SIZE = 4096


def cached_stream_labels(entry: AnyEntry) -> Labels:
    """``stream_labels(entry)``, remembered: a key's entries use a handful of streams."""
    labels = entry.labels
    key = (
        (entry.service, entry.env, entry.level, *labels.items())
        if labels
        else (entry.service, entry.env, entry.level)
    )
    stream = _streams.get(key)
    if stream is None:
        stream = stream_labels(entry)
        if len(_streams) >= _STREAMS_CACHE_SIZE:
            _streams.clear()
        _streams[key] = stream
    return stream


def loki_size(entry: PushEntry) -> int:
    """Bytes Loki charges an entry against the tenant's rate limit and burst: the line plus
    structured metadata names and values (``util.EntryTotalSize``)."""
    line = entry.line
    size = len(line) if line.isascii() else len(line.encode())
    return size + metadata_size(entry.structured_metadata)


def metadata_size(pairs: Mapping[str, str]) -> int:
    """Bytes Loki charges for structured metadata: every name and value, UTF-8."""
    return sum(len(name.encode()) + len(value.encode()) for name, value in pairs.items())


def group_streams(items: Sequence[Item]) -> list[PushStream]:
    """Items as Loki streams, each stream's entries in item order."""
    streams: dict[Labels, list[PushEntry]] = {}
    last: Labels | None = None
    entries: list[PushEntry] = []
    for labels, entry in items:
        # A batch's entries come in runs of one stream, whose labels are one cached tuple:
        # an identity test finds the run's list without hashing the labels again.
        if labels is not last:
            entries = streams.setdefault(labels, [])
            last = labels
        entries.append(entry)
    return [PushStream(dict(labels), entries) for labels, entries in streams.items()]


def split_by_size(items: Sequence[Item], limit: int) -> tuple[list[list[Item]], list[Item]]:
    """Cut ``items`` (in order) into pushes of at most ``limit`` Loki bytes each.

    Returns the pushes and the entries that alone exceed ``limit``: Loki answers 429 to a
    push larger than the burst however long one waits, so those can never be delivered.
    """
    sizes = [loki_size(entry) for _, entry in items]
    if sum(sizes) <= limit:  # a whole batch fits one push
        return ([list(items)] if items else []), []
    chunks: list[list[Item]] = []
    oversized: list[Item] = []
    current: list[Item] = []
    used = 0
    for item, size in zip(items, sizes, strict=True):
        if size > limit:
            oversized.append(item)
            continue
        if current and used + size > limit:
            chunks.append(current)
            current, used = [], 0
        current.append(item)
        used += size
    if current:
        chunks.append(current)
    return chunks, oversized


def encode_push(
    items: Sequence[Item], tenant: str | None, loki: LokiSettings
) -> tuple[bytes, dict[str, str]]:
    """The HTTP body and headers of one push, in the configured format."""
    return run_steps(encode_push_steps(items, tenant, loki))


def encode_push_steps(
    items: Sequence[Item], tenant: str | None, loki: LokiSettings
) -> Generator[int, None, tuple[bytes, dict[str, str]]]:
    """``encode_push`` in steps of ~100 entries, yielding how many each step encoded (see
    ``encode_push_request_steps``)."""
    streams = group_streams(items)
    yield 0
    if loki.push_format == "json":
        body = encode_json_push(streams)
        headers = _push_headers(tenant, "application/json")
        if loki.gzip:
            body = gzip.compress(body, compresslevel=1)
            headers["Content-Encoding"] = "gzip"
    else:
        raw = yield from encode_push_request_steps(streams)
        body = compress_snappy(raw)
        headers = _push_headers(tenant, "application/x-protobuf")
    return body, headers


def _push_headers(tenant: str | None, content_type: str) -> dict[str, str]:
    headers = {"User-Agent": USER_AGENT, "Content-Type": content_type}
    if tenant:
        headers["X-Scope-OrgID"] = tenant
    return headers


Prepared = tuple[list[tuple[Sequence[Item], bytes, dict[str, str]]], list[Item]]
"""A batch cut to the burst and encoded: (chunk, body, headers) per push, and the entries
too large to ever be pushed."""

WireEntry = tuple[Labels, int, bytes, dict[str, str] | None]
"""An entry as ``PushBatch.add`` keeps it: its stream's labels, timestamp (ns), Loki line as
UTF-8 JSON, and structured metadata (``None`` without)."""


def wire_item(entry: WireEntry) -> Item:
    """The ``Item`` of a kept entry (its line decoded, its metadata copied)."""
    labels, timestamp_ns, line, metadata = entry
    return labels, PushEntry(timestamp_ns, line.decode(), dict(metadata) if metadata else {})


class WireItems(Sequence[Item]):
    """A batch's entries as ``Item``s, made on first use: a push that Loki took never needs
    them, only one it refused in part or whole (to attribute and dead-letter entries)."""

    def __init__(self, entries: list[WireEntry]) -> None:
        self._entries = entries
        self._items: list[Item] | None = None

    def _all(self) -> list[Item]:
        if self._items is None:
            self._items = [wire_item(entry) for entry in self._entries]
        return self._items

    def __len__(self) -> int:
        return len(self._entries)

    @overload
    def __getitem__(self, index: int) -> Item: ...

    @overload
    def __getitem__(self, index: slice) -> list[Item]: ...

    def __getitem__(self, index: int | slice) -> Item | list[Item]:
        return self._all()[index]


@dataclass(eq=False)
class PushBatch:
    """Entries of one key's WAL range ``[start, end)``, ready for Loki, in WAL order.

    ``add`` turns WAL records into Loki lines and, for the protobuf format, encodes each
    entry's protobuf field at once, while the line is at hand: a batch that fits one push
    (the usual case) is then only joined and compressed, and its entries never become
    ``PushEntry`` objects unless Loki refuses some of them (``WireItems``).

    The forwarder sets ``pushed`` once Loki took the range (or it was dead-lettered) and
    ``done`` once the checkpoint after it is durable. The batcher sends a key's next batch
    after ``pushed``: the checkpoint's fsync overlaps the next push, and pushes of one key
    stay in order.
    """

    key_name: str
    tenant: str | None
    start: Position
    end: Position
    oldest_received_ns: int
    pushed: trio.Event = field(default_factory=trio.Event)
    done: trio.Event = field(default_factory=trio.Event)
    created: float = field(default_factory=time.monotonic)
    prepared: Prepared | None = None
    entries: list[WireEntry] = field(default_factory=list)
    loki_bytes: int = 0
    """``loki_size`` of all entries, summed by ``add``."""
    fields: dict[Labels, list[bytes]] | None = None
    """Each stream's entries as protobuf ``EntryAdapter`` fields (``add`` with ``protobuf``);
    ``None`` if some entries were added without."""

    def prepare(self, loki: LokiSettings) -> None:
        """Cut the batch to Loki's burst and encode every push body now: the batcher does
        this (in steps: ``prepare_steps``) while the key's previous batch is still in
        flight, so only sending is left once that one is in."""
        run_steps(self.prepare_steps(loki))

    def prepare_steps(self, loki: LokiSettings) -> Generator[int, None, None]:
        """``prepare`` in steps; each yield says how many entries the step worked on."""
        fields = self.fields
        if (
            fields is not None
            and self.entries
            and loki.push_format == "protobuf"
            and self.loki_bytes <= loki.burst_limit_bytes
        ):
            out: list[bytes] = []
            for labels, stream_fields in fields.items():
                append_stream_field(dict(labels), stream_fields, out)
            body = compress_snappy(b"".join(out))
            headers = _push_headers(self.tenant, "application/x-protobuf")
            self.prepared = ([(WireItems(self.entries), body, headers)], [])
            yield len(self.entries)
            return
        chunks, oversized = split_by_size(self.items, loki.burst_limit_bytes)
        yield 0
        encoded: list[tuple[Sequence[Item], bytes, dict[str, str]]] = []
        for chunk in chunks:
            body, headers = yield from encode_push_steps(chunk, self.tenant, loki)
            encoded.append((chunk, body, headers))
        self.prepared = (encoded, oversized)

    @property
    def entry_count(self) -> int:
        return len(self.entries)

    @property
    def items(self) -> list[Item]:
        """The entries as ``Item``s (made anew at each call)."""
        return [wire_item(entry) for entry in self.entries]

    @property
    def streams(self) -> list[PushStream]:
        return group_streams(self.items)

    @classmethod
    def from_wal(
        cls,
        key_name: str,
        tenant: str | None,
        start: Position,
        end: Position,
        batches: list[EntryRecord],
        *,
        structured_metadata: bool = False,
    ) -> PushBatch:
        oldest = batches[0].received_ns if batches else time.time_ns()
        push = cls(key_name, tenant, start, end, oldest)
        for batch in batches:
            push.add(batch, structured_metadata=structured_metadata)
        return push

    def add(
        self, batch: EntryRecord, *, structured_metadata: bool = False, protobuf: bool = True
    ) -> None:
        """Append the entries of one WAL record as Loki lines with their streams, and with
        ``protobuf`` (the push format, as configured) their protobuf fields too.

        A ``LineBatch`` carries its lines (without the ids: ``logstack._loki_line``); an
        ``EntryBatch``, written by an earlier version, has them rendered here."""
        first = len(self.entries)
        append = self.entries.append
        entries: Sequence[AnyEntry] = batch.entries
        lines: list[bytes]
        if isinstance(batch, LineBatch):
            lines = (
                [entry.line for entry in batch.entries]
                if structured_metadata
                else [
                    entry.line
                    if entry.trace_id is None and entry.span_id is None
                    else line_with_ids(entry.line, entry.trace_id, entry.span_id)
                    for entry in batch.entries
                ]
            )
        else:
            lines = [
                render_line(entry, with_ids=not structured_metadata) for entry in batch.entries
            ]
        previous: AnyEntry | None = None
        labels: Labels = ()
        size = 0
        metadata: dict[str, str] | None = None
        for entry, line in zip(entries, lines, strict=True):
            if structured_metadata:
                metadata = entry_metadata(entry)
                size += metadata_size(metadata)
            size += len(line)
            # Consecutive entries mostly share their stream: comparing four fields with the
            # previous entry's is cheaper than hashing them for the cache.
            if (
                previous is None
                or entry.level != previous.level
                or entry.service != previous.service
                or entry.env != previous.env
                or entry.labels != previous.labels
            ):
                labels = cached_stream_labels(entry)
            previous = entry
            append((labels, entry.timestamp_ns, line, metadata))
        self.loki_bytes += size
        if protobuf and (self.fields is not None or not first):
            if self.fields is None:
                self.fields = {}
            # The record's entries again, while they are still in the CPU's caches.
            encode_entry_fields(self.entries[first:], self.fields)
        else:
            self.fields = None  # some entries have no fields: prepare encodes them all

    def __repr__(self) -> str:
        return (
            f"<PushBatch {self.key_name} {self.start}->{self.end} "
            f"entries={len(self.entries)} done={self.done.is_set()}>"
        )


# ------------------------------------------------------------------------ the transport


class LokiTransportError(LogstackError):
    """A request to Loki got no HTTP answer (connection refused or reset, timeout, ...)."""


class LokiTimeoutError(LokiTransportError):
    """No answer within ``loki.timeout_s``: the URL may be up but failing its pushes (a
    hung ingester behind a ``/ready`` that says 200), unlike a refused connection."""


@dataclass(frozen=True, slots=True)
class LokiAnswer:
    """Loki's HTTP answer: status, body text and (if sent) ``Retry-After`` in seconds."""

    status: int
    text: str = ""
    retry_after_s: float | None = None


class LokiTransport(Protocol):
    """How the forwarder reaches Loki. Implementations translate their own errors into
    :class:`LokiTransportError`; timeouts are applied by the caller (``trio.fail_after``)."""

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> LokiAnswer: ...

    async def get(self, url: str, headers: Mapping[str, str] | None = None) -> LokiAnswer: ...

    async def aclose(self) -> None: ...


# ------------------------------------------------------------------------ what a 400 means


@dataclass(slots=True)
class Attribution:
    """The fate of each entry of a push Loki answered 400 (indices into the push's items)."""

    rejected: dict[int, str] = field(default_factory=dict)
    """Entries Loki named as refused, with the message that named each."""
    unconfirmed: list[int] = field(default_factory=list)
    """Entries Loki's answer does not account for: it may or may not have stored them."""
    stored: list[int] = field(default_factory=list)
    """Entries Loki stored (the answer accounts for every refusal, and these are not one)."""
    unexplained: list[str] = field(default_factory=list)
    """Why some entries are unconfirmed (messages not understood or not matched)."""


def _matches(rejection: PushRejection, entry: PushEntry) -> bool:
    scope = rejection.scope
    if scope == "entry":
        return entry.timestamp_ns == rejection.value
    if scope == "second":
        return entry.timestamp_ns // _NS == rejection.value
    if scope == "line_length":
        return len(entry.line.encode()) == rejection.value
    if scope == "structured_metadata":
        return bool(entry.structured_metadata)
    return True  # the whole stream


def attribute_rejections(items: Sequence[Item], text: str) -> Attribution:
    """Read Loki's 400 ``text`` against the push's ``items``.

    Loki stored every valid line of the push. Its answer is complete when it is the
    distributor's list of validation errors (every refusal, grouped). It is partial when an
    ingester refused entries: then only the last such stream is reported, at most 10 of its
    entries are listed, and the distributor's validation errors are dropped. Whatever the
    answer does not account for is *unconfirmed*: Loki may or may not hold it.
    """
    report = parse_push_error(text)
    result = Attribution()
    by_stream: dict[str, list[int]] = {}
    names: dict[Labels, str] = {}
    for index, (labels, _) in enumerate(items):
        name = names.get(labels)
        if name is None:
            name = names[labels] = format_labels(dict(labels))
        by_stream.setdefault(name, []).append(index)
    result.unexplained.extend(report.unrecognized)
    for rejection in report.rejections:
        matched = [
            i for i in by_stream.get(rejection.stream, ()) if _matches(rejection, items[i][1])
        ]
        if len(matched) < rejection.count:
            result.unexplained.append(rejection.message)
        for i in matched:
            result.rejected.setdefault(i, rejection.message)
    if report.ingester_stream is not None:
        named = by_stream.get(report.ingester_stream, [])
        listed = [r for r in report.rejections if r.stream == report.ingester_stream]
        complete = (
            not report.unrecognized
            and report.ingester_ignored == len(listed)
            and report.ingester_total == len(named)
            and len(by_stream) == 1
        )
        if not complete:
            result.unexplained.append(
                "an ingester refused entries: Loki then reports one stream only, at most 10 "
                "of its entries, and drops the distributor's validation errors"
            )
    elif not report.rejections and not report.unrecognized:
        result.unexplained.append("Loki answered 400 without naming what it refused")
    certain = not result.unexplained
    for index in range(len(items)):
        if index in result.rejected:
            continue
        (result.stored if certain else result.unconfirmed).append(index)
    return result
