"""A mock LLM server for both dialects with a known TTFT, ITL and chunking (calibration).

Chunk j of a stream is written at the absolute time `arrival + ttft + j * tokens_per_chunk * itl`
(never by relative sleeps, so the mock's own jitter does not accumulate). Chat streams begin with
an empty role-only chunk sent at once, as vLLM does, which a correct client must not take for the
first token. Every `rate_limit_every`-th request is answered 429.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

WORD = "tok "


@dataclass(frozen=True)
class MockConfig:
    ttft_s: float = 0.05
    itl_s: float = 0.01
    tokens_per_chunk: int = 1
    default_max_tokens: int = 16
    heartbeat: bool = True
    rate_limit_every: int = 0


def _event(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


class MockServer:
    def __init__(self, config: MockConfig) -> None:
        self.config = config
        self.requests = 0
        self.app = web.Application()
        self.app.router.add_post("/client/v4/accounts/{account}/ai/run/{model:.*}", self.workers_ai)
        self.app.router.add_post("/v1/chat/completions", self.chat)
        self.app.router.add_post("/v1/completions", self.completions)
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _limited(self) -> bool:
        self.requests += 1
        every = self.config.rate_limit_every
        return bool(every) and self.requests % every == 0

    async def _stream(
        self, request: web.Request, chunks: list[bytes], prelude: bytes | None, tail: list[bytes]
    ) -> web.StreamResponse:
        t0 = time.perf_counter()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if prelude is not None:
            await resp.write(prelude)
        if self.config.heartbeat:
            await resp.write(b": keep-alive\n\n")
        step = self.config.tokens_per_chunk * self.config.itl_s
        for j, chunk in enumerate(chunks):
            delay = t0 + self.config.ttft_s + j * step - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await resp.write(chunk)
        for t in tail:
            await resp.write(t)
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    def _plan(self, body: dict[str, Any]) -> list[int]:
        wanted = body.get("max_completion_tokens") or body.get("max_tokens")
        n = int(wanted or self.config.default_max_tokens)
        k = self.config.tokens_per_chunk
        return [min(k, n - i) for i in range(0, n, k)]

    async def _whole(self, n: int) -> None:
        await asyncio.sleep(self.config.ttft_s + max(n - 1, 0) * self.config.itl_s)

    async def workers_ai(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if self._limited():
            return web.json_response({"success": False, "errors": [{"code": 3040}]}, status=429)
        plan = self._plan(body)
        usage = {"prompt_tokens": 7, "completion_tokens": sum(plan), "total_tokens": 7 + sum(plan)}
        if not body.get("stream"):
            await self._whole(sum(plan))
            result = {"response": WORD * sum(plan), "usage": usage}
            return web.json_response({"result": result, "success": True, "errors": []})
        chunks = [_event({"response": WORD * k}) for k in plan]
        return await self._stream(request, chunks, None, [_event({"response": "", "usage": usage})])

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._openai(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._openai(request, chat=False)

    async def _openai(self, request: web.Request, chat: bool) -> web.StreamResponse:
        body = await request.json()
        if self._limited():
            return web.json_response({"error": {"message": "slow down"}}, status=429)
        plan = self._plan(body)
        usage = {"prompt_tokens": 7, "completion_tokens": sum(plan), "total_tokens": 7 + sum(plan)}
        if not body.get("stream"):
            await self._whole(sum(plan))
            choice: dict[str, Any] = (
                {"message": {"role": "assistant", "content": WORD * sum(plan)}}
                if chat
                else {"text": WORD * sum(plan)}
            )
            return web.json_response({"choices": [choice], "usage": usage})

        def chunk(text: str) -> bytes:
            c: dict[str, Any] = {"delta": {"content": text}} if chat else {"text": text}
            return _event({"choices": [{"index": 0, **c}]})

        prelude = (
            _event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            if chat
            else None
        )
        include = (body.get("stream_options") or {}).get("include_usage")
        tail = [_event({"choices": [], "usage": usage})] if include else []
        return await self._stream(request, [chunk(WORD * k) for k in plan], prelude, tail)


async def serve_forever(config: MockConfig, host: str, port: int) -> None:
    server = MockServer(config)
    url = await server.start(host, port)
    print(f"mock LLM server at {url}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()
