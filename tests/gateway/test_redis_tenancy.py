"""Tenant limits and the usage ledger on a real Redis (redis-server started here):
two gateway apps share the counters; Redis going away fails open or closed, fast; Redis
coming back is used again without restarting the gateway."""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from fastapi import FastAPI
from prometheus_client import CollectorRegistry

from serve.cluster import build_gateway
from serve.gateway.tenants import hash_token
from serve.settings import Settings, cpu_catalog
from tests.fakes import FakeEngine
from tests.ports import free_port
from tests.redis_server import spawn_redis

MODEL = "@cf/qwen/qwen1.5-1.8b-chat"
TOKEN = "tok-redis-tenant-secret"
URL = f"/client/v4/accounts/acct-r/ai/run/{MODEL}"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class RedisServer:
    proc: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)

    def start_fresh(self, data_dir: Path) -> None:
        """A new, empty redis-server on the same port (a replaced Redis without its data)."""
        self.proc = spawn_redis(self.port, data_dir)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    port = free_port()
    server = RedisServer(spawn_redis(port, tmp_path), port)
    yield server
    if server.proc.poll() is None:
        server.stop()


def make_app(
    tmp_path: Path,
    redis: RedisServer,
    name: str,
    *,
    overrides: Mapping[str, object] | None = None,
    **plan: object,
) -> FastAPI:
    """A gateway on `redis` for tenant r (plan `plan`), with settings `overrides`."""
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text(
        yaml.safe_dump(
            {
                "plans": {"p": {"requests_per_minute": 1000, **plan}},
                "tenants": [
                    {
                        "id": "r",
                        "plan": "p",
                        "accounts": ["acct-r"],
                        "tokens": [{"sha256": hash_token(TOKEN)}],
                    }
                ],
            }
        )
    )
    settings = Settings.model_validate(
        {
            "models": [m.model_dump() for m in cpu_catalog("/nonexistent")],
            "cache_dir": str(tmp_path / name),
            "tenants_file": str(tenants),
            "redis_url": redis.url,
            **{k: v for k, v in plan.items() if k == "rate_limit_fail_open"},
            **(overrides or {}),
        }
    )
    engine = FakeEngine(reply="a b c d e f g h", delay_s=0.02)
    app = build_gateway(settings, engine, registry=CollectorRegistry())
    app.state.engine = engine
    return app


@pytest.fixture
async def pair(
    tmp_path: Path, redis_server: RedisServer
) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    apps = [make_app(tmp_path, redis_server, n, requests_per_minute=5) for n in ("g1", "g2")]
    async with (
        httpx.AsyncClient(transport=httpx.ASGITransport(app=apps[0]), base_url="http://g1") as a,
        httpx.AsyncClient(transport=httpx.ASGITransport(app=apps[1]), base_url="http://g2") as b,
    ):
        yield a, b


