"""Schema-driven fuzzing of the real server over HTTP (schemathesis, from ``/openapi.json``).

The document the running server publishes drives the generation: valid requests
(``positive``) and requests breaking the schema in one place (``negative``), for the ingest
endpoint above all and for every other operation. For each answer:

* never a 5xx, never a crash (the process is alive and ready to serve afterwards);
* the status code, content type, headers and body are the documented ones;
* a request breaking the schema is never accepted (``negative_data_rejection``).

Deterministic for CI (``derandomize``, no example database) and bounded in time; the number
of cases run is printed (``pytest -s``) and must reach a floor.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from logstack.testing._process import (
    TEST_ADMIN_TOKEN,
    TEST_TOKEN,
    LogstackProcess,
    LokiReceiverProcess,
    make_test_config,
)

INGEST_EXAMPLES = {GenerationMode.POSITIVE: 400, GenerationMode.NEGATIVE: 400}
OTHER_EXAMPLES = 30
MIN_CASES = 950
LENIENT = {("GET", "/v1/admin/dlq")}
"""Operations known to accept some inputs their schema excludes: ``GET /v1/admin/dlq`` reads
an empty ``limit=``/``offset=`` as the default and the first of repeated ones
(``logstack._admin_dlq``); only ``negative_data_rejection`` is skipped for them."""
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LogstackProcess]:
    workdir: Path = tmp_path_factory.mktemp("fuzz")
    loki = LokiReceiverProcess(workdir / "loki")
    loki.start()
    server = LogstackProcess(
        workdir,
        make_test_config(
            workdir,
            loki.url,
            security={"rate_limit_rps": 100_000, "rate_limit_burst": 100_000},
        ),
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()
        loki.stop()


def run_operation(
    schema: Any,
    path: str,
    method: str,
    mode: GenerationMode,
    examples: int,
    token: str,
    session: requests.Session,
    base_url: str,
    seen: Counter[str],
) -> None:
    operation = schema[path][method]
    strategy = operation.as_strategy(
        generation_mode=mode, headers={"Authorization": f"Bearer {token}"}
    )
    strict = mode is GenerationMode.NEGATIVE and (method, path) not in LENIENT
    checks = [*CHECKS, negative_data_rejection] if strict else CHECKS

    @settings(
        max_examples=examples,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def fuzz(case: Any) -> None:
        response = case.call(base_url=base_url, session=session, timeout=30)
        seen[f"{method} {path} {mode.value} {response.status_code}"] += 1
        case.validate_response(response, checks=checks, transport_kwargs={"base_url": base_url})

    fuzz()


def test_fuzz_from_the_published_schema_never_5xx(fuzz_server: LogstackProcess) -> None:
    base_url = fuzz_server.url
    schema = schemathesis.openapi.from_url(base_url + "/openapi.json")
    seen: Counter[str] = Counter()
    started = time.monotonic()
    with requests.Session() as session:
        for mode, examples in INGEST_EXAMPLES.items():
            run_operation(
                schema, "/v1/logs:ingest", "POST", mode, examples, TEST_TOKEN, session,
                base_url, seen,
            )  # fmt: skip
        for path, methods in schema.raw_schema["paths"].items():
            for method in methods:
                if path == "/v1/logs:ingest":
                    continue
                token = TEST_ADMIN_TOKEN if path.startswith("/v1/admin/") else TEST_TOKEN
                takes_input = "parameters" in methods[method] or "requestBody" in methods[method]
                modes = list(GenerationMode) if takes_input else [GenerationMode.POSITIVE]
                for mode in modes:
                    run_operation(
                        schema, path, method.upper(), mode, OTHER_EXAMPLES, token, session,
                        base_url, seen,
                    )  # fmt: skip
        elapsed = time.monotonic() - started
        total = sum(seen.values())
        ingest = {k: v for k, v in seen.items() if "/v1/logs:ingest" in k}
        print(f"\nfuzz: {total} cases in {elapsed:.1f}s")
        for key, count in sorted(seen.items()):
            print(f"  {key}: {count}")
        assert total >= MIN_CASES, seen
        assert not any(key.rsplit(" ", 1)[1].startswith("5") for key in seen), seen
        # Both kinds of answers were exercised: accepted batches and refusals.
        assert seen["POST /v1/logs:ingest positive 202"] >= 40, ingest
        assert any(k.endswith(" 400") and "negative" in k for k in ingest), ingest
        # Still alive and serving.
        assert fuzz_server.running
        assert session.get(base_url + "/healthz", timeout=5).status_code == 200
    assert "Traceback" not in fuzz_server.log_text()
