"""``docs/grafana-dashboard.json`` charts metrics that exist, and every metric of SPEC §8."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from logstack._config import Settings
from logstack._service import Service

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json"
SPEC_METRICS = {
    "logs_ingested_total",
    "logs_rejected_total",
    "http_requests_total",
    "http_request_duration_seconds_bucket",
    "rate_limit_exceeded_total",
    "masked_fields_total",
    "wal_segments_active",
    "wal_disk_usage_bytes",
    "segment_rotations_total",
    "loki_requests_total",
    "loki_request_duration_seconds_bucket",
    "loki_entries_forwarded_total",
    "loki_retries_total",
    "dlq_entries_total",
    "forwarder_lag_seconds",
}
SELECTOR = re.compile(r"([a-z_:][a-z0-9_:]*)\{")


def exposed_names() -> set[str]:
    names: set[str] = set()
    for family in Service(Settings()).context.metrics.registry.collect():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names |= {family.name + suffix for suffix in ("_bucket", "_count", "_sum")}
        else:
            names.add(family.name)
    return names


def panels(doc: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in doc["panels"] if p["type"] != "row"]


def test_dashboard_is_importable_json() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["uid"] == "logstack-overview" and doc["title"] == "LogStack"
    ids = [p["id"] for p in doc["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels(doc):
        assert panel["targets"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        box = panel["gridPos"]
        assert box["x"] + box["w"] <= 24
    variables = {v["name"] for v in doc["templating"]["list"]}
    assert variables == {"datasource", "job", "instance", "token"}


def test_every_charted_metric_exists_and_every_spec_metric_is_charted() -> None:
    doc = json.loads(DASHBOARD.read_text())
    charted = {
        name
        for panel in panels(doc)
        for target in panel["targets"]
        for name in SELECTOR.findall(target["expr"])
    }
    unknown = charted - exposed_names()
    assert not unknown, f"the dashboard charts metrics LogStack does not expose: {unknown}"
    missing = SPEC_METRICS - charted
    assert not missing, f"SPEC §8 metrics without a panel: {missing}"
