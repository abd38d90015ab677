"""A client gone mid-stream still settles its request: the rate-limit correction and the
usage record. Starlette's streaming response (ASGI 2.3, what uvicorn and Serve's replicas
speak) ends the response with an anyio cancel scope, which cancels every await of the
response's task again until it leaves the scope; a settlement with a round trip (Redis)
was cut at its first one, so the tenant's stream lease stayed counted until it expired and
no usage record was written."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from starlette.types import Message

from serve.cluster import build_gateway
from serve.gateway.admission import Gate
from serve.gateway.ledger import OpenRequest, UsageLedger, UsageRecord
from serve.gateway.ratelimit import InMemoryRateLimiter, RateLimiter, RateState, Reservation
from serve.gateway.tenants import Tenant
from tests.fakes import FakeEngine
from tests.gateway.conftest import RUN_URL, asgi_post, gateway_settings

pytestmark = pytest.mark.timeout(20)


class RoundTripLimiter:
    """The replica's limiter, with a network round trip before each settlement."""

    def __init__(self, inner: RateLimiter) -> None:
        self.inner = inner
        self.settled: list[int] = []

    async def admit(
        self, tenant: Tenant, request_id: str, reserve_tokens: int, *, streams: int = 1
    ) -> Reservation:
        return await self.inner.admit(tenant, request_id, reserve_tokens, streams=streams)

    async def settle(self, reservation: Reservation, used_tokens: int) -> None:
        await asyncio.sleep(0.01)
        await self.inner.settle(reservation, used_tokens)
        self.settled.append(used_tokens)

    async def peek(self, tenant: Tenant) -> RateState | None:
        return await self.inner.peek(tenant)


class RoundTripLedger:
    """The replica's ledger, with a network round trip before each record."""

    def __init__(self, inner: UsageLedger) -> None:
        self.inner = inner
        self.records: list[UsageRecord] = []

    async def open(self, entry: OpenRequest) -> None:
        await self.inner.open(entry)

    async def record(self, record: UsageRecord) -> None:
        await asyncio.sleep(0.01)
        await self.inner.record(record)
        self.records.append(record)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def stream_then_leave(app: Any, path: str, body: dict[str, Any]) -> None:
    """One streaming request over ASGI 2.3 whose client leaves after the first event."""
    first_event = asyncio.Event()

    async def send(message: Message) -> None:
        if message["type"] == "http.response.body" and message["body"].startswith(b"data:"):
            first_event.set()

    await asgi_post(app, path, body, send, gone=first_event, spec="2.3")


async def settled(limiter: RoundTripLimiter, ledger: RoundTripLedger) -> None:
    """Until both round trips are done (the settlement may outlive the response)."""
    for _ in range(100):
        if limiter.settled and ledger.records:
            return
        await asyncio.sleep(0.01)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (RUN_URL, {"prompt": "hi", "stream": True}),
        ("/v1/chat/completions", {"model": "@cf/qwen/qwen1.5-1.8b-chat", "stream": True,
                                  "messages": [{"role": "user", "content": "hi"}]}),
    ],
)  # fmt: skip
async def test_a_client_gone_mid_stream_still_settles_its_usage(
    tmp_path: Path, path: str, body: dict[str, Any]
) -> None:
    engine = FakeEngine(reply=" ".join(["word"] * 50), delay_s=0.01)
    app = build_gateway(gateway_settings(cache_dir=str(tmp_path)), engine)
    gate: Gate = app.state.completions.gate
    counters = gate.limiter
    assert isinstance(counters, InMemoryRateLimiter)
    limiter = RoundTripLimiter(counters)
    ledger = RoundTripLedger(gate.ledger)
    gate.limiter, gate.ledger = limiter, ledger

    await stream_then_leave(app, path, body)
    await settled(limiter, ledger)

    assert len(engine.aborted) == 1 and engine.finished == []
    assert len(limiter.settled) == 1 and limiter.settled[0] > 0
    assert [r.status for r in ledger.records] == ["aborted"]
    assert counters.active_streams("t1") == 0
