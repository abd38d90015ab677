"""`options.rejectIfBusy` (Cloudflare's reject-if-busy request option): a request that
would have to wait for a free slot is refused at once with 429/3040, not queued."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx

from serve.cluster import build_gateway
from tests.fakes import FakeEngine
from tests.gateway.conftest import AUTH, RUN_URL, gateway_settings


async def test_reject_if_busy_refuses_instead_of_queueing(tmp_path: Path) -> None:
    settings = gateway_settings(
        cache_dir=str(tmp_path / "cache"), max_inflight_per_replica=1, queue_max_per_tenant=4
    )
    app = build_gateway(settings, FakeEngine(reply="one two three four", delay_s=0.1))
    body = {"prompt": "hi", "max_tokens": 4}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        first = asyncio.create_task(c.post(RUN_URL, headers=AUTH, json=body))
        await asyncio.sleep(0.05)  # the only slot is taken
        queued = asyncio.create_task(c.post(RUN_URL, headers=AUTH, json=body))
        await asyncio.sleep(0.01)
        began = time.monotonic()
        busy = await c.post(RUN_URL, headers=AUTH, json={**body, "options": {"rejectIfBusy": True}})
        refused_after = time.monotonic() - began
        assert busy.status_code == 429, busy.text
        assert busy.json()["errors"][0]["code"] == 3040
        assert int(busy.headers["retry-after"]) >= 1
        assert refused_after < 0.1, "refused only after waiting"
        # Without the option the same request waits for the slot and is served.
        assert (await first).status_code == 200
        assert (await queued).status_code == 200
        # With it and a free slot, it is served as usual.
        free = await c.post(RUN_URL, headers=AUTH, json={**body, "options": {"rejectIfBusy": True}})
        assert free.status_code == 200, free.text
