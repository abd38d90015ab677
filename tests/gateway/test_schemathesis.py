"""Schemathesis against the gateway's own `/openapi.json` (in-process ASGI app, fake
engine), every documented operation of both dialects.

Cases are drawn from the documented request schemas: valid bodies (positive), bodies
that break the schema (negative), and path parameters left to the generator (other
accounts and model names). Every response must: not be a 5xx, have a documented
content type, conform to the schema documented for its status (`default` is the
dialect's error envelope), and be exactly an envelope of its dialect (Workers AI
`{result, success, errors, messages}`, OpenAI `{"error": {message, type, param, code}}`
or a completion object); streams are SSE ending in `[DONE]`.

The larger recorded run (RELIABILITY.md): `python -m tests.gateway.test_schemathesis 10000`.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openapi_spec_validator import validate as validate_openapi
from schemathesis import Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.schemas import APIOperation, BaseSchema
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
)

from serve.cluster import build_gateway
from serve.gateway.error_wire import Dialect, dialect_of
from tests.fakes import FakeEngine
from tests.gateway.conftest import ACCOUNT, AUTH, MODEL, gateway_settings

OPERATIONS = (
    "POST /client/v4/accounts/{account_id}/ai/run/{model}",
    "GET /client/v4/accounts/{account_id}/ai/models/schema",
    "GET /client/v4/accounts/{account_id}/ai/usage",
    "GET /client/v4/accounts/{account_id}/ai/models/search",
    "GET /client/v4/accounts/{account_id}/ai/tasks/search",
    "GET /client/v4/accounts/{account_id}/ai/authors/search",
    "GET /v1/models",
    "GET /v1/models/{model}",
    "GET /client/v4/accounts/{account_id}/ai/v1/models",
    "GET /client/v4/accounts/{account_id}/ai/v1/models/{model}",
    "POST /v1/chat/completions",
    "POST /v1/completions",
    "POST /client/v4/accounts/{account_id}/ai/v1/chat/completions",
    "POST /client/v4/accounts/{account_id}/ai/v1/completions",
)
# Cases per operation in CI (14 operations: a few hundred cases, some seconds).
CI_EXAMPLES = 40
Operation = APIOperation[Any, Any, Any, Any]
AnyCase = Case[Any]
CHECKS = [not_a_server_error, content_type_conformance, response_schema_conformance]


def gateway_schema(cache_dir: Path) -> BaseSchema:
    settings = gateway_settings(cache_dir=str(cache_dir), max_inflight_per_replica=16)
    app = build_gateway(settings, FakeEngine(reply="one two three four five six"))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> BaseSchema:
    return gateway_schema(tmp_path_factory.mktemp("schemathesis"))


def operation_of(schema: BaseSchema, label: str) -> Operation:
    method, path = label.split(" ", 1)
    operation: Operation = schema[path][method]
    return operation


def cases(operation: Operation) -> st.SearchStrategy[AnyCase]:
    """Positive and negative cases for the real account and model, and positive cases
    with generated path parameters (someone else's account, unknown models)."""
    real = {
        name: value
        for name, value in (("account_id", ACCOUNT), ("model", MODEL))
        if "{" + name + "}" in operation.path
    }
    # The schema route names its model in the query (`?model=`).
    query = {"model": MODEL} if operation.path.endswith("/models/schema") else None
    return st.one_of(
        operation.as_strategy(GenerationMode.POSITIVE, path_parameters=real, query=query),
        operation.as_strategy(GenerationMode.NEGATIVE, path_parameters=real),
        operation.as_strategy(GenerationMode.POSITIVE),
    )


def check_sse(text: str, dialect: Dialect) -> None:
    frames = [f for f in text.split("\n\n") if f.strip()]
    assert frames and frames[-1] == "data: [DONE]", text[-300:]
    for frame in frames[:-1]:
        assert frame.startswith("data: "), frame
        event = json.loads(frame.removeprefix("data: "))
        if dialect is Dialect.WORKERS_AI:
            assert isinstance(event["response"], str)
        else:
            assert "error" in event or event["object"] in (
                "chat.completion.chunk",
                "text_completion",
            )


def check_envelope(status: int, body: Any, dialect: Dialect) -> None:
    """The exact shape of the dialect's envelope (beyond what the schema allows)."""
    if dialect is Dialect.WORKERS_AI:
        # A paged listing (the model search) adds `result_info` to its success envelope.
        extra = {"result_info"} if status == 200 else set()
        assert isinstance(body, dict)
        assert set(body) - extra == {"result", "success", "errors", "messages"}
        assert body["success"] is (status == 200)
        if status != 200:
            assert body["result"] in (None, {})
            assert body["errors"] and all(
                set(e) == {"code", "message"} and isinstance(e["code"], int) for e in body["errors"]
            )
        return
    if status == 200:
        assert isinstance(body, dict) and body.get("object") in (
            "chat.completion",
            "text_completion",
            "list",
            "model",
        )
        return
    assert isinstance(body, dict) and set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}


