"""`/v1/completions` with OpenAI's four prompt forms: a string, a batch of strings, token
ids, a batch of token-id lists. Choice i of prompt p is choice p*n + i (OpenAI's and
vLLM's order); usage sums every prompt once and every choice's completion."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fastapi import FastAPI

from serve.cluster import build_gateway
from serve.settings import Settings
from tests.fakes import FakeEngine
from tests.gateway.conftest import ACCOUNT, AUTH, MODEL
from tests.gateway.test_observability import scrape, value
from tests.gateway.test_openai import sse_payloads
from tests.gateway.test_tenancy import TOKEN_A, bearer, tenancy_settings, write_tenants

COMPLETIONS = "/v1/completions"


def prompts_seen(engine: FakeEngine) -> list[list[int]]:
    return [list(r.prompt_token_ids) for r in engine.requests]


def ids(text: str) -> list[int]:
    """The fake engine's tokens are characters."""
    return [ord(c) for c in text]


async def test_batch_of_strings(sdk: openai.AsyncOpenAI, engine: FakeEngine) -> None:
    """LangChain's `OpenAI` LLM sends its batch as one request."""
    out = await sdk.completions.create(model=MODEL, prompt=["ab", "cde"], n=2, max_tokens=2, seed=7)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert all(c.text == "one two " and c.finish_reason == "length" for c in out.choices)
    # Choices 0, 1 complete "ab"; 2, 3 complete "cde"; each prompt samples seed, seed+1.
    assert prompts_seen(engine) == [ids("ab"), ids("ab"), ids("cde"), ids("cde")]
    assert [r.sampling.seed for r in engine.requests] == [7, 8, 7, 8]
    assert len({r.request_id for r in engine.requests}) == 4
    assert out.usage is not None
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (5, 8)
    assert out.usage.total_tokens == 13


@pytest.mark.parametrize(
    ("prompt", "sent"),
    [
        ([104, 105], [[104, 105]]),
        ([[1, 2], [3]], [[1, 2], [3]]),
    ],
    ids=["ids", "batch-of-ids"],
)
async def test_token_id_prompts_reach_the_engine_as_ids(
    sdk: openai.AsyncOpenAI, engine: FakeEngine, prompt: list[Any], sent: list[list[int]]
) -> None:
    """lm-evaluation-harness `local-completions` sends token ids, batched or not."""
    out = await sdk.completions.create(model=MODEL, prompt=prompt, max_tokens=3)
    assert prompts_seen(engine) == sent
    assert [c.index for c in out.choices] == list(range(len(sent)))
    assert all(c.text == "one two three " for c in out.choices)
    assert out.usage is not None
    assert out.usage.prompt_tokens == sum(len(p) for p in sent)
    assert out.usage.completion_tokens == 3 * len(sent)


