"""A draining replica's deadline (`CompletionService.close`, called by
`serve.replica.drain.DrainWatch`): generations still running end with 503/3040 in their
dialect, their engine requests are freed and their usage is recorded by this replica;
requests admitted afterwards fail at once."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from contextlib import closing

import httpx
import pytest

from serve.cluster import build_gateway
from serve.errors import ReplicaShuttingDown
from serve.settings import Settings
from tests.fakes import FakeEngine
from tests.gateway.conftest import AUTH, RUN_URL
from tests.gateway.test_request_timeout import assert_freed, both_dialects, sse_data

pytestmark = pytest.mark.timeout(20)

MESSAGE = "AiError: The replica serving this request is shutting down, please retry"


async def test_the_drain_deadline_ends_both_dialects_with_503_and_records_usage(
    settings: Settings,
) -> None:
    engine = FakeEngine(reply="first then never", stall_after=1)
    app = build_gateway(settings.model_copy(update={"request_timeout_s": 3600}), engine)
    async with both_dialects(app) as both:
        for _ in range(500):
            if len(engine.running) == 2:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # the first tokens are out
        app.state.completions.close(ReplicaShuttingDown)
        streamed, answered = await asyncio.wait_for(both, 5)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            later = await client.post(RUN_URL, headers=AUTH, json={"prompt": "hi"})

    data = sse_data(streamed.text)
    assert streamed.status_code == 200 and data[-1] == "[DONE]"
    events = [json.loads(d) for d in data[:-1]]
    assert events[0]["response"] == "first "
    assert events[-1]["errors"] == [{"code": 3040, "message": MESSAGE}]
    assert answered.status_code == 503 and answered.headers["retry-after"] == "1"
    assert answered.json()["error"] == {
        "message": MESSAGE.removeprefix("AiError: "),  # OpenAI's have no such prefix
        "type": "server_error",
        "param": None,
        "code": "3040",
    }
    assert later.status_code == 503 and later.headers["retry-after"] == "1"
    assert later.json()["errors"] == [{"code": 3040, "message": MESSAGE}]
    assert len(engine.requests) == 2  # the later one never reached the engine
    assert_freed(engine)

    # This replica wrote the records itself: errors, with the one token each had made.
    with closing(sqlite3.connect(settings.cache_dir / "usage.sqlite3")) as db:
        rows = db.execute("SELECT status, completion_tokens FROM usage ORDER BY started_at")
        assert sorted(rows.fetchall()) == [("error", 0), ("error", 1), ("error", 1)]
        assert db.execute("SELECT COUNT(*) FROM open_usage").fetchone() == (0,)
