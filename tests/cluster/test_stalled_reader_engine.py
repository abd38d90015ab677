"""A consumer that stops pulling its stream, against the real vLLM engine (CPU, tiny Qwen2).

What RELIABILITY.md ("A client that stops reading its stream") says about the engine side,
measured on one real `VllmEngine` built the way a replica builds it (`serve.cluster.
compose_replica`: the catalog entry of `batchserve up --profile cpu --model DIR`):

1. while the consumer does not pull, vLLM keeps generating and merges the deltas it
   produces into one pending output per request (delta output kind): on resuming, the rest
   arrives in one or two chunks, not one per token; what is held is bounded by max_tokens;
2. closing the generator (what the gateway's stall watcher does to the body iterator)
   aborts the request: vLLM holds no unfinished request, its scheduler runs none and its
   KV cache usage is back to 0 within seconds (the replica's own `vllm:*` gauges), and
   the next generation works;
3. eight stalled streams at once: process memory before, while stalled and after the
   abort (printed, not asserted; run with `-s`).

The engine runs in this process (AsyncLLM) and its EngineCore child process; signals are
vLLM's own: `AsyncLLM.get_num_unfinished_requests()` (through the `Engine` protocol) and
the Prometheus gauges its stat logger records in this process's default registry
(`vllm:num_requests_running` and `vllm:kv_cache_usage_perc` from the EngineCore's
scheduler, `vllm:generation_tokens_total`), which the replica's /metrics serves. vLLM does
not count a client's abort in `vllm:request_success_total`: that the request was aborted,
not finished, shows as generation stopping short of max_tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable

import psutil
import pytest
import pytest_asyncio
from prometheus_client import REGISTRY

from serve.replica.engine import ChatMessage, GenerateRequest, SamplingOptions, TokenDelta
from serve.replica.vllm_engine import VllmEngine, export_vllm_environment
from serve.settings import QWEN_API_NAME, cpu_catalog
from tests.fixtures.tiny_qwen2 import build_tiny_qwen2

pytestmark = [pytest.mark.cluster, pytest.mark.asyncio(loop_scope="module")]

# Long enough that no request finishes on its own while a test watches it (the tiny model
# makes about 100-1000 tokens/s here), short of the checkpoint's 2048 positions.
LONG = 1800
# The contract: a closed stream's request is gone from the engine this soon.
FREED_WITHIN_S = 5.0
STREAMS = 8
LABELS = {"model_name": QWEN_API_NAME, "engine": "0"}
PROMPTS = ["Tell me about the sea.", "What is a fox?", "Count to ten.", "hello world",
           "Write a story.", "The sky is blue because", "Servers answer requests",
           "Once upon a time"]  # fmt: skip


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[VllmEngine]:
    with pytest.MonkeyPatch.context() as env:
        # What the replica's environment holds (export_vllm_environment would set the
        # last two for good), undone afterwards for the tests that run after this module.
        env.setenv("HF_HUB_OFFLINE", "1")
        env.setenv("TRANSFORMERS_OFFLINE", "1")
        env.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        env.setenv("VLLM_CONFIGURE_LOGGING", "0")
        model_dir = build_tiny_qwen2(tmp_path_factory.mktemp("tiny-qwen2-stall"))
        spec = cpu_catalog(str(model_dir), embedded=False)[0]
        # What compose_replica does, with the cluster tier's KV cache size.
        export_vllm_environment(cpu_kv_cache_gib=1)
        built = VllmEngine(spec)
        try:
            yield built
        finally:
            built.shutdown()
            # AsyncLLM.__del__ shuts down again; left to interpreter exit, vLLM's module
            # globals are gone by then and it prints a TypeError. Collect it now.
            del built._llm
            gc.collect()


def metric(name: str, **extra: str) -> float:
    value = REGISTRY.get_sample_value(name, {**LABELS, **extra})
    assert value is not None, f"vLLM did not record {name}"
    return value


def show(state: dict[str, float]) -> str:
    return (
        f"unfinished={state['unfinished']:.0f} running={state['running']:.0f} "
        f"kv_cache_usage={state['kv_usage'] * 100:.3f}%"
    )


def engine_state(engine: VllmEngine) -> dict[str, float]:
    return {
        "unfinished": float(engine.num_unfinished_requests()),
        "running": metric("vllm:num_requests_running"),
        "kv_usage": metric("vllm:kv_cache_usage_perc"),
    }


async def wait_until(
    what: Callable[[], bool], within_s: float, describe: Callable[[], str]
) -> float:
    start = time.monotonic()
    while not what():
        if time.monotonic() - start > within_s:
            pytest.fail(f"not within {within_s} s: {describe()}")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def wait_freed(engine: VllmEngine) -> float:
    """Seconds until vLLM holds no request and its KV cache is empty."""
    return await wait_until(
        lambda: not any(engine_state(engine).values()),
        FREED_WITHIN_S,
        lambda: f"engine still holds requests: {engine_state(engine)}",
    )


async def request(engine: VllmEngine, rid: str, prompt: str, max_tokens: int) -> GenerateRequest:
    ids = await engine.encode_chat([ChatMessage("user", prompt)])
    return GenerateRequest(rid, ids, SamplingOptions(max_tokens=max_tokens, temperature=0.0))


def stream(engine: VllmEngine, req: GenerateRequest) -> AsyncGenerator[TokenDelta, None]:
    return engine.generate(req)


def rss_mb() -> tuple[float, float]:
    """RSS of this process (AsyncLLM, the replica's side) and of its children (the
    EngineCore process)."""
    me = psutil.Process()
    children = 0
    for child in me.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            children += child.memory_info().rss
    return me.memory_info().rss / 2**20, children / 2**20


async def test_stalled_consumer_gets_the_rest_merged(engine: VllmEngine) -> None:
    max_tokens = 200
    gen = stream(engine, await request(engine, "merge", "Count to ten.", max_tokens))
    first = await anext(gen)
    # The consumer stops pulling; the engine finishes the request without it.
    stalled_s = await wait_until(
        lambda: engine.num_unfinished_requests() == 0,
        60.0,
        lambda: f"request not finished while stalled: {engine_state(engine)}",
    )
    rest = [delta async for delta in gen]
    tokens_after = sum(d.new_tokens for d in rest)
    print(
        f"\nstalled consumer: first chunk {first.new_tokens} token(s); engine finished "
        f"{stalled_s:.2f} s later; after resuming {len(rest)} chunk(s) holding "
        f"{tokens_after} tokens ({len(rest[-1].text) if rest else 0} chars in the last)"
    )
    assert rest, "nothing after resuming"
    assert rest[-1].finish_reason == "length"
    assert first.new_tokens + tokens_after == max_tokens
    # One merged delta, not one per token.
    assert len(rest) <= 2, f"{len(rest)} chunks for {tokens_after} tokens"
    assert tokens_after >= max_tokens // 2


async def test_closing_a_stalled_stream_aborts_and_frees_it(engine: VllmEngine) -> None:
    generated = metric("vllm:generation_tokens_total")
    gen = stream(engine, await request(engine, "abort", "Tell me about the sea.", LONG))
    await anext(gen)
    # Stalled: the request is still generated inside the engine (the gauges are live).
    await wait_until(
        lambda: engine_state(engine)["running"] == 1 and engine_state(engine)["kv_usage"] > 0,
        10.0,
        lambda: f"request not seen running: {engine_state(engine)}",
    )
    await asyncio.sleep(0.5)
    held = engine_state(engine)
    start = time.monotonic()
    await gen.aclose()  # what the stall watcher does, through the body iterator
    close_s = time.monotonic() - start
    freed_s = await wait_freed(engine)
    made = metric("vllm:generation_tokens_total") - generated
    print(
        f"\nclosed stalled stream: held {show(held)}; aclose {close_s * 1000:.1f} ms; freed "
        f"{freed_s:.2f} s after it; {made:.0f} of {LONG} tokens generated"
    )
    # Aborted, not finished on its own.
    assert made < LONG
    # And the engine stopped generating: vLLM's abort reached the EngineCore (client
    # aborts are not counted in vllm:request_success_total, so this is the evidence).
    await asyncio.sleep(0.5)
    assert metric("vllm:generation_tokens_total") - generated == made

    gen = stream(engine, await request(engine, "after", "hello world", 16))
    deltas = [d async for d in gen]
    assert sum(d.new_tokens for d in deltas) == 16
    assert deltas[-1].finish_reason == "length"
    await wait_freed(engine)


async def test_many_stalled_streams_memory(engine: VllmEngine) -> None:
    generated = metric("vllm:generation_tokens_total")
    before = rss_mb()
    gens = [
        stream(engine, await request(engine, f"many-{i}", prompt, LONG))
        for i, prompt in enumerate(PROMPTS[:STREAMS])
    ]
    for gen in gens:
        await anext(gen)
    await wait_until(
        lambda: engine_state(engine)["running"] == STREAMS,
        10.0,
        lambda: f"streams not all running: {engine_state(engine)}",
    )
    await asyncio.sleep(2.0)
    during, held = rss_mb(), engine_state(engine)
    made = metric("vllm:generation_tokens_total") - generated
    start = time.monotonic()
    for gen in gens:
        await gen.aclose()
    freed_s = await wait_freed(engine)
    freed_after_s = time.monotonic() - start
    made_total = metric("vllm:generation_tokens_total") - generated
    assert made_total < STREAMS * LONG
    after = rss_mb()
    print(
        f"\n{STREAMS} stalled streams: held {show(held)}, {made:.0f} tokens generated while "
        f"stalled; freed {freed_after_s:.2f} s after closing ({freed_s:.2f} s after the "
        f"last close)\nRSS MB (this process / EngineCore children): before "
        f"{before[0]:.0f} / {before[1]:.0f}, stalled {during[0]:.0f} / {during[1]:.0f}, "
        f"after abort {after[0]:.0f} / {after[1]:.0f}"
    )
    await asyncio.sleep(0.5)
    assert metric("vllm:generation_tokens_total") - generated == made_total
    # Sane bounds only: nothing here should take gigabytes.
    assert during[0] - before[0] < 1024
    assert 0 < after[0] < 16 * 1024


async def test_the_watchdog_reads_the_real_engines_cpu_time(engine: VllmEngine) -> None:
    """On the CPU backend the health check reads the CPU time of vLLM's own processes
    (serve/replica/engine_processes.py): they are found under this one by their titles,
    and a generation moves the figure."""
    processes = engine._engine_processes
    assert processes is not None  # the CPU backend
    processes.cpu_seconds()  # finds them (or they are already known)
    names = processes.names()
    assert any(n.startswith("VLLM::EngineCore") for n in names), names
    assert any(n.startswith("VLLM::Worker") for n in names), names
    before = processes.cpu_seconds()
    assert before is not None
    async for _ in stream(engine, await request(engine, "cpu", "Tell me about the sea.", 300)):
        pass
    after = processes.cpu_seconds()
    assert after is not None and after - before > 0.05, (before, after)
    await engine.check_health()
