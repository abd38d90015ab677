"""X-RateLimit-* headers on every authenticated response, also on those that never reached
admission (a 400, the model listing, the schema and usage routes): the tenant's current
counters, read with `RateLimiter.peek`, which never counts. In memory, and on a real Redis
(redis-server started here) shared by two gateways."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import redis

from serve.cluster import build_gateway
from serve.gateway.ratelimit import InMemoryRateLimiter, window_of
from serve.gateway.redis_ratelimit import RedisRateLimiter, redis_client
from serve.gateway.tenants import Plan, Tenant
from tests.fakes import FakeEngine, until_running
from tests.gateway.test_redis_tenancy import AUTH as REDIS_AUTH
from tests.gateway.test_redis_tenancy import URL as REDIS_RUN_URL
from tests.gateway.test_redis_tenancy import RedisServer, make_app
from tests.gateway.test_redis_tenancy import redis_server as redis_server  # a fixture
from tests.gateway.test_tenancy import MODEL, TOKEN_A, TOKEN_B, bearer, run_url, tenancy_settings
from tests.gateway.test_tenancy import tenants_file as tenants_file  # a fixture

A = bearer(TOKEN_A)
SCHEMA_URL = f"/client/v4/accounts/acct-a/ai/models/schema?model={MODEL}"
# Responses of tenant a that never reach admission: (method, url, JSON body or raw bytes).
NOT_ADMITTED: tuple[tuple[str, str, Any], ...] = (
    ("POST", run_url("acct-a"), {"prompt": ""}),  # 400/5006
    ("POST", run_url("acct-a"), b"{not json"),  # 400/5006
    ("POST", run_url("acct-a").replace(MODEL, "@cf/no/such-model"), {"prompt": "hi"}),  # 5007
    ("POST", "/v1/chat/completions", {"model": MODEL}),  # 400, no messages
    ("GET", "/v1/models", None),
    ("GET", f"/v1/models/{MODEL}", None),
    ("GET", SCHEMA_URL, None),
    ("GET", "/client/v4/accounts/acct-a/ai/models/schema", None),  # 400, no ?model=
    ("GET", "/client/v4/accounts/acct-a/ai/usage", None),
)
RATE_HEADERS = (
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
)


async def away_from_window_edge() -> None:
    """Counters live in fixed minutes: start a sequence with a few seconds of the minute left."""
    left = 60 - time.time() % 60
    if left < 5:
        await asyncio.sleep(left + 0.1)


async def send(client: httpx.AsyncClient, method: str, url: str, body: Any, **kw: Any) -> Any:
    if isinstance(body, bytes):
        return await client.request(method, url, content=body, **kw)
    return await client.request(method, url, json=body, **kw)


def counters(r: httpx.Response) -> tuple[str, str]:
    return r.headers["x-ratelimit-remaining"], r.headers["x-ratelimit-remaining-tokens"]


@pytest.fixture
async def client(tmp_path: Path, tenants_file: Path) -> AsyncIterator[httpx.AsyncClient]:
    app = build_gateway(tenancy_settings(tmp_path, tenants_file), FakeEngine(reply="a b c d"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        yield c


async def test_responses_before_admission_carry_the_current_counters(
    client: httpx.AsyncClient,
) -> None:
    await away_from_window_edge()
    ok = {"prompt": "hi", "max_tokens": 2}
    r = await client.post(run_url("acct-a"), headers=A, json=ok)
    assert r.status_code == 200 and r.headers["x-ratelimit-remaining"] == "2"
    seen = set()
    for method, url, body in NOT_ADMITTED:
        r = await send(client, method, url, body, headers=A)
        assert r.status_code in (200, 400), (url, r.text)
        assert r.headers["x-ratelimit-limit"] == "3", url
        assert r.headers["x-ratelimit-limit-tokens"] == "100000", url
        assert 0 <= int(r.headers["x-ratelimit-reset"]) <= 60
        assert r.headers["x-ratelimit-reset-tokens"] == r.headers["x-ratelimit-reset"]
        seen.add(counters(r))
    # One request counted, its real tokens settled; none of the others counted anything.
    ((requests_left, tokens_left),) = seen
    assert requests_left == "2" and 0 < 100_000 - int(tokens_left) < 100
    r = await client.post(run_url("acct-a"), headers=A, json=ok)
    assert r.headers["x-ratelimit-remaining"] == "1"
    r = await client.post(run_url("acct-a"), headers=A, json=ok)
    assert r.status_code == 200 and r.headers["x-ratelimit-remaining"] == "0"
    # Out of requests: the listing says so too (and is still served).
    r = await client.get("/v1/models", headers=A)
    assert r.status_code == 200 and r.headers["x-ratelimit-remaining"] == "0"
    assert (await client.post(run_url("acct-a"), headers=A, json=ok)).status_code == 429


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-token"}, {"Authorization": f"Basic {TOKEN_A}"}],
    ids=["none", "wrong", "basic"],
)
async def test_unauthenticated_responses_carry_no_counters(
    client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    for method, url, body in NOT_ADMITTED:
        r = await send(client, method, url, body, headers=headers)
        assert r.status_code in (400, 401), (url, r.status_code)
        assert not any(h in r.headers for h in RATE_HEADERS), url


async def test_another_accounts_path_and_unlimited_plans_carry_no_counters(
    client: httpx.AsyncClient,
) -> None:
    r = await client.get(SCHEMA_URL.replace("acct-a", "acct-b"), headers=A)
    assert r.status_code == 403
    assert "x-ratelimit-limit" not in r.headers
    # Tenant b's plan has no request or token limit: nothing to report.
    r = await client.get("/v1/models", headers=bearer(TOKEN_B))
    assert r.status_code == 200
    assert not any(h in r.headers for h in RATE_HEADERS)


async def test_in_memory_peek_counts_nothing() -> None:
    limiter = InMemoryRateLimiter(clock=lambda: 120.0)
    tenant = Tenant("t", frozenset({"acct"}), Plan(requests_per_minute=5, tokens_per_minute=50))
    first = await limiter.peek(tenant)
    assert (first.requests_remaining, first.tokens_remaining) == (5, 50)
    await limiter.admit(tenant, "r1", 10)
    for _ in range(20):
        state = await limiter.peek(tenant)
        assert (state.requests_remaining, state.tokens_remaining) == (4, 40)
    await limiter.admit(tenant, "r2", 10)
    state = await limiter.peek(tenant)
    assert (state.requests_remaining, state.tokens_remaining) == (3, 30)


# -- Redis ----------------------------------------------------------------------------------


async def test_redis_peek_reads_what_every_gateway_counted(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    await away_from_window_edge()
    g1 = make_app(tmp_path, redis_server, "g1", requests_per_minute=5, tokens_per_minute=10_000)
    g2 = make_app(tmp_path, redis_server, "g2", requests_per_minute=5, tokens_per_minute=10_000)
    store = redis.Redis(port=redis_server.port)
    t1, t2 = httpx.ASGITransport(app=g1), httpx.ASGITransport(app=g2)
    async with (
        httpx.AsyncClient(transport=t1, base_url="http://g1") as a,
        httpx.AsyncClient(transport=t2, base_url="http://g2") as b,
    ):
        ok = {"prompt": "hi", "max_tokens": 2}
        for _ in range(2):
            assert (await a.post(REDIS_RUN_URL, headers=REDIS_AUTH, json=ok)).status_code == 200
        req_key, tok_key, _ = RedisRateLimiter.keys("r", window_of(time.time())[0])
        before = cast(list[bytes | None], store.mget(req_key, tok_key))
        assert before[0] == b"2"
        schema_url = f"/client/v4/accounts/acct-r/ai/models/schema?model={MODEL}"
        for method, url, body in (
            ("GET", "/v1/models", None),
            ("GET", schema_url, None),
            ("POST", REDIS_RUN_URL, {"prompt": ""}),
            ("POST", "/v1/completions", {"model": MODEL, "prompt": 3}),
        ):
            r = await send(b, method, url, body, headers=REDIS_AUTH)  # the other gateway
            assert r.status_code in (200, 400), (url, r.text)
            assert r.headers["x-ratelimit-limit"] == "5"
            assert r.headers["x-ratelimit-remaining"] == "3", url
            used = 10_000 - int(r.headers["x-ratelimit-remaining-tokens"])
            assert used == int(before[1] or 0), url
        assert store.mget(req_key, tok_key) == before  # read only
        r = await b.post(REDIS_RUN_URL, headers=REDIS_AUTH, json=ok)
        assert r.headers["x-ratelimit-remaining"] == "2"
    store.close()


async def test_redis_peek_writes_nothing(redis_server: RedisServer) -> None:
    client = redis_client(redis_server.url, 0.5)
    limiter = RedisRateLimiter(client, fail_open=False, timeout_s=0.5)
    tenant = Tenant("p", frozenset({"acct"}), Plan(requests_per_minute=5, tokens_per_minute=50))
    store = redis.Redis(port=redis_server.port)
    for _ in range(10):
        state = await limiter.peek(tenant)
        assert state is not None
        assert (state.requests_remaining, state.tokens_remaining) == (5, 50)
    assert store.keys("*") == []  # reading created nothing
    await limiter.admit(tenant, "r1", 10)
    state = await limiter.peek(tenant)
    assert state is not None and (state.requests_remaining, state.tokens_remaining) == (4, 40)
    await limiter.close()
    store.close()


async def test_redis_gone_peek_leaves_headers_out_fast(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    app = make_app(tmp_path, redis_server, "g", requests_per_minute=5, rate_limit_fail_open=True)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://g") as c:
        r = await c.get("/v1/models", headers=REDIS_AUTH)
        assert r.headers["x-ratelimit-limit"] == "5"
        redis_server.stop()
        started = time.monotonic()
        statuses = []
        for _ in range(5):
            r = await c.get("/v1/models", headers=REDIS_AUTH)
            statuses.append(r.status_code)
            assert "x-ratelimit-limit" not in r.headers
        elapsed = time.monotonic() - started
    assert statuses == [200] * 5
    assert elapsed < 5, f"5 listings took {elapsed:.1f}s with Redis down"


def limiter_reads(store: redis.Redis) -> int:
    """MGETs the Redis server has answered: the limiter's reads (`peek`); admission and
    settlement are scripts."""
    stats = cast(dict[str, dict[str, int]], store.info("commandstats"))
    return stats.get("cmdstat_mget", {}).get("calls", 0)


async def test_refused_requests_read_no_counters(tmp_path: Path, redis_server: RedisServer) -> None:
    """A 429 reports the state its refusal carried, without reading Redis: a flood's
    refusals add no Redis load. The limiter's refusal carries the counters it decided on;
    the fair queue's early refusal (before the body is read) carries none, and reports none."""
    await away_from_window_edge()
    app = make_app(
        tmp_path,
        redis_server,
        "g",
        overrides={"max_inflight_per_replica": 1, "queue_max_per_tenant": 0},
        requests_per_minute=3,
        tokens_per_minute=10_000,
    )
    engine = cast(FakeEngine, app.state.engine)
    store = redis.Redis(port=redis_server.port)
    ok = {"prompt": "hi", "max_tokens": 2}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://g") as c:
        # A stream holds the replica's one slot.
        engine.stall_after = 1
        stream = asyncio.create_task(
            c.post(REDIS_RUN_URL, headers=REDIS_AUTH, json={**ok, "stream": True})
        )
        try:
            await until_running(engine)
            before = limiter_reads(store)
            for _ in range(5):
                r = await c.post(REDIS_RUN_URL, headers=REDIS_AUTH, json=ok)
                assert r.status_code == 429, r.text
                assert "queued" in r.json()["errors"][0]["message"]
                assert not any(h in r.headers for h in RATE_HEADERS)
            assert limiter_reads(store) == before
        finally:
            stream.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stream
        # The slot is free again: two more requests use up the plan's three.
        engine.stall_after = None
        for _ in range(2):
            assert (await c.post(REDIS_RUN_URL, headers=REDIS_AUTH, json=ok)).status_code == 200
        before = limiter_reads(store)
        for _ in range(5):
            r = await c.post(REDIS_RUN_URL, headers=REDIS_AUTH, json=ok)
            assert r.status_code == 429, r.text
            assert r.headers["x-ratelimit-limit"] == "3"
            assert r.headers["x-ratelimit-remaining"] == "0"
        assert limiter_reads(store) == before
        # A response that reached no admission still reads them (once).
        r = await c.get("/v1/models", headers=REDIS_AUTH)
        assert r.headers["x-ratelimit-remaining"] == "0"
        assert limiter_reads(store) == before + 1
    store.close()
