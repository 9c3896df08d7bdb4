"""``/openapi.json``: generated from the validating types, describing every route served."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import jsonschema_rs
import msgspec

from logstack import _http
from logstack._api_types import ANSWER_TYPES, ERROR_CODES, api_types
from logstack._config import SchemaSettings, Settings
from logstack._errors import RejectError
from logstack._http import KNOWN_ENDPOINTS, create_app
from logstack._openapi import REF_TEMPLATE, described_routes, openapi_document
from logstack._service import Service, open_service


def served_routes(settings: Settings) -> list[tuple[str, str]]:
    return _http.served_routes(create_app(Service(settings)))


def test_every_served_route_is_described_and_every_described_route_served() -> None:
    settings = Settings()
    assert served_routes(settings) == list(described_routes(openapi_document(settings)))


def test_every_route_has_a_bounded_metrics_label() -> None:
    assert {path for _, path in served_routes(Settings())} <= KNOWN_ENDPOINTS


def test_schemas_are_msgspec_output_not_hand_written() -> None:
    settings = Settings()
    doc = openapi_document(settings)
    types = api_types(settings.schema_)
    _, expected = msgspec.json.schema_components(
        [types.request, *ANSWER_TYPES], ref_template=REF_TEMPLATE
    )
    for name, schema in expected.items():
        assert doc["components"]["schemas"][name] == schema, name
    entry = doc["components"]["schemas"]["LogEntryIn"]
    assert entry["additionalProperties"] is False
    assert set(entry["required"]) == {"timestamp", "level", "message", "service", "env"}
    assert entry["properties"]["service"]["pattern"] == "^[a-z0-9-]+$"
    assert entry["properties"]["message"]["maxLength"] == 8192
    request = doc["components"]["schemas"]["IngestRequest"]
    assert request["properties"]["entries"]["maxItems"] == 500
    ingest = doc["paths"]["/v1/logs:ingest"]["post"]
    assert ingest["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/IngestRequest"
    }


def test_document_follows_the_running_configuration() -> None:
    schema = SchemaSettings(
        max_entries=10, max_message_chars=100, label_allowlist=["region", "k8s.namespace"]
    )
    doc = openapi_document(Settings(schema=schema))
    schemas = doc["components"]["schemas"]
    assert schemas["IngestRequest"]["properties"]["entries"]["maxItems"] == 10
    assert schemas["LogEntryIn"]["properties"]["message"]["maxLength"] == 100
    assert set(schemas["EntryLabels"]["properties"]) == {
        "region",
        "k8s.namespace",
        "service",
        "env",
        "level",
    }


def test_every_component_is_a_valid_json_schema() -> None:
    doc = openapi_document(Settings())
    assert doc["openapi"] == "3.1.0"
    for name, schema in doc["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid(schema), name
    for path, item in doc["paths"].items():
        for method, operation in item.items():
            assert operation["responses"], (method, path)
            assert operation["operationId"]
            for status, response in operation["responses"].items():
                assert "X-Request-Id" in response["headers"], (method, path, status)


def _subclasses(cls: type) -> set[type]:
    out: set[type] = set()
    for sub in cls.__subclasses__():
        out |= {sub, *_subclasses(sub)}
    return out


def test_every_error_code_raised_is_documented() -> None:
    import logstack._admin
    import logstack._admin_dlq  # noqa: F401  (registers its error classes)

    codes = {cls.code for cls in _subclasses(RejectError) if cls.__module__.startswith("logstack")}
    assert codes <= set(ERROR_CODES), codes - set(ERROR_CODES)


def test_admin_routes_need_the_admin_token_in_the_document() -> None:
    doc = openapi_document(Settings())
    for path, item in doc["paths"].items():
        for operation in item.values():
            if path.startswith("/v1/admin/"):
                assert operation["security"] == [{"adminToken": []}]
                assert {"401", "403"} <= set(operation["responses"])
            elif path == "/v1/logs:ingest":
                assert operation["security"] == [{"apiKey": []}]
            else:
                assert operation["security"] == []


async def test_served_document_is_the_generated_one(tmp_path: Path) -> None:
    settings = Settings.model_validate(
        {
            "server": {"port": 0},
            "wal": {"root_path": str(tmp_path / "wal")},
            "schema": {"max_entries": 7},
        }
    )
    async with open_service(settings) as service, httpx.AsyncClient() as client:
        response = await client.get(service.binds[0] + "/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    served: dict[str, Any] = response.json()
    assert served == msgspec.json.decode(msgspec.json.encode(openapi_document(settings)))
    entries = served["components"]["schemas"]["IngestRequest"]["properties"]["entries"]
    assert entries["maxItems"] == 7
