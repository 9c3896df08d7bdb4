"""Prometheus metrics (SPEC §8), one registry per service instance.

A fresh ``CollectorRegistry`` per ``Metrics`` (owned by the service's ``StageContext``, not
by the Quart app) means the app can be re-created for the same service and keeps its
counters, and tests can run many services in one process without "duplicated timeseries"
errors. ``token`` labels always carry the key *name*, never the token.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from . import __version__

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        # process_* (CPU, memory, file descriptors) and python_info, as every exporter has.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.build_info = Gauge(
            "logstack_build_info", "Always 1; the running version.", ["version"], registry=r
        )
        self.build_info.labels(version=__version__).set(1)
        self.config_version = Gauge(
            "logstack_config_version",
            "1 at start, +1 per successful SIGHUP reload.",
            registry=r,
        )
        self.config_version.set(1)
        self.config_reloads = Counter(
            "logstack_config_reloads_total",
            "SIGHUP reloads by result (ok, failed).",
            ["result"],
            registry=r,
        )
        for result in ("ok", "failed"):
            self.config_reloads.labels(result=result)
        self.ready = Gauge(
            "logstack_ready",
            "1 if the readiness check passes, else 0 (as /readyz reports it, on scrape).",
            ["check"],
            registry=r,
        )
        self.logs_ingested = Counter(
            "logs_ingested_total", "Entries accepted (fsynced) per key.", ["token"], registry=r
        )
        self.logs_rejected = Counter(
            "logs_rejected_total",
            "Requests rejected per key and reason.",
            ["token", "reason"],
            registry=r,
        )
        self.http_requests = Counter(
            "http_requests_total",
            "HTTP requests answered.",
            ["method", "endpoint", "status_code"],
            registry=r,
        )
        self.http_duration = Histogram(
            "http_request_duration_seconds",
            "HTTP request duration.",
            ["method", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rate_limited = Counter(
            "rate_limit_exceeded_total",
            "Requests refused by the rate limiter.",
            ["token"],
            registry=r,
        )
        self.masked_fields = Counter(
            "masked_fields_total", "Values masked per key and field.", ["token", "key"], registry=r
        )
        self.masking_errors = Counter(
            "masking_errors_total", "Requests rejected because masking failed.", registry=r
        )
        self.wal_segments_active = Gauge(
            "wal_segments_active", "WAL segments on disk per key.", ["token"], registry=r
        )
        self.wal_disk_usage = Gauge(
            "wal_disk_usage_bytes", "WAL bytes on disk per key.", ["token"], registry=r
        )
        self.wal_fsyncs = Counter("wal_fsyncs_total", "Group-commit fsyncs.", registry=r)
        self.wal_fsync_duration = Histogram(
            "wal_fsync_duration_seconds",
            "Duration of one group-commit fsync.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.segment_rotations = Counter(
            "segment_rotations_total",
            "Segment rotations per key and reason.",
            ["token", "reason"],
            registry=r,
        )
        self.wal_corrupt_records = Counter(
            "wal_corrupt_records_total",
            "Damaged WAL records or bytes found on recovery or while delivering.",
            ["token", "kind"],
            registry=r,
        )
        self.loki_requests = Counter(
            "loki_requests_total", "Pushes to Loki by answer.", ["status_code"], registry=r
        )
        self.loki_duration = Histogram(
            "loki_request_duration_seconds",
            "Duration of one push to Loki.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.loki_forwarded = Counter(
            "loki_entries_forwarded_total", "Entries Loki confirmed per key.", ["token"], registry=r
        )
        self.loki_retries = Counter(
            "loki_retries_total", "Push retries per key.", ["token"], registry=r
        )
        self.dlq_entries = Counter(
            "dlq_entries_total", "Entries dead-lettered per key.", ["token"], registry=r
        )
        self.forwarder_lag = Gauge(
            "forwarder_lag_seconds",
            "Age of the oldest undelivered entry per key.",
            ["token"],
            registry=r,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def merge_expositions(by_worker: dict[str, bytes]) -> bytes:
    """One exposition of several workers' metrics, every sample labelled ``worker="<i>"``.

    Each worker runs the same code, so their families are the same; the text format needs
    each family's samples together under one ``# HELP``/``# TYPE``, so the families are
    collected from every worker first and written out once each, in the first worker's
    order.
    """
    families: dict[str, tuple[list[bytes], list[bytes]]] = {}
    for worker, text in by_worker.items():
        label = b'worker="' + worker.encode() + b'"'
        current: tuple[list[bytes], list[bytes]] | None = None
        for line in text.splitlines():
            if not line:
                continue
            if line.startswith(b"# "):
                parts = line.split(b" ", 3)
                if len(parts) >= 3 and parts[1] in (b"HELP", b"TYPE"):
                    current = families.setdefault(parts[2].decode(), ([], []))
                    if line not in current[0]:
                        current[0].append(line)
                continue
            if current is None:
                current = families.setdefault("", ([], []))
            brace, space = line.find(b"{"), line.find(b" ")
            if 0 <= brace < space:
                rest = line[brace + 1 :]
                comma = b"" if rest.startswith(b"}") else b","
                labelled = line[: brace + 1] + label + comma + rest
            else:
                labelled = line[:space] + b"{" + label + b"}" + line[space:]
            current[1].append(labelled)
    out: list[bytes] = []
    for headers, samples in families.values():
        out += headers
        out += samples
    return b"\n".join(out) + b"\n"
