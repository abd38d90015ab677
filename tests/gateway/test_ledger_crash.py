"""The usage ledger survives a SIGKILL: every request whose final byte reached the
client has exactly one record after the gateway process is killed and restarted."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
from pathlib import Path

import httpx
import pytest

from serve.tenants_cli import add_token
from tests import gateway_process
from tests.ports import free_port

pytestmark = pytest.mark.slow
MODEL = "@cf/qwen/qwen1.5-1.8b-chat"


def start_gateway(work: Path, tenants: Path, port: int) -> subprocess.Popen[bytes]:
    return gateway_process.start_gateway(work, tenants, port, {"TENANCY_APP_DELAY_S": "0.03"})


KILL_AFTER = 10  # finished requests before the SIGKILL (of 120 in the burst)


async def one_request(
    client: httpx.AsyncClient,
    url: str,
    auth: dict[str, str],
    i: int,
    completed: list[str],
    enough: asyncio.Event,
) -> None:
    body = {"prompt": f"request {i}", "max_tokens": 8, "stream": i % 2 == 0}
    try:
        async with client.stream("POST", url, headers=auth, json=body) as r:
            rid = r.headers.get("cf-ai-req-id")
            data = b"".join([chunk async for chunk in r.aiter_bytes()])
        if r.status_code != 200 or rid is None:
            return
        if body["stream"] and not data.rstrip().endswith(b"data: [DONE]"):
            return
        if not body["stream"] and b'"success":true' not in data:
            return
        completed.append(rid)  # the final byte arrived
        if len(completed) >= KILL_AFTER:
            enough.set()
    except httpx.HTTPError:
        return  # cut off by the kill


async def burst(url: str, auth: dict[str, str], proc: subprocess.Popen[bytes]) -> list[str]:
    completed: list[str] = []
    enough = asyncio.Event()
    limits = httpx.Limits(max_connections=12)
    async with httpx.AsyncClient(timeout=10, limits=limits) as client:
        tasks = [
            asyncio.create_task(one_request(client, url, auth, i, completed, enough))
            for i in range(120)
        ]
        # Kill well inside the burst: some requests finished, most are still to come.
        await asyncio.wait_for(enough.wait(), 30)
        proc.send_signal(signal.SIGKILL)
        await asyncio.gather(*tasks)
    return completed


def test_sigkill_mid_burst_keeps_one_record_per_finished_request(tmp_path: Path) -> None:
    tenants = tmp_path / "tenants.yaml"
    token = add_token(tenants, tenant_id="k", accounts=["acct-k"])
    auth = {"Authorization": f"Bearer {token}"}
    port = free_port()
    url = f"http://127.0.0.1:{port}/client/v4/accounts/acct-k/ai/run/{MODEL}"
    proc = start_gateway(tmp_path, tenants, port)
    try:
        completed = asyncio.run(burst(url, auth, proc))
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert KILL_AFTER <= len(completed) < 120, f"the kill did not land mid-burst: {len(completed)}"
    restarted = start_gateway(tmp_path, tenants, port)
    try:
        r = httpx.get(f"http://127.0.0.1:{port}/client/v4/accounts/acct-k/ai/usage", headers=auth)
        (totals,) = r.json()["result"]["models"]
    finally:
        restarted.terminate()
        restarted.wait(timeout=10)
    with sqlite3.connect(tmp_path / "cache" / "usage.sqlite3") as db:
        rows = db.execute("SELECT request_id, status FROM usage").fetchall()
    counts: dict[str, int] = {}
    for rid, _status in rows:
        counts[rid] = counts.get(rid, 0) + 1
    missing = [rid for rid in completed if counts.get(rid) != 1]
    assert not missing, f"{len(missing)} finished requests without exactly one record"
    assert {s for rid, s in rows if rid in set(completed)} == {"ok"}
    assert totals["requests"] == len(rows) >= len(completed)
