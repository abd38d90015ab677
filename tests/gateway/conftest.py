from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI
from starlette.types import Message, Send

from serve.cluster import build_gateway
from serve.gateway.tenants import hash_token
from serve.settings import DevTenant, Settings, cpu_catalog
from tests.fakes import FakeEngine

TOKEN = "test-token-123"
ACCOUNT = "acct-1"
MODEL = "@cf/qwen/qwen1.5-1.8b-chat"
RUN_URL = f"/client/v4/accounts/{ACCOUNT}/ai/run/{MODEL}"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# The OpenAI dialect's two prefixes: any account of the token, and the account-scoped one.
PREFIXES = ["/v1", f"/client/v4/accounts/{ACCOUNT}/ai/v1"]


async def asgi_post(
    app: Any, path: str, body: dict[str, Any], send: Send, *, gone: asyncio.Event, spec: str
) -> None:
    """POST `body` to `path` of `app` as tenant t1, straight over ASGI `spec` (2.3: what
    uvicorn and Serve's replicas speak); `receive` reports the client gone once `gone` is
    set."""
    raw = json.dumps(body).encode()
    received = 0

    async def receive() -> Message:
        nonlocal received
        received += 1
        if received == 1:
            return {"type": "http.request", "body": raw, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": spec},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"authorization", f"Bearer {TOKEN}".encode())],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 80),
    }
    await app(scope, receive, send)


def gateway_settings(**overrides: object) -> Settings:
    """Settings of the gateway tier: the fake model, the dev tenant t1, a cap of 8."""
    return Settings.model_validate(
        {
            "models": [m.model_dump() for m in cpu_catalog("/nonexistent")],
            "dev_tenant": DevTenant(
                tenant_id="t1", account_id=ACCOUNT, token_sha256=hash_token(TOKEN)
            ).model_dump(),
            "non_stream_max_tokens": 8,
            **overrides,
        }
    )


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return gateway_settings(
        cache_dir=str(tmp_path / "cache"),
        # Beyond the 4 in-flight slots, a request gets 429 at once (no gateway queue).
        queue_max_per_tenant=0,
        max_inflight_per_replica=4,
    )


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(reply="one two three four five six seven eight nine ten eleven twelve")


@pytest.fixture
async def client(settings: Settings, engine: FakeEngine) -> AsyncIterator[httpx.AsyncClient]:
    app = build_gateway(settings, engine)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
        yield c


@pytest.fixture
def app(settings: Settings, engine: FakeEngine) -> FastAPI:
    return build_gateway(settings, engine)


@pytest.fixture(params=PREFIXES, ids=["v1", "account"])
async def sdk(request: pytest.FixtureRequest, app: FastAPI) -> AsyncIterator[openai.AsyncOpenAI]:
    """The official `openai` SDK on the app, under each prefix."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        yield openai.AsyncOpenAI(
            base_url=f"http://test{request.param}",
            api_key=TOKEN,
            http_client=http,  # type: ignore[arg-type]
            max_retries=0,
        )
