"""A gateway process SIGKILLed with streams and plain requests in flight (issue 9): once a
new process shares its usage store (the SQLite file, or Redis), every request that never got
its final byte gets exactly one record, status error / replica_lost, within the dead-owner
timeout; every completed request keeps exactly one ok record; the usage route counts both."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from serve.gateway.ledger import LOST_REASON
from serve.gateway.redis_ledger import KEY_PREFIX, OWNERS_PREFIX
from serve.tenants_cli import add_token
from tests import gateway_process
from tests.ports import free_port
from tests.redis_server import RedisProcess

pytestmark = pytest.mark.slow
MODEL = "@cf/qwen/qwen1.5-1.8b-chat"
ACCOUNT = "acct-k"
HEARTBEAT_S, DEAD_AFTER_S, SWEEP_S = 0.5, 3.0, 0.5
WORD_DELAY_S = 0.5  # the fake engine: 8 words take 4 s, 1 word 0.5 s
LONG_STREAMS, LONG_PLAIN, SHORT = 5, 2, 3


def start_gateway(
    work: Path, tenants: Path, port: int, redis_url: str | None
) -> subprocess.Popen[bytes]:
    settings: dict[str, object] = {
        "usage_heartbeat_s": HEARTBEAT_S,
        "usage_owner_dead_after_s": DEAD_AFTER_S,
        "usage_sweep_s": SWEEP_S,
    }
    if redis_url is not None:  # generous: a loaded machine must not send it to the fallback
        settings.update(redis_url=redis_url, redis_timeout_s=2.0)
    env = {"TENANCY_APP_DELAY_S": str(WORD_DELAY_S), "TENANCY_APP_SETTINGS": json.dumps(settings)}
    return gateway_process.start_gateway(work, tenants, port, env)


@dataclass
class Sent:
    stream: bool
    request_id: str | None = None  # cf-ai-req-id: the usage record's key
    events: int = 0
    completed: bool = False  # the final byte arrived


async def send(
    client: httpx.AsyncClient, url: str, auth: dict[str, str], s: Sent, max_tokens: int
) -> None:
    body = {"prompt": "tell me", "max_tokens": max_tokens, "stream": s.stream}
    try:
        async with client.stream("POST", url, headers=auth, json=body) as r:
            s.request_id = r.headers.get("cf-ai-req-id")
            data = b""
            async for chunk in r.aiter_bytes():
                data += chunk
                s.events = data.count(b"data: ")
        done = data.rstrip().endswith(b"data: [DONE]") if s.stream else b'"success":true' in data
        s.completed = r.status_code == 200 and done
    except httpx.HTTPError:
        return  # cut by the kill


def records(work: Path, redis_url: str | None) -> list[dict[str, str]]:
    if redis_url is None:
        with closing(sqlite3.connect(work / "cache" / "usage.sqlite3")) as db:
            rows = db.execute("SELECT * FROM usage")
            names = [d[0] for d in rows.description]
            return [dict(zip(names, map(str, row), strict=True)) for row in rows]
    with closing(redis.Redis.from_url(redis_url, decode_responses=True)) as r:
        return [dict(f) for _id, f in r.xrange(f"{KEY_PREFIX}:{{{ACCOUNT}}}:stream")]


def open_entries(work: Path, redis_url: str | None) -> int:
    if redis_url is None:
        with closing(sqlite3.connect(work / "cache" / "usage.sqlite3")) as db:
            return int(db.execute("SELECT COUNT(*) FROM open_usage").fetchone()[0])
    with closing(redis.Redis.from_url(redis_url, decode_responses=True)) as r:
        return sum(int(r.hlen(k)) for k in r.scan_iter(f"{OWNERS_PREFIX}:open:*"))


async def kill_mid_flight(
    url: str, base: str, auth: dict[str, str], proc: subprocess.Popen[bytes]
) -> list[Sent]:
    async with httpx.AsyncClient(timeout=30) as client:
        short = [Sent(stream=i % 2 == 0) for i in range(SHORT)]
        await asyncio.gather(*(send(client, url, auth, s, 1) for s in short))
        assert all(s.completed for s in short), short
        long = [Sent(stream=True) for _ in range(LONG_STREAMS)]
        long += [Sent(stream=False) for _ in range(LONG_PLAIN)]
        tasks = [asyncio.create_task(send(client, url, auth, s, 8)) for s in long]
        # Every long request admitted (their engine requests started), streams mid-way.
        deadline = time.monotonic() + 10
        while True:
            health = (await client.get(f"{base}/healthz")).json()
            streaming = all(s.events >= 2 for s in long if s.stream)
            if health["engine_unfinished_requests"] == len(long) and streaming:
                break
            assert time.monotonic() < deadline, (health, long)
            await asyncio.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        await asyncio.gather(*tasks)
    assert not any(s.completed for s in long), "the kill came too late"
    return short + long


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str | None]:
    if request.param == "sqlite":
        yield None
        return
    server = RedisProcess(tmp_path / "redis")
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def test_sigkill_mid_stream_leaves_one_error_record_per_cut_request(
    tmp_path: Path, store: str | None
) -> None:
    tenants = tmp_path / "tenants.yaml"
    token = add_token(tenants, tenant_id="k", accounts=[ACCOUNT])
    auth = {"Authorization": f"Bearer {token}"}
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    url = f"{base}/client/v4/accounts/{ACCOUNT}/ai/run/{MODEL}"
    proc = start_gateway(tmp_path, tenants, port, store)
    try:
        sent = asyncio.run(kill_mid_flight(url, base, auth, proc))
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    killed = time.monotonic()
    assert open_entries(tmp_path, store) == LONG_STREAMS + LONG_PLAIN  # written ahead
    completed = [s.request_id for s in sent if s.completed]
    cut_streams = [s.request_id for s in sent if s.stream and not s.completed]
    assert len(completed) == SHORT and len(cut_streams) == LONG_STREAMS
    assert all(completed) and all(cut_streams)

    restarted = start_gateway(tmp_path, tenants, port, store)
    try:
        started = time.monotonic()
        while len(records(tmp_path, store)) < SHORT + LONG_STREAMS + LONG_PLAIN:
            waited = time.monotonic() - started
            assert waited < DEAD_AFTER_S + 2 * SWEEP_S + 2, "the cut requests were not recorded"
            time.sleep(0.1)
        recorded_after = (time.monotonic() - killed, time.monotonic() - started)
        r = httpx.get(f"{base}/client/v4/accounts/{ACCOUNT}/ai/usage", headers=auth)
        (totals,) = r.json()["result"]["models"]
    finally:
        restarted.terminate()
        restarted.wait(timeout=10)

    rows = records(tmp_path, store)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["request_id"]] = counts.get(row["request_id"], 0) + 1
    assert all(n == 1 for n in counts.values()), counts
    by_id = {row["request_id"]: row for row in rows}
    assert {by_id[rid]["status"] for rid in completed} == {"ok"}
    errors = [row for row in rows if row["status"] == "error"]
    assert len(errors) == LONG_STREAMS + LONG_PLAIN  # the plain ones: ids never sent
    assert set(cut_streams) <= {row["request_id"] for row in errors}
    for row in errors:
        assert (row["finish_reason"], row["completion_tokens"]) == (LOST_REASON, "0"), row
        assert int(row["prompt_tokens"]) > 0
    assert open_entries(tmp_path, store) == 0
    assert totals["requests"] == SHORT + LONG_STREAMS + LONG_PLAIN
    print(f"\n[{'redis' if store else 'sqlite'}] cut requests recorded {recorded_after[0]:.1f} s "
          f"after the kill, {recorded_after[1]:.1f} s after the new process was up "
          f"(dead after {DEAD_AFTER_S} s, sweep every {SWEEP_S} s)")  # fmt: skip
