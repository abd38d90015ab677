from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest
from fastapi import FastAPI

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
