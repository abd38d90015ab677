"""A second opinion: vLLM's own benchmark client (`vllm.benchmarks`) against ours, on the same
OpenAI-compatible server, same prompts, same concurrency, interleaved bursts.

Both force the output length (`ignore_eos`), so both count the same tokens. vLLM's request
function stamps TTFT on the first chunk with `choices` (even an empty role chunk); ours on the
first content-bearing chunk, so ours may read a little higher; our time to first byte is
reported next to theirs to show it.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import aiohttp

from loadtest import client
from loadtest.metrics import summarize
from loadtest.schedule import ClosedLoop
from loadtest.targets import Target
from loadtest.workloads import Session


async def _vllm_burst(
    target: Target, sessions: list[Session], concurrency: int
) -> dict[str, float]:
    from vllm.benchmarks.lib.endpoint_request_func import (
        RequestFuncInput,
        async_request_openai_chat_completions,
    )

    sem = asyncio.Semaphore(concurrency)
    url = f"{target.base_url.rstrip('/')}/v1/chat/completions"

    async def one(http: aiohttp.ClientSession, s: Session) -> Any:
        turn = s.turns[0]
        inp = RequestFuncInput(
            prompt=turn.text,
            api_url=url,
            prompt_len=turn.prompt_tokens,
            output_len=turn.max_tokens,
            model=target.model,
            ignore_eos=True,
        )
        async with sem:
            return await async_request_openai_chat_completions(inp, http)

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, read_bufsize=client.READ_BUFSIZE) as http:
        t0 = time.perf_counter()
        outs = await asyncio.gather(*(one(http, s) for s in sessions))
        wall = time.perf_counter() - t0
    ok = [o for o in outs if o.success]
    return {
        "completed": len(ok),
        "output_token_throughput_tps": sum(o.output_tokens for o in ok) / wall,
        "ttft_p50_ms": statistics.median(o.ttft for o in ok) * 1e3 if ok else float("nan"),
    }


def crosscheck(
    target: Target, sessions: list[Session], concurrency: int, rounds: int = 5
) -> dict[str, Any]:
    forced = Target(target.base_url, target.dialect, target.model, target.token,
                    target.account, force_output=True)  # fmt: skip
    ours: list[dict[str, float]] = []
    theirs: list[dict[str, float]] = []
    for _ in range(rounds):
        out = client.run(forced, sessions, ClosedLoop(concurrency), timeout_s=600)
        s = summarize(out.results)
        ours.append({"completed": s["completed"],
                     "output_token_throughput_tps": s["output_token_throughput_tps"],
                     "ttft_p50_ms": s["ms"]["ttft"]["p50"],
                     "ttfb_p50_ms": s["ms"]["ttfb"]["p50"]})  # fmt: skip
        theirs.append(client.run_on_fast_loop(_vllm_burst(target, sessions, concurrency)))

    def med(xs: list[dict[str, float]], k: str) -> float:
        return statistics.median(x[k] for x in xs)

    tps_ratio = med(ours, "output_token_throughput_tps") / med(
        theirs, "output_token_throughput_tps"
    )
    ttft_ratio = med(ours, "ttft_p50_ms") / med(theirs, "ttft_p50_ms")
    ttfb_ratio = med(ours, "ttfb_p50_ms") / med(theirs, "ttft_p50_ms")
    return {
        "concurrency": concurrency,
        "requests": len(sessions),
        "ours": ours,
        "vllm_bench": theirs,
        "throughput_ratio": tps_ratio,
        "ttft_p50_ratio": ttft_ratio,
        "our_ttfb_p50_vs_their_ttft_p50": ttfb_ratio,
        "within_10_percent": abs(tps_ratio - 1) <= 0.1 and abs(ttft_ratio - 1) <= 0.1,
    }