def exercise(case: AnyCase) -> int:
    """Send one case, run every check; return its status."""
    response = case.call(headers=AUTH)
    case.validate_response(response, checks=CHECKS)
    dialect = dialect_of(case.formatted_path)
    media = (response.headers.get("content-type") or [""])[0]
    if media.startswith("text/event-stream"):
        assert response.status_code == 200
        check_sse(response.content.decode("utf-8"), dialect)
    else:
        assert media.startswith("application/json"), media
        check_envelope(response.status_code, json.loads(response.content), dialect)
    return response.status_code


def test_openapi_document_is_valid_and_complete(api: BaseSchema) -> None:
    document = api.raw_schema
    validate_openapi(document)  # OpenAPI 3.1 meta-schema and references
    labels = {f"{m.upper()} {p}" for p, item in document["paths"].items() for m in item}
    assert labels == set(OPERATIONS)
    run = document["paths"][OPERATIONS[0].split(" ")[1]]["post"]
    body = run["requestBody"]["content"]["application/json"]["schema"]
    assert [branch["title"] for branch in body["oneOf"]] == ["Prompt", "Messages"]
    chat = document["paths"]["/v1/chat/completions"]["post"]["requestBody"]
    assert "messages" in chat["content"]["application/json"]["schema"]["required"]
    # FastAPI's own 422 `{"detail": ...}` is never documented: errors are the dialect's.
    assert all(
        "422" not in item[m]["responses"] for item in document["paths"].values() for m in item
    )


def fuzz(schema: BaseSchema, label: str, examples: int) -> Counter[int]:
    """`examples` cases of one operation, every check on each; their statuses."""
    statuses: Counter[int] = Counter()

    @settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=list(HealthCheck),
        database=None,
    )
    @given(case=cases(operation_of(schema, label)))
    def run(case: AnyCase) -> None:
        statuses[exercise(case)] += 1

    run()
    return statuses


@pytest.mark.parametrize("label", OPERATIONS)
def test_fuzz_operation(api: BaseSchema, label: str) -> None:
    statuses = fuzz(api, label, CI_EXAMPLES)
    assert sum(statuses.values()) > 0
    assert not any(status >= 500 for status in statuses)


def test_missing_schema_model_is_a_400_envelope(api: BaseSchema) -> None:
    """Found by this fuzzing: without `?model=`, FastAPI answered 422 `{"detail": [...]}`
    (not an envelope, and before authentication)."""
    case = operation_of(api, OPERATIONS[1]).Case(path_parameters={"account_id": ACCOUNT})
    response = case.call(headers=AUTH)
    assert response.status_code == 400
    body = json.loads(response.content)
    assert body["success"] is False and body["errors"][0]["code"] == 5006
    assert "model" in body["errors"][0]["message"]


def recorded_run(total: int, cache_dir: Path) -> Iterator[tuple[str, Counter[int]]]:
    """The larger run behind RELIABILITY.md: `total` cases spread over the operations."""
    schema = gateway_schema(cache_dir)
    per_operation = max(1, -(-total // len(OPERATIONS)))  # at least `total` in all
    for label in OPERATIONS:
        yield label, fuzz(schema, label, per_operation)


if __name__ == "__main__":  # python -m tests.gateway.test_schemathesis 10000
    import sys
    import tempfile

    wanted = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    grand: Counter[int] = Counter()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        for label, counts in recorded_run(wanted, Path(tmp)):
            grand.update(counts)
            print(f"{label}: {sum(counts.values())} cases {dict(sorted(counts.items()))}")
    server_errors = sum(n for status, n in grand.items() if status >= 500)
    print(
        f"cases: {sum(grand.values())}, statuses: {dict(sorted(grand.items()))}, "
        f"5xx: {server_errors}, wall time: {time.monotonic() - started:.0f} s"
    )
