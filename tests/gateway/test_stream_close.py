"""Closing a response's frames (the stall guard, a client gone between frames) aborts the
engine request and settles the generation before `aclose` returns: not later, when the
garbage collector happens to finalize an inner generator left suspended."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from serve.gateway import openai_routes, workers_ai_routes
from serve.gateway.choices import Choices
from serve.gateway.completion import Budget, Completion, CompletionService
from serve.metrics import GatewayMetrics
from serve.protocol.openai import ResponseMeta
from serve.protocol.sampling import SamplingRequest
from tests.fakes import FakeEngine
from tests.gateway.conftest import MODEL

pytestmark = pytest.mark.timeout(20)


def service(engine: FakeEngine) -> CompletionService:
    budget = Budget(
        context_window=4096,
        default_max_tokens=16,
        default_temperature=0.6,
        non_stream_max_tokens=16,
    )
    metrics = GatewayMetrics(CollectorRegistry(), model=MODEL)
    return CompletionService(engine, budget, max_inflight=8, retry_after_s=1, metrics=metrics)


async def start(svc: CompletionService, n: int = 1) -> list[Completion]:
    prepared = [
        svc.prepare(
            request_id=f"r{i}",
            prompt_token_ids=[1, 2, 3],
            asked=SamplingRequest(),
            stream=True,
            cache_salt=None,
        )
        for i in range(n)
    ]
    return await svc.start_all(prepared)


def assert_aborted_now(engine: FakeEngine, svc: CompletionService, n: int) -> None:
    assert sorted(engine.aborted) == [f"r{i}" for i in range(n)]
    assert engine.running == set() and svc.inflight == 0 and not svc.running


async def test_closing_a_workers_ai_stream_aborts_its_engine_request_at_once() -> None:
    engine = FakeEngine(reply="a b c d e f", delay_s=0.01)
    svc = service(engine)
    (completion,) = await start(svc)
    frames = workers_ai_routes.sse_stream(completion)
    assert b'"response":"a "' in await anext(frames)
    await frames.aclose()
    assert_aborted_now(engine, svc, 1)


@pytest.mark.parametrize("n", [1, 2])
async def test_closing_an_openai_stream_aborts_every_choice_at_once(n: int) -> None:
    engine = FakeEngine(reply="a b c d e f", delay_s=0.01)
    svc = service(engine)
    choices = Choices(await start(svc, n))
    meta = ResponseMeta(id="chatcmpl-x", created=0, model=MODEL, chat=True)
    frames = openai_routes.sse_stream(choices, meta, include_usage=False)
    for _ in range(n):  # the role chunks
        assert b'"role":"assistant"' in await anext(frames)
    assert b'"content":"a "' in await anext(frames)
    await frames.aclose()
    assert_aborted_now(engine, svc, n)