async def test_batch_streams_each_choice_under_its_index(
    sdk: openai.AsyncOpenAI, engine: FakeEngine
) -> None:
    stream = await sdk.completions.create(
        model=MODEL,
        prompt=[[1, 2], [3, 4, 5]],
        n=2,
        max_tokens=3,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    texts = [""] * 4
    finished: list[int] = []
    for chunk in chunks[:-1]:
        (choice,) = chunk.choices
        texts[choice.index] += choice.text
        if choice.finish_reason is not None:
            finished.append(choice.index)
    assert texts == ["one two three "] * 4
    assert sorted(finished) == [0, 1, 2, 3]
    assert prompts_seen(engine) == [[1, 2], [1, 2], [3, 4, 5], [3, 4, 5]]
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (5, 12, 17)


@pytest.mark.parametrize("stream", [False, True])
async def test_over_the_replicas_slots_is_a_400_naming_prompt(
    client: httpx.AsyncClient, engine: FakeEngine, stream: bool
) -> None:
    """prompts x n engine requests are admitted together: over the replica's 4 slots the
    request could never start, so a 429 would have its client retry for ever."""
    body: dict[str, object] = {"model": MODEL, "prompt": ["a"] * 5, "stream": stream}
    for prompt, n in ((["a"] * 5, 1), (["a"] * 3, 2), ([[1]] * 5, 1)):
        body.update(prompt=prompt, n=n)
        r = await client.post(COMPLETIONS, headers=AUTH, json=body)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "prompt"
        assert f"ask for {len(prompt) * n} completions; at most 4" in error["message"]
    assert engine.requests == []
    body.update(prompt=["a"] * 2, n=2)
    r = await client.post(COMPLETIONS, headers=AUTH, json=body)
    assert r.status_code == 200, r.text
    assert len(engine.requests) == 4


@pytest.mark.parametrize(
    "prompt",
    [[-1], [5, 100], [[1], [2, 100]], [2**70]],
    ids=["negative", "vocab-size", "in-a-batch", "huge"],
)
async def test_token_ids_outside_the_vocabulary_are_a_400(
    settings: Settings, prompt: list[Any]
) -> None:
    engine = FakeEngine(vocab_size=100)
    app = build_gateway(settings, engine)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.post(COMPLETIONS, headers=AUTH, json={"model": MODEL, "prompt": prompt})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "prompt"
        assert "out of vocabulary (ids are 0 to 99)" in error["message"]
        assert engine.requests == []
        ok = {"model": MODEL, "prompt": [0, 99], "max_tokens": 1}
        assert (await c.post(COMPLETIONS, headers=AUTH, json=ok)).status_code == 200


@pytest.mark.parametrize(
    ("prompt", "words"),
    [
        ([], "prompt must not be empty"),
        ([[]], "prompt[0] must not be empty"),
        ([[1], []], "prompt[1] must not be empty"),
        (["a", ""], "prompt[1] must not be empty"),
        (["a", 1], "not a mix"),
        ([1, "a"], "not a mix"),
        ([[1], 2], "not a mix"),
        ([[1], "a"], "not a mix"),
        ([1, True], "not a mix"),
    ],
)
async def test_empty_and_mixed_prompts_are_a_400(
    client: httpx.AsyncClient, engine: FakeEngine, prompt: list[Any], words: str
) -> None:
    r = await client.post(COMPLETIONS, headers=AUTH, json={"model": MODEL, "prompt": prompt})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "prompt" and words in error["message"], error
    assert engine.requests == []


async def test_each_prompt_is_checked_against_the_context_window(settings: Settings) -> None:
    engine = FakeEngine(context_window=20)
    app = build_gateway(settings, engine)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        body = {"model": MODEL, "prompt": ["a" * 15, "b" * 15], "max_tokens": 5}
        assert (await c.post(COMPLETIONS, headers=AUTH, json=body)).status_code == 200
        body["prompt"] = ["a" * 15, "b" * 16]
        r = await c.post(COMPLETIONS, headers=AUTH, json=body)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "context_length_exceeded"
        assert "maximum context length is 20 tokens. However, you requested 21" in error["message"]


async def test_echo_and_logprobs_stay_refused_for_batches(client: httpx.AsyncClient) -> None:
    for extra in ({"echo": True}, {"logprobs": 1}):
        body = {"model": MODEL, "prompt": [[1], [2]], **extra}
        r = await client.post(COMPLETIONS, headers=AUTH, json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] in extra


async def test_raw_stream_frames_of_a_batch(client: httpx.AsyncClient) -> None:
    body = {"model": MODEL, "prompt": ["x", "y", "z"], "max_tokens": 1, "stream": True}
    r = await client.post(
        f"/client/v4/accounts/{ACCOUNT}/ai/v1/completions", headers=AUTH, json=body
    )
    assert r.status_code == 200, r.text
    events = sse_payloads(r.text)
    texts = ["", "", ""]
    for event in events:
        choices: Any = event["choices"]
        (choice,) = choices
        texts[choice["index"]] += choice["text"]
    assert texts == ["one "] * 3


@pytest.fixture
async def plan_client(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """Tenant a's plan: 10,000 tokens a minute, 3 requests in flight; 8 engine slots."""
    tenants = tmp_path / "tenants.yaml"
    write_tenants(tenants, tokens_per_minute=10_000, max_concurrent_streams=3)
    settings = tenancy_settings(tmp_path, tenants, max_inflight_per_replica=8)
    app: FastAPI = build_gateway(settings, FakeEngine(reply="one two three four"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        yield c


async def test_tenant_limits_count_the_whole_batch(plan_client: httpx.AsyncClient) -> None:
    """The admission reserves every prompt once and max_tokens per choice; the usage
    record and the settled count hold every prompt's and choice's tokens."""
    since = time.time() - 1
    body = {"model": MODEL, "prompt": ["ab", "cde"], "n": 1, "max_tokens": 3}
    r = await plan_client.post(COMPLETIONS, headers=bearer(TOKEN_A), json=body)
    assert r.status_code == 200, r.text
    # Reserved at admission: 2 + 3 prompt tokens, 2 x 3 completion tokens.
    assert r.headers["x-ratelimit-remaining-tokens"] == str(10_000 - 11)
    assert r.json()["usage"]["prompt_tokens"] == 5
    r = await plan_client.get(
        "/client/v4/accounts/acct-a/ai/usage",
        headers=bearer(TOKEN_A),
        params={"since": str(since)},
    )
    (model,) = r.json()["result"]["models"]
    assert (model["requests"], model["prompt_tokens"], model["completion_tokens"]) == (1, 5, 6)


async def test_over_the_plans_concurrent_requests_is_a_400(plan_client: httpx.AsyncClient) -> None:
    """A plan allowing 3 requests in flight can never admit 4 choices at once: a 400 (naming
    `prompt` for a batch, `n` for one prompt), not a 429 that would never clear."""
    body: dict[str, object] = {"model": MODEL, "prompt": ["a", "b"], "n": 2}
    r = await plan_client.post(COMPLETIONS, headers=bearer(TOKEN_A), json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "prompt"
    assert "at most 3 per request" in r.json()["error"]["message"]
    body.update(prompt="a", n=4)
    r = await plan_client.post(COMPLETIONS, headers=bearer(TOKEN_A), json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "n"
    assert r.json()["error"]["message"].endswith("n must be <= 3")
    body.update(prompt=["a", "b", "c"], n=1, max_tokens=1)
    assert (await plan_client.post(COMPLETIONS, headers=bearer(TOKEN_A), json=body)).is_success


async def test_openapi_documents_the_four_prompt_forms(client: httpx.AsyncClient) -> None:
    doc = (await client.get("/openapi.json")).json()
    for path in ("/v1/completions", "/client/v4/accounts/{account_id}/ai/v1/completions"):
        body = doc["paths"][path]["post"]["requestBody"]
        prompt = body["content"]["application/json"]["schema"]["properties"]["prompt"]
        forms = [(f["type"], f.get("items", {}).get("type")) for f in prompt["anyOf"]]
        assert forms == [
            ("string", None),
            ("array", "string"),
            ("array", "integer"),
            ("array", "array"),
        ]
        assert "p*n" in prompt["description"] and "batch" in body["description"]


async def test_metrics_count_every_prompt_once(client: httpx.AsyncClient) -> None:
    body = {"model": MODEL, "prompt": ["ab", "cde"], "n": 2, "max_tokens": 2}
    r = await client.post(COMPLETIONS, headers=AUTH, json=body)
    assert r.status_code == 200, r.text
    m = await scrape(client)
    assert value(m, "batchserve_prompt_tokens_total", dialect="openai") == 5
    assert value(m, "batchserve_generated_tokens_total", dialect="openai") == 8
