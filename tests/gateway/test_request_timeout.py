"""The request timeout (`request_timeout_s`): a generation that runs longer is aborted,
its engine request freed, and the client gets 408/3007 in its dialect."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from serve.cluster import build_gateway
from serve.errors import EngineStalled, EngineUnavailable, RequestTimeout
from serve.gateway.completion import Budget, CompletionService
from serve.metrics import GatewayMetrics
from serve.protocol.sampling import SamplingRequest
from serve.settings import Settings
from tests.fakes import FakeEngine
from tests.gateway.conftest import AUTH, MODEL, RUN_URL

TIMEOUT_S = 0.4
# Without the feature the stalled engine would hang a test for an hour.
pytestmark = pytest.mark.timeout(20)


async def client_for(settings: Settings, engine: FakeEngine) -> httpx.AsyncClient:
    app = build_gateway(settings.model_copy(update={"request_timeout_s": TIMEOUT_S}), engine)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def slow_engine() -> FakeEngine:
    """Each word takes 0.15 s: a 12-word reply needs 1.8 s, far past the 0.4 s timeout."""
    return FakeEngine(reply="one two three four five six seven eight nine ten x y", delay_s=0.15)


def stalled_engine() -> FakeEngine:
    """An engine that never produces its first token (a stopped EngineCore)."""
    return FakeEngine(reply="never", delay_s=3600)


ENGINES = {"slow": slow_engine, "stalled": stalled_engine}


@pytest.fixture(params=sorted(ENGINES))
async def timing_out(
    settings: Settings, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[httpx.AsyncClient, FakeEngine, str]]:
    engine = ENGINES[request.param]()
    async with await client_for(settings, engine) as c:
        yield c, engine, request.param


def assert_freed(engine: FakeEngine) -> None:
    assert engine.running == set()
    assert len(engine.aborted) == len(engine.requests) >= 1
    assert engine.finished == []


def sse_data(raw: str) -> list[str]:
    return [f.removeprefix("data: ") for f in raw.split("\n\n") if f.startswith("data: ")]


async def test_workers_ai_envelope_when_nothing_was_sent(
    timing_out: tuple[httpx.AsyncClient, FakeEngine, str],
) -> None:
    client, engine, _ = timing_out
    started = time.monotonic()
    r = await client.post(RUN_URL, headers=AUTH, json={"prompt": "hi", "max_tokens": 8})
    elapsed = time.monotonic() - started
    assert r.status_code == 408
    assert r.json() == {
        "result": {},
        "success": False,
        "errors": [{"code": 3007, "message": "AiError: Request timeout"}],
        "messages": [],
    }
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 0.5
    assert_freed(engine)


async def test_workers_ai_stream_ends_with_one_error_event_then_done(
    timing_out: tuple[httpx.AsyncClient, FakeEngine, str],
) -> None:
    client, engine, which = timing_out
    r = await client.post(RUN_URL, headers=AUTH, json={"prompt": "hi", "stream": True})
    assert r.status_code == 200
    data = sse_data(r.text)
    assert data[-1] == "[DONE]"
    events = [json.loads(d) for d in data[:-1]]
    errors = [e for e in events if "errors" in e]
    assert len(errors) == 1 and errors[0] is events[-1]
    assert errors[0]["errors"] == [{"code": 3007, "message": "AiError: Request timeout"}]
    assert all("usage" not in e for e in events)
    if which == "slow":
        assert 1 <= len(events) - 1 < 12  # some tokens came before the timeout
    assert_freed(engine)


async def test_openai_non_stream_is_408_timeout_error(settings: Settings) -> None:
    engine = slow_engine()
    async with await client_for(settings, engine) as client:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2}
        r = await client.post("/v1/chat/completions", headers=AUTH, json=body)
    assert r.status_code == 408
    assert r.json() == {
        "error": {
            "message": "Request timeout",
            "type": "timeout_error",
            "param": None,
            "code": "3007",
        }
    }
    assert_freed(engine)
    assert len(engine.aborted) == 2


async def test_openai_stream_ends_with_error_event_then_done(settings: Settings) -> None:
    engine = stalled_engine()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with await client_for(settings, engine) as client:
        r = await client.post("/v1/chat/completions", headers=AUTH, json=body)
    data = sse_data(r.text)
    assert data[-1] == "[DONE]"
    assert json.loads(data[-2])["error"]["code"] == "3007"
    assert_freed(engine)


async def test_fast_requests_are_not_affected(settings: Settings) -> None:
    engine = FakeEngine(reply="a b c", delay_s=0.01)
    async with await client_for(settings, engine) as client:
        for _ in range(3):
            r = await client.post(RUN_URL, headers=AUTH, json={"prompt": "hi"})
            assert r.status_code == 200
            assert r.json()["result"]["response"] == "a b c"
    assert len(engine.finished) == 3 and engine.aborted == []


def service(engine: FakeEngine, timeout_s: float) -> CompletionService:
    metrics = GatewayMetrics(CollectorRegistry(), model=MODEL)
    budget = Budget(
        context_window=4096,
        default_max_tokens=16,
        default_temperature=0.6,
        non_stream_max_tokens=16,
    )
    return CompletionService(
        engine,
        budget,
        max_inflight=4,
        retry_after_s=1,
        metrics=metrics,
        request_timeout_s=timeout_s,
    )


async def start(svc: CompletionService) -> Any:
    prepared = svc.prepare(
        request_id="r1",
        prompt_token_ids=[1, 2, 3],
        asked=SamplingRequest(),
        stream=True,
        cache_salt=None,
    )
    return await svc.start(prepared)


async def test_a_consumer_slower_than_the_timeout_gets_it_at_its_next_read() -> None:
    """The timer fired while the consumer held a delta: the next read raises, the engine
    request (suspended between tokens) is closed, i.e. aborted."""
    engine = FakeEngine(reply="a b c d")
    svc = service(engine, 0.1)
    deltas = (await start(svc)).deltas()
    assert await anext(deltas) == "a "
    await asyncio.sleep(0.2)
    with pytest.raises(RequestTimeout):
        await anext(deltas)
    assert engine.aborted == ["r1"] and svc.inflight == 0


async def test_a_caller_cancel_stays_a_cancel() -> None:
    """Cancelling the consumer (client gone) is not turned into a timeout."""
    engine = FakeEngine(reply="a b", delay_s=3600)
    svc = service(engine, 60)
    completion = await start(svc)
    task = asyncio.create_task(completion.collect())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.aborted == ["r1"] and not completion.failed


async def test_the_timer_cancel_is_undone_on_the_waiting_task() -> None:
    """After a timeout the consuming task is not left cancelling (it can still write)."""
    engine = FakeEngine(reply="a b", delay_s=3600)
    completion = await start(service(engine, 0.05))
    with pytest.raises(RequestTimeout):
        await completion.collect()
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    await asyncio.sleep(0.01)  # no stray CancelledError lands here


def stalls_after_first_token() -> FakeEngine:
    """One token, then nothing (an EngineCore stopped mid-stream)."""
    return FakeEngine(reply="first then never", stall_after=1)


async def test_a_stream_stalled_after_its_heartbeat_wrapped_first_frame_times_out(
    settings: Settings,
) -> None:
    """The first engine step runs in the SSE heartbeat's task, the next ones in the
    response's: the timer must interrupt whichever task waits now (taking the task once
    per generation hung this stream for ever)."""
    engine = stalls_after_first_token()
    beating = settings.model_copy(update={"stream_heartbeat_s": 0.05})
    started = time.monotonic()
    async with await client_for(beating, engine) as client:
        r = await client.post(RUN_URL, headers=AUTH, json={"prompt": "hi", "stream": True})
    elapsed = time.monotonic() - started
    data = sse_data(r.text)
    assert data[-1] == "[DONE]"
    events = [json.loads(d) for d in data[:-1]]
    assert events[0]["response"] == "first "
    assert events[-1]["errors"] == [{"code": 3007, "message": "AiError: Request timeout"}]
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + 0.5
    assert_freed(engine)


# -- a stalled engine ends every running generation at once (not at the request timeout)

STALLED = EngineStalled(60.0, 2)
STALL_MESSAGE = "AiError: Request timeout: the inference engine made no progress for 60 s"


async def health_checks(app: Any, engine: FakeEngine, until: asyncio.Future[Any]) -> None:
    """What Serve does: call the replica's health check every few ms (failures raise)."""
    completions = app.state.completions
    while not until.done():
        await asyncio.sleep(0.02)
        if len(engine.running) == 2:
            engine.health_error = STALLED
        with contextlib.suppress(EngineStalled):
            await completions.check_health()


