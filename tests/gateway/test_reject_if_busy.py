"""`options.rejectIfBusy` (Cloudflare's reject-if-busy request option, documented for the
run route and the OpenAI-compatible one): a request that would have to wait for a free slot
is refused at once with 429/3040, not queued."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from serve.cluster import build_gateway
from tests.fakes import FakeEngine
from tests.gateway.conftest import ACCOUNT, AUTH, MODEL, RUN_URL, gateway_settings

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
ROUTES = [
    pytest.param(RUN_URL, {"prompt": "hi", "max_tokens": 4}, id="run"),
    pytest.param(f"/client/v4/accounts/{ACCOUNT}/ai/v1/chat/completions", CHAT, id="cf-openai"),
    pytest.param("/v1/chat/completions", CHAT, id="openai"),
]


@pytest.mark.parametrize(("url", "body"), ROUTES)
async def test_reject_if_busy_refuses_instead_of_queueing(
    tmp_path: Path, url: str, body: dict[str, object]
) -> None:
    settings = gateway_settings(
        cache_dir=str(tmp_path / "cache"), max_inflight_per_replica=1, queue_max_per_tenant=4
    )
    app = build_gateway(settings, FakeEngine(reply="one two three four", delay_s=0.1))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        first = asyncio.create_task(c.post(url, headers=AUTH, json=body))
        await asyncio.sleep(0.05)  # the only slot is taken
        queued = asyncio.create_task(c.post(url, headers=AUTH, json=body))
        await asyncio.sleep(0.01)
        began = time.monotonic()
        busy = await c.post(url, headers=AUTH, json={**body, "options": {"rejectIfBusy": True}})
        refused_after = time.monotonic() - began
        assert busy.status_code == 429, busy.text
        wire = busy.json()
        code = wire["errors"][0]["code"] if "errors" in wire else wire["error"]["code"]
        assert str(code) in ("3040", "rate_limit_exceeded"), wire
        assert int(busy.headers["retry-after"]) >= 1
        assert refused_after < 0.25, "refused only after waiting"  # a wait takes >= 0.3 s
        # Without the option the same request waits for the slot and is served.
        assert (await first).status_code == 200
        assert (await queued).status_code == 200
        # With it and a free slot, it is served as usual.
        free = await c.post(url, headers=AUTH, json={**body, "options": {"rejectIfBusy": True}})
        assert free.status_code == 200, free.text