async def test_request_limit_holds_across_two_gateways(
    pair: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    statuses = []
    for i in range(8):
        r = await pair[i % 2].post(URL, headers=AUTH, json={"prompt": "hi", "max_tokens": 2})
        statuses.append(r.status_code)
    assert statuses == [200] * 5 + [429] * 3
    assert 1 <= int(r.headers["retry-after"]) <= 61
    assert r.headers["x-ratelimit-remaining"] == "0"


async def test_streams_and_tokens_shared(tmp_path: Path, redis_server: RedisServer) -> None:
    g1 = make_app(tmp_path, redis_server, "g1", max_concurrent_streams=1, tokens_per_minute=400)
    g2 = make_app(tmp_path, redis_server, "g2", max_concurrent_streams=1, tokens_per_minute=400)
    t1, t2 = httpx.ASGITransport(app=g1), httpx.ASGITransport(app=g2)
    async with (
        httpx.AsyncClient(transport=t1, base_url="http://g1") as a,
        httpx.AsyncClient(transport=t2, base_url="http://g2") as b,
    ):
        body = {"prompt": "hi", "max_tokens": 100, "stream": True}
        running = asyncio.create_task(a.post(URL, headers=AUTH, json=body))
        for _ in range(1000):
            if g1.state.engine.running:
                break
            await asyncio.sleep(0.005)
        r = await b.post(URL, headers=AUTH, json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 429 and "concurrent" in r.text
        assert (await running).status_code == 200
        # Each request reserves 19 prompt + 100 tokens and uses 19 + 8: without settlement
        # the fourth reservation would not fit in 400.
        for client in (b, a, b):
            r = await client.post(URL, headers=AUTH, json={"prompt": "hi", "max_tokens": 100})
            assert r.status_code == 200, r.text
        remaining = int(r.headers["x-ratelimit-remaining-tokens"])
        assert remaining == 400 - 3 * (19 + 8) - (19 + 100)


async def test_usage_of_both_gateways_in_one_place(
    pair: tuple[httpx.AsyncClient, httpx.AsyncClient],
) -> None:
    for client in pair:
        r = await client.post(URL, headers=AUTH, json={"prompt": "hi", "max_tokens": 3})
        assert r.status_code == 200
        r = await client.post(URL, headers=AUTH, json={"prompt": "hi", "max_tokens": 3})
    r = await pair[0].get("/client/v4/accounts/acct-r/ai/usage", headers=AUTH)
    (models,) = r.json()["result"]["models"]
    assert models["requests"] == 4 and models["completion_tokens"] == 12


@pytest.mark.parametrize("fail_open", [True, False])
async def test_redis_down_fails_open_or_closed_fast(
    tmp_path: Path, redis_server: RedisServer, fail_open: bool
) -> None:
    app = make_app(
        tmp_path, redis_server, "g", requests_per_minute=1, rate_limit_fail_open=fail_open
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://g") as c:
        body = {"prompt": "hi", "max_tokens": 2}
        assert (await c.post(URL, headers=AUTH, json=body)).status_code == 200
        assert (await c.post(URL, headers=AUTH, json=body)).status_code == 429
        redis_server.stop()
        started = time.monotonic()
        statuses = [(await c.post(URL, headers=AUTH, json=body)).status_code for _ in range(5)]
        elapsed = time.monotonic() - started
        metrics = (await c.get("/metrics")).text
    assert elapsed < 5, f"5 requests took {elapsed:.1f}s with Redis down"
    if fail_open:
        assert statuses == [200] * 5  # admitted uncounted
        assert 'batchserve_ratelimit_backend_errors_total{action="fail_open"' in metrics
    else:
        assert statuses == [503] * 5
        assert 'batchserve_ratelimit_backend_errors_total{action="fail_closed"' in metrics
    # The records of requests served meanwhile went to the local SQLite fallback.
    if fail_open:
        assert any((tmp_path / "g").glob("usage-fallback.sqlite3*"))


async def test_unreachable_redis_at_start_does_not_hang(tmp_path: Path) -> None:
    dead = RedisServer(proc=None, port=free_port())  # type: ignore[arg-type]
    app = make_app(tmp_path, dead, "g", rate_limit_fail_open=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://g") as c:
        r = await asyncio.wait_for(c.post(URL, headers=AUTH, json={"prompt": "hi"}), 5)
    assert r.status_code == 503 and r.json()["errors"][0]["code"] == 3040


async def _next_window_if_within(seconds: float) -> None:
    """Counters live in fixed minutes: start a counted sequence away from the minute's end."""
    left = 60 - time.time() % 60
    if left < seconds:
        await asyncio.sleep(left + 0.1)


@pytest.mark.parametrize("fail_open", [True, False], ids=["fail-open", "fail-closed"])
async def test_redis_lost_and_back(
    tmp_path: Path, redis_server: RedisServer, fail_open: bool
) -> None:
    """Redis goes away under a steady client, then a fresh (empty) Redis comes back on the
    same address: the same gateway, never restarted, counts and enforces the limit again."""
    rpm, outage_s = 4, 1.5
    app = make_app(
        tmp_path, redis_server, "g", requests_per_minute=rpm, rate_limit_fail_open=fail_open
    )
    body = {"prompt": "hi", "max_tokens": 2}
    down_status = 200 if fail_open else 503
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://g") as c:
        await _next_window_if_within(3)
        before = [(await c.post(URL, headers=AUTH, json=body)).status_code for _ in range(rpm + 1)]
        assert before == [200] * rpm + [429]

        redis_server.stop()
        during: list[int] = []
        worst_s = 0.0
        outage_end = time.monotonic() + outage_s
        while time.monotonic() < outage_end:
            started = time.monotonic()
            r = await c.post(URL, headers=AUTH, json=body)
            worst_s = max(worst_s, time.monotonic() - started)
            during.append(r.status_code)
            assert "x-ratelimit-remaining" not in r.headers  # no counters to report
        assert set(during) == {down_status}, during

        redis_server.start_fresh(tmp_path / "redis-after")
        back = time.monotonic()
        recovering: list[int] = []
        while True:  # until an admission is counted again
            r = await c.post(URL, headers=AUTH, json=body)
            recovering.append(r.status_code)
            if r.headers.get("x-ratelimit-remaining") == str(rpm - 1):
                break
            assert r.status_code == down_status, r.text
            assert time.monotonic() - back < 10, "limits not enforced 10 s after Redis came back"
            await asyncio.sleep(0.05)
        recovered_s = time.monotonic() - back
        assert r.status_code == 200
        counted = 1
        if 60 - time.time() % 60 < 3:
            await _next_window_if_within(3)
            counted = 0
        after = [
            (await c.post(URL, headers=AUTH, json=body)).status_code
            for _ in range(rpm - counted + 1)
        ]
        assert after == [200] * (rpm - counted) + [429]
        # Every request served since the old Redis went (its records went with it) is
        # counted by the fresh one: those of the outage, which the local fallback took, are
        # handed on by the first heartbeat that reaches Redis (every 2 s).
        served = (during + recovering + after).count(200)
        while True:
            usage = (await c.get("/client/v4/accounts/acct-r/ai/usage", headers=AUTH)).json()
            (model,) = usage["result"]["models"]
            if model["requests"] == served:
                break
            assert model["requests"] < served, (model, served)
            assert time.monotonic() - back < 15, f"usage counts {model['requests']} of {served}"
            await asyncio.sleep(0.2)
        assert (await c.get("/healthz")).status_code == 200
    mode = "fail-open" if fail_open else "fail-closed"
    print(
        f"\n[redis lost and back, {mode}] outage {outage_s} s: {len(during)} requests, "
        f"{during.count(200)} served, {during.count(503)} refused (503), slowest {worst_s:.3f} s; "
        f"limits enforced again {recovered_s:.2f} s after Redis was back"
    )