@contextlib.asynccontextmanager
async def both_dialects(app: Any) -> AsyncIterator[asyncio.Future[list[httpx.Response]]]:
    """A Workers AI stream and a plain OpenAI chat completion sent to `app` at once:
    their responses, streamed one read in full, when both are done."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        chat = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
        stream = client.post(RUN_URL, headers=AUTH, json={"prompt": "hi", "stream": True})
        plain = client.post("/v1/chat/completions", headers=AUTH, json=chat)
        yield asyncio.ensure_future(asyncio.gather(stream, plain))


async def test_a_stalled_engine_ends_both_dialects_with_408_before_the_request_timeout(
    settings: Settings,
) -> None:
    engine = stalls_after_first_token()
    app = build_gateway(settings.model_copy(update={"request_timeout_s": 3600}), engine)
    async with both_dialects(app) as both:
        await health_checks(app, engine, both)
        streamed, answered = await both
    events = [json.loads(d) for d in sse_data(streamed.text)[:-1]]
    assert events[0]["response"] == "first "
    assert events[-1]["errors"] == [{"code": 3007, "message": STALL_MESSAGE}]
    assert answered.status_code == 408
    assert answered.json()["error"] == {
        "message": STALL_MESSAGE.removeprefix("AiError: "),  # OpenAI's have no such prefix
        "type": "timeout_error",
        "param": None,
        "code": "3007",
    }
    assert_freed(engine)


async def test_other_health_failures_leave_running_generations_alone() -> None:
    """A dead engine fails its requests itself; a failing check for another reason must
    not turn running generations into timeouts."""
    engine = FakeEngine(reply="a b c", delay_s=0.05)
    svc = service(engine, 60)
    completion = await start(svc)
    task = asyncio.create_task(completion.collect())
    await asyncio.sleep(0.01)
    engine.health_error = EngineUnavailable("AiError: The model is not ready yet")
    with pytest.raises(EngineUnavailable):
        await svc.check_health()
    assert await task == "a b c"
    assert svc.running == set()


async def test_a_stall_reaches_only_generations_still_running() -> None:
    engine = FakeEngine(reply="a", stall_after=0)
    svc = service(engine, 60)
    done = await start(svc)
    engine.stall_after = None
    assert await done.collect() == "a"
    engine.stall_after = 0
    stuck = await start(svc)
    task = asyncio.create_task(stuck.collect())
    await asyncio.sleep(0.01)
    assert svc.running == {stuck}
    engine.health_error = STALLED
    with pytest.raises(EngineStalled):
        await svc.check_health()
    with pytest.raises(RequestTimeout, match="no progress for 60 s"):
        await task
    assert engine.aborted == ["r1"] and svc.running == set() and svc.inflight == 0
