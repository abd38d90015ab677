"""Tenants over HTTP: plans, tokens (expiry, revocation, hot reload), X-RateLimit headers,
429s in both dialects, the fair queue, the usage ledger route, and no secrets in logs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import yaml
from starlette.types import ASGIApp

from serve.cluster import build_gateway
from serve.gateway.tenants import hash_token
from serve.settings import Settings, cpu_catalog
from serve.tenants_cli import add_token, revoke_tokens
from tests.fakes import FakeEngine, until_running

MODEL = "@cf/qwen/qwen1.5-1.8b-chat"
TOKEN_A = "tok-tenant-a-secret-0001"
TOKEN_B = "tok-tenant-b-secret-0002"
TOKEN_OLD = "tok-tenant-a-expired-003"


def run_url(account: str) -> str:
    return f"/client/v4/accounts/{account}/ai/run/{MODEL}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def write_tenants(path: Path, **plan_a: object) -> None:
    past = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    doc = {
        "plans": {
            "small": {"requests_per_minute": 3, "tokens_per_minute": 100_000, **plan_a},
            "big": {"weight": 1},
            "other-model": {"allowed_models": ["@cf/meta/other"]},
        },
        "tenants": [
            {
                "id": "a",
                "plan": "small",
                "accounts": ["acct-a"],
                "tokens": [
                    {"sha256": hash_token(TOKEN_A), "label": "main"},
                    {"sha256": hash_token(TOKEN_OLD), "label": "old", "expires_at": past},
                ],
            },
            {
                "id": "b",
                "plan": "big",
                "accounts": ["acct-b"],
                "tokens": [{"sha256": hash_token(TOKEN_B), "label": "main"}],
            },
        ],
    }
    path.write_text(yaml.safe_dump(doc))


@pytest.fixture
def tenants_file(tmp_path: Path) -> Path:
    path = tmp_path / "tenants.yaml"
    write_tenants(path)
    return path


def tenancy_settings(tmp_path: Path, tenants_file: Path, **extra: object) -> Settings:
    return Settings.model_validate(
        {
            "models": [m.model_dump() for m in cpu_catalog("/nonexistent")],
            "cache_dir": str(tmp_path / "cache"),
            "tenants_file": str(tenants_file),
            "tenants_reload_s": 0,
            "max_inflight_per_replica": 2,
            **extra,
        }
    )


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine(reply="one two three four five six")


@pytest.fixture
async def client(
    tmp_path: Path, tenants_file: Path, engine: FakeEngine
) -> AsyncIterator[httpx.AsyncClient]:
    app = build_gateway(tenancy_settings(tmp_path, tenants_file), engine)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as c:
        yield c


async def test_rate_headers_and_429_with_accurate_retry_after(client: httpx.AsyncClient) -> None:
    body = {"prompt": "hi", "max_tokens": 4}
    for remaining in (2, 1, 0):
        r = await client.post(run_url("acct-a"), headers=bearer(TOKEN_A), json=body)
        assert r.status_code == 200, r.text
        assert r.headers["x-ratelimit-limit"] == "3"
        assert r.headers["x-ratelimit-remaining"] == str(remaining)
        assert r.headers["x-ratelimit-limit-tokens"] == "100000"
        assert 0 <= int(r.headers["x-ratelimit-reset"]) <= 60
    r = await client.post(run_url("acct-a"), headers=bearer(TOKEN_A), json=body)
    assert r.status_code == 429
    assert r.json()["errors"][0]["code"] == 3040
    left = 60 - time.time() % 60
    assert abs(int(r.headers["retry-after"]) - left) <= 1.5
    assert r.headers["x-ratelimit-remaining"] == "0"
    # Tenant b has its own counters (and no request limit: no request headers).
    r = await client.post(run_url("acct-b"), headers=bearer(TOKEN_B), json=body)
    assert r.status_code == 200
    assert "x-ratelimit-limit" not in r.headers


async def test_openai_rate_limit_shape(client: httpx.AsyncClient) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for _ in range(3):
        r = await client.post("/v1/chat/completions", headers=bearer(TOKEN_A), json=body)
        assert r.status_code == 200
        assert "x-ratelimit-remaining" in r.headers
    r = await client.post("/v1/chat/completions", headers=bearer(TOKEN_A), json=body)
    assert r.status_code == 429
    err = r.json()["error"]
    assert err["type"] == "rate_limit_error" and err["code"] == "rate_limit_exceeded"
    assert int(r.headers["retry-after"]) >= 1


async def test_auth_expiry_and_plan_models(client: httpx.AsyncClient) -> None:
    body = {"prompt": "hi", "max_tokens": 2}
    r = await client.post(run_url("acct-a"), json=body)
    assert (r.status_code, r.json()["errors"][0]["code"]) == (400, 9106)
    r = await client.post(run_url("acct-a"), headers=bearer(TOKEN_OLD), json=body)
    assert (r.status_code, r.json()["errors"][0]["code"]) == (401, 10000)
    r = await client.post(run_url("acct-b"), headers=bearer(TOKEN_A), json=body)
    assert (r.status_code, r.json()["errors"][0]["code"]) == (403, 10000)
    r = await client.post(
        "/v1/chat/completions",
        headers=bearer(TOKEN_OLD),
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def narrow_plan_gateway(tmp_path: Path, engine: FakeEngine) -> tuple[ASGIApp, str]:
    """A gateway whose one tenant (`c`, account `acct-c`) has a plan without the served
    model; its token."""
    path = tmp_path / "t.yaml"
    token = add_token(path, tenant_id="c", accounts=["acct-c"])
    doc = yaml.safe_load(path.read_text())
    doc["plans"] = {"narrow": {"allowed_models": ["@cf/meta/other"]}}
    doc["tenants"][0]["plan"] = "narrow"
    path.write_text(yaml.safe_dump(doc))
    return build_gateway(tenancy_settings(tmp_path, path), engine), token


async def test_model_outside_plan_is_403(tmp_path: Path, engine: FakeEngine) -> None:
    app, token = narrow_plan_gateway(tmp_path, engine)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.post(run_url("acct-c"), headers=bearer(token), json={"prompt": "hi"})
        assert r.status_code == 403 and "plan" in r.json()["errors"][0]["message"]
        for prefix in ("/v1", "/client/v4/accounts/acct-c/ai/v1"):
            # The listing holds only the plan's models; asking for another is the same 403.
            for listing in (f"{prefix}/models", f"{prefix}/models/"):
                r = await c.get(listing, headers=bearer(token))
                assert r.status_code == 200 and r.json() == {"object": "list", "data": []}
            r = await c.get(f"{prefix}/models/{MODEL}", headers=bearer(token))
            assert r.status_code == 403, r.text
            error = r.json()["error"]
            assert error["type"] == "permission_error" and "plan" in error["message"]


async def test_cli_tokens_revocation_and_hot_reload(tmp_path: Path, engine: FakeEngine) -> None:
    path = tmp_path / "tenants.yaml"
    token = add_token(path, tenant_id="d", accounts=["acct-d"], label="ci")
    assert token not in path.read_text() and hash_token(token) in path.read_text()
    app = build_gateway(tenancy_settings(tmp_path, path), engine)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        body = {"prompt": "hi", "max_tokens": 2}
        assert (await c.post(run_url("acct-d"), headers=bearer(token), json=body)).is_success
        # A token added after start works without a restart...
        second = add_token(path, tenant_id="d", accounts=[], label="laptop")
        r = await c.post(run_url("acct-d"), headers=bearer(second), json=body)
        assert r.status_code == 200
        # ...and a revoked one stops working without a restart.
        assert revoke_tokens(path, tenant_id="d", label="ci") == 1
        r = await c.post(run_url("acct-d"), headers=bearer(token), json=body)
        assert r.status_code == 401
        assert (await c.post(run_url("acct-d"), headers=bearer(second), json=body)).is_success
        # A broken edit is ignored: the last good file stays in force.
        path.write_text("tenants: [ {id: broken")
        assert (await c.post(run_url("acct-d"), headers=bearer(second), json=body)).is_success


async def test_usage_route_counts_each_request_once_per_account(
    client: httpx.AsyncClient,
) -> None:
    since = time.time() - 1
    body = {"prompt": "hi", "max_tokens": 3}
    for _ in range(2):
        assert (await client.post(run_url("acct-a"), headers=bearer(TOKEN_A), json=body)).is_success
    async with client.stream(
        "POST", run_url("acct-a"), headers=bearer(TOKEN_A), json={**body, "stream": True}
    ) as r:
        assert r.status_code == 200
        [line async for line in r.aiter_lines()]
    assert (await client.post(run_url("acct-b"), headers=bearer(TOKEN_B), json=body)).is_success
    r = await client.get(
        "/client/v4/accounts/acct-a/ai/usage",
        headers=bearer(TOKEN_A),
        params={"since": str(since), "until": datetime.now(UTC).isoformat()},
    )
    assert r.status_code == 200, r.text
    models = r.json()["result"]["models"]
    assert len(models) == 1 and models[0]["model"] == MODEL
    assert models[0]["requests"] == 3
    assert models[0]["completion_tokens"] == 9
    assert models[0]["total_tokens"] == models[0]["prompt_tokens"] + 9
    # Another tenant's account is not readable, and an empty window is empty.
    r = await client.get("/client/v4/accounts/acct-b/ai/usage", headers=bearer(TOKEN_A))
    assert r.status_code == 403
    r = await client.get(
        "/client/v4/accounts/acct-a/ai/usage",
        headers=bearer(TOKEN_A),
        params={"since": "2001-01-01T00:00:00Z", "until": "2001-01-02"},
    )
    assert r.json()["result"]["models"] == []
    for bad in ({"since": "x"}, {"until": "1e300"}, {"since": "-1e20"}, {"until": "nan"}):
        r = await client.get(
            "/client/v4/accounts/acct-a/ai/usage", headers=bearer(TOKEN_A), params=bad
        )
        assert r.status_code == 400, (bad, r.text)
        (name,) = bad
        assert r.json()["errors"][0]["code"] == 5006 and name in r.json()["errors"][0]["message"]


async def test_fair_queue_over_http(tmp_path: Path, tenants_file: Path) -> None:
    """2 slots, A floods with 16 requests, then B sends 2: B is not served last."""
    write_tenants(tenants_file, requests_per_minute=1000)
    engine = FakeEngine(reply="one two three", delay_s=0.02)
    settings = tenancy_settings(tmp_path, tenants_file, queue_max_per_tenant=32)
    app = build_gateway(settings, engine)
    body = {"prompt": "hi", "max_tokens": 3}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        flood = [
            asyncio.create_task(c.post(run_url("acct-a"), headers=bearer(TOKEN_A), json=body))
            for _ in range(16)
        ]
        await asyncio.sleep(0.05)
        b = [
            asyncio.create_task(c.post(run_url("acct-b"), headers=bearer(TOKEN_B), json=body))
            for _ in range(2)
        ]
        b_done = await asyncio.gather(*b)
        a_pending = sum(not t.done() for t in flood)
        assert all(r.status_code == 200 for r in b_done)
        assert a_pending >= 8, "B waited behind A's whole flood"
        assert all(r.status_code == 200 for r in await asyncio.gather(*flood))


async def test_queue_full_is_429_with_retry_after(tmp_path: Path, tenants_file: Path) -> None:
    write_tenants(tenants_file, requests_per_minute=1000)
    engine = FakeEngine(reply="one two three", delay_s=0.05)
    settings = tenancy_settings(tmp_path, tenants_file, queue_max_per_tenant=1)
    app = build_gateway(settings, engine)
    body = {"prompt": "hi", "max_tokens": 3}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        results = await asyncio.gather(
            *[c.post(run_url("acct-a"), headers=bearer(TOKEN_A), json=body) for _ in range(6)]
        )
    statuses = sorted(r.status_code for r in results)
    assert statuses == [200, 200, 200, 429, 429, 429]
    refused = next(r for r in results if r.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1
    assert "queued" in refused.json()["errors"][0]["message"]


async def test_max_concurrent_streams_counts_non_streaming_requests_too(
    tmp_path: Path, tenants_file: Path
) -> None:
    """The plan key keeps its name, but it caps every request in flight (README): with one
    stream open and a limit of 1, a non-streaming request is refused."""
    write_tenants(tenants_file, max_concurrent_streams=1)
    engine = FakeEngine(reply="one two three", stall_after=1)  # the stream stays open
    app = build_gateway(tenancy_settings(tmp_path, tenants_file), engine)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        stream = asyncio.create_task(
            c.post(run_url("acct-a"), headers=bearer(TOKEN_A), json={"prompt": "a", "stream": True})
        )
        try:
            await until_running(engine)
            r = await c.post(run_url("acct-a"), headers=bearer(TOKEN_A), json={"prompt": "b"})
            assert r.status_code == 429, r.text
            message = r.json()["errors"][0]["message"]
            assert message == "Rate limited: too many concurrent requests for this plan"
        finally:
            stream.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stream


async def test_tokens_never_logged(
    tmp_path: Path, tenants_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    engine = FakeEngine(reply="fine", fail_after=0)
    settings = tenancy_settings(tmp_path, tenants_file, access_log=True)
    app = build_gateway(settings, engine)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        for token in (TOKEN_A, TOKEN_OLD, "tok-never-valid-0004"):
            await c.post(run_url("acct-a"), headers=bearer(token), json={"prompt": "hi"})
            await c.post(
                "/v1/chat/completions",
                headers=bearer(token),
                json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
            )
        # A failed reload is logged too.
        await asyncio.to_thread(tenants_file.write_text, "tenants: [ {id: broken")
        await c.post(run_url("acct-a"), headers=bearer(TOKEN_A), json={"prompt": "hi"})
    text = "\n".join(r.getMessage() + str(r.args) + str(r.exc_info) for r in caplog.records)
    assert caplog.records, "nothing was logged: the scan would prove nothing"
    for secret in (TOKEN_A, TOKEN_OLD, "tok-never-valid-0004", TOKEN_B):
        assert secret not in text
