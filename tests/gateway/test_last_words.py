"""A gateway process SIGKILLed with streams and plain requests in flight, served as a
replica serves it, with its keeper (serve/gateway/last_words.py; issue 9): every client
gets a terminal error in its dialect within 5 s, never a cut connection. Streams get the
error event and `data: [DONE]` (the official openai SDK raises `APIError`); requests that
had nothing sent yet get 502/3008 in the JSON envelope of both dialects, `Retry-After: 1`,
also one on a kept-alive connection reused after an earlier answer. The keeper leaves
once it has answered; and a connection the server closes ends at once even while the
keeper cannot run (its duplicate must not keep the connection open)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest

from serve.tenants_cli import add_token
from tests import gateway_process
from tests.ports import free_port
from tests.sse_client import data_fields

pytestmark = pytest.mark.slow
MODEL = "@cf/qwen/qwen1.5-1.8b-chat"
ACCOUNT = "acct-lw"
WORD_DELAY_S = 0.5  # the fake engine: 8 words take 4 s
TERMINAL_WITHIN_S = 5.0
KEEPER_MODULE = "serve.gateway.last_words_keeper"


@dataclass
class Gateway:
    proc: subprocess.Popen[bytes]
    base: str
    token: str

    @property
    def run_url(self) -> str:
        return f"{self.base}/client/v4/accounts/{ACCOUNT}/ai/run/{MODEL}"

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def keeper(self) -> psutil.Process:
        (keeper,) = [
            p for p in psutil.Process(self.proc.pid).children() if KEEPER_MODULE in p.cmdline()
        ]
        return keeper


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    tenants = tmp_path / "tenants.yaml"
    token = add_token(tenants, tenant_id="lw", accounts=[ACCOUNT])
    port = free_port()
    env = {"TENANCY_APP_DELAY_S": str(WORD_DELAY_S)}
    proc = gateway_process.start_gateway(tmp_path, tenants, port, env, last_words=True)
    try:
        yield Gateway(proc, f"http://127.0.0.1:{port}", token)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


@dataclass
class Seen:
    """What one client saw."""

    stream: bool
    status: int | None = None
    headers: httpx.Headers | None = None
    events: int = 0  # normal events
    error: dict[str, Any] | None = None  # an error envelope (event or body)
    done: bool = False
    transport: str | None = None
    ended_at: float | None = None


async def send(client: httpx.AsyncClient, url: str, body: dict[str, Any], seen: Seen) -> None:
    try:
        async with client.stream("POST", url, json=body) as r:
            seen.status, seen.headers = r.status_code, r.headers
            if seen.stream and r.status_code == 200:
                async for data in data_fields(r):
                    if data == "[DONE]":
                        seen.done = True
                    elif "error" in (event := json.loads(data)) or event.get("errors"):
                        seen.error = event
                    else:
                        seen.events += 1
            else:
                seen.error = json.loads(await r.aread())
    except httpx.HTTPError as exc:
        seen.transport = type(exc).__name__
    finally:
        seen.ended_at = time.monotonic()


async def sdk_stream(gw: Gateway, out: list[str]) -> None:
    """The official openai SDK reading a chat stream: what it raises."""
    client = openai.AsyncOpenAI(base_url=f"{gw.base}/v1", api_key=gw.token, max_retries=0)
    try:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "tell me"}], stream=True
        )
        async for _ in stream:
            out.append("chunk")
    except openai.APIError as exc:
        out.append(f"{type(exc).__name__}: {exc.message}")
    finally:
        await client.close()


async def healthz(gw: Gateway) -> dict[str, Any]:
    async with httpx.AsyncClient() as client:
        payload: dict[str, Any] = (await client.get(f"{gw.base}/healthz")).json()
        return payload


def test_a_killed_gateway_answers_every_client_in_its_dialect(gateway: Gateway) -> None:
    gw = gateway
    chat_url = f"{gw.base}/v1/chat/completions"
    prompt_body = {"prompt": "tell me", "max_tokens": 8}
    chat_body = {"model": MODEL, "messages": [{"role": "user", "content": "tell me"}]}
    requests = [  # (url, body, streamed)
        (gw.run_url, {**prompt_body, "stream": True}, True),
        (gw.run_url, {**prompt_body, "stream": True}, True),
        (chat_url, {**chat_body, "stream": True}, True),
        (gw.run_url, prompt_body, False),
        (chat_url, chat_body, False),
    ]

    async def scenario() -> tuple[list[Seen], Seen, list[str], float, psutil.Process]:
        async with (
            httpx.AsyncClient(headers=gw.auth, timeout=30) as client,
            httpx.AsyncClient(headers=gw.auth, timeout=30, limits=httpx.Limits(
                max_connections=1)) as reused,
        ):  # fmt: skip
            # A kept-alive connection that already carried an answer.
            warm = await reused.post(gw.run_url, json={**prompt_body, "max_tokens": 1})
            assert warm.status_code == 200
            seen = [Seen(stream=s) for _, _, s in requests]
            tasks = [
                asyncio.create_task(send(client, url, body, out))
                for (url, body, _), out in zip(requests, seen, strict=True)
            ]
            on_reused = Seen(stream=False)
            tasks.append(asyncio.create_task(send(reused, gw.run_url, prompt_body, on_reused)))
            sdk: list[str] = []
            tasks.append(asyncio.create_task(sdk_stream(gw, sdk)))
            deadline = time.monotonic() + 10
            while (await healthz(gw))["engine_unfinished_requests"] < len(requests) + 2 or not (
                all(s.events >= 2 for s in seen if s.stream) and len(sdk) >= 2
            ):
                assert time.monotonic() < deadline, (seen, sdk)
                await asyncio.sleep(0.05)
            keeper = gw.keeper()
            killed = time.monotonic()
            gw.proc.send_signal(signal.SIGKILL)
            await asyncio.wait_for(asyncio.gather(*tasks), TERMINAL_WITHIN_S + 5)
            return seen, on_reused, sdk, killed, keeper

    seen, on_reused, sdk, killed, keeper = asyncio.run(scenario())
    for out in [*seen, on_reused]:
        assert out.ended_at is not None and out.ended_at - killed < TERMINAL_WITHIN_S, out
        assert out.transport is None, out
        assert out.error is not None, out
        if out.stream:
            assert (out.status, out.events >= 2, out.done) == (200, True, True), out
        else:
            assert out.status == 502 and out.headers is not None, out
            assert out.headers["content-type"] == "application/json", out
            assert out.headers["retry-after"] == "1", out
            assert out.error["success"] is False and out.error["error"]["code"] == "3008", out
    workers_ai_events = [out.error for out in seen[:2]]
    assert all(e and e["errors"][0]["code"] == 3008 for e in workers_ai_events), seen
    assert seen[2].error and seen[2].error["error"]["type"] == "server_error", seen[2]
    assert sdk[-1] == "APIError: The replica serving this request went away, please retry", sdk
    keeper.wait(timeout=TERMINAL_WITHIN_S)  # it leaves once it has answered
    last = max(o.ended_at or 0 for o in [*seen, on_reused]) - killed
    print(f"\n[last words] {len(seen) + 2} clients answered within {last:.2f} s of the kill")


def http_get_until_closed(port: int) -> tuple[bytes, float]:
    """A request with `Connection: close`; the answer and how long its end took."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        started = time.monotonic()
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while more := conn.recv(65536):
            data += more
        return data, time.monotonic() - started


def test_a_connection_the_server_closes_ends_while_the_keeper_is_stopped(
    gateway: Gateway,
) -> None:
    keeper = gateway.keeper()
    port = int(gateway.base.rsplit(":", 1)[1])
    os.kill(keeper.pid, signal.SIGSTOP)  # it can neither answer nor let go of its copy
    try:
        data, took = http_get_until_closed(port)
    finally:
        os.kill(keeper.pid, signal.SIGCONT)
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert took < 2, took


def test_the_keeper_leaves_with_a_normal_stop(gateway: Gateway) -> None:
    keeper = gateway.keeper()
    gateway.proc.send_signal(signal.SIGINT)
    gateway.proc.wait(timeout=10)
    keeper.wait(timeout=5)
