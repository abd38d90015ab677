"""Property tests over HTTP: whatever INPUT_SCHEMA accepts the route serves, whatever it
rejects is 400/5006 (bodies generated from the schema itself and around it)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings

from serve.cluster import build_gateway
from serve.gateway.context import GatewayContext
from serve.protocol.workers_ai import parse_run_input
from tests.fakes import FakeEngine
from tests.gateway.conftest import AUTH, RUN_URL, gateway_settings
from tests.schema_strategies import NEAR_BODIES, ORACLE, schema_bodies

CONTEXT_WINDOW = 4096


@pytest.fixture(scope="module")
def http() -> Iterator[TestClient]:
    """One app for all examples (hypothesis forbids function-scoped fixtures)."""
    config = gateway_settings()
    engine = FakeEngine(reply="a b c d e", context_window=CONTEXT_WINDOW)
    with TestClient(build_gateway(config, engine), raise_server_exceptions=False) as client:
        yield client


def expected_outcome(body: dict[str, Any]) -> tuple[int, int | None]:
    """(status, Workers AI error code) for a body the schema accepts."""
    run = parse_run_input(body)
    if run.lora is not None:
        return 405, 5005
    engine = FakeEngine()
    if run.messages is not None:
        prompt_tokens = len(asyncio.run(engine.encode_chat(run.messages)))
    elif run.raw:
        prompt_tokens = len(asyncio.run(engine.encode_raw(run.prompt or "")))
    else:
        turn = GatewayContext.user_turn(run.prompt or "")
        prompt_tokens = len(asyncio.run(engine.encode_chat(turn)))
    asked = 256 if run.max_tokens is None else run.max_tokens
    if not run.stream:
        asked = min(asked, 8)
    if prompt_tokens + asked > CONTEXT_WINDOW:
        return 413, 5021
    return 200, None


def check(http: TestClient, body: Any) -> None:
    r = http.post(RUN_URL, headers=AUTH, content=json.dumps(body).encode())
    if ORACLE.is_valid(body):
        status, code = expected_outcome(body)
        event(f"accepted: HTTP {status}")
        assert r.status_code == status, (body, r.text)
        if code is not None:
            assert r.json()["errors"][0]["code"] == code
        elif body.get("stream") is True:
            assert r.headers["content-type"] == "text/event-stream"
            assert r.text.endswith("data: [DONE]\n\n")
        else:
            assert r.json()["success"] is True
    else:
        event("rejected")
        assert r.status_code == 400, (body, r.text)
        assert r.headers["content-type"] == "application/json"
        error = r.json()["errors"][0]
        assert error["code"] == 5006
        assert error["message"].startswith("AiError: Bad input: ")


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(schema_bodies())
def test_schema_generated_bodies_are_served(http: TestClient, body: dict[str, Any]) -> None:
    assert ORACLE.is_valid(body)
    check(http, body)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(NEAR_BODIES)
def test_bodies_the_schema_rejects_get_5006(http: TestClient, body: Any) -> None:
    check(http, body)
