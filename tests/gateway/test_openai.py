"""The OpenAI dialect, in process: raw HTTP and the official `openai` SDK, both prefixes."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from fastapi import FastAPI
from openai.types.chat import ChatCompletionMessageParam

from serve.cluster import build_gateway
from serve.settings import Settings
from tests.fakes import FakeEngine
from tests.gateway.conftest import ACCOUNT, AUTH, MODEL, PREFIXES, TOKEN

CHAT = "/v1/chat/completions"
HI: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def sdk_with_key(app: FastAPI, key: str) -> tuple[openai.AsyncOpenAI, httpx.AsyncClient]:
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    return openai.AsyncOpenAI(
        base_url="http://test/v1",
        api_key=key,
        http_client=http,  # type: ignore[arg-type]
        max_retries=0,
    ), http


async def until_running(engine: FakeEngine, count: int) -> None:
    for _ in range(1000):
        if len(engine.running) >= count:
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"{count} requests never ran at once")


def sse_payloads(body: str) -> list[dict[str, object]]:
    frames = [f for f in body.split("\n\n") if f]
    assert all(f.startswith("data: ") for f in frames), frames
    assert frames[-1] == "data: [DONE]"
    return [json.loads(f[len("data: ") :]) for f in frames[:-1]]


# -- the SDK ------------------------------------------------------------------------------


async def test_chat_non_streaming(sdk: openai.AsyncOpenAI) -> None:
    out = await sdk.chat.completions.create(model=MODEL, messages=HI, max_tokens=3)
    assert out.object == "chat.completion"
    assert out.id.startswith("chatcmpl-")
    assert out.model == MODEL
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == "one two three "
    assert out.choices[0].finish_reason == "length"
    assert out.usage is not None
    assert out.usage.completion_tokens == 3
    assert out.usage.total_tokens == out.usage.prompt_tokens + 3


async def test_chat_streaming_equals_non_streaming(sdk: openai.AsyncOpenAI) -> None:
    plain = await sdk.chat.completions.create(model=MODEL, messages=HI, max_tokens=5, temperature=0)
    stream = await sdk.chat.completions.create(
        model=MODEL,
        messages=HI,
        max_tokens=5,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].object == "chat.completion.chunk"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content == "one two three four five "
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])


async def test_streaming_without_include_usage_has_no_usage_chunk(
    sdk: openai.AsyncOpenAI,
) -> None:
    stream = await sdk.chat.completions.create(
        model=MODEL,
        messages=HI,
        max_tokens=2,
        stream=True,
    )
    chunks = [chunk async for chunk in stream]
    assert all(c.choices for c in chunks)
    assert all(c.usage is None for c in chunks)


async def test_completions(sdk: openai.AsyncOpenAI, engine: FakeEngine) -> None:
    out = await sdk.completions.create(model=MODEL, prompt="abc", max_tokens=2)
    assert out.object == "text_completion"
    assert out.choices[0].text == "one two "
    # A completion is the raw prompt: no chat template.
    assert list(engine.requests[-1].prompt_token_ids) == [ord(c) for c in "abc"]
    stream = await sdk.completions.create(model=MODEL, prompt=["abc"], max_tokens=2, stream=True)
    assert "".join([c.choices[0].text async for c in stream]) == "one two "


async def test_models(sdk: openai.AsyncOpenAI) -> None:
    listed = [m.id async for m in sdk.models.list()]
    assert listed == [MODEL]
    model = await sdk.models.retrieve(MODEL)
    assert model.id == MODEL and model.object == "model"
    with pytest.raises(openai.NotFoundError) as caught:
        await sdk.models.retrieve("@cf/meta/nope")
    assert caught.value.code == "model_not_found"


@pytest.mark.parametrize("prefix", PREFIXES, ids=["v1", "account"])
async def test_models_trailing_slash_is_the_listing(client: httpx.AsyncClient, prefix: str) -> None:
    r = await client.get(f"{prefix}/models/", headers=AUTH)
    assert r.status_code == 200, r.text
    assert [m["id"] for m in r.json()["data"]] == [MODEL]


async def test_n_choices(sdk: openai.AsyncOpenAI, engine: FakeEngine) -> None:
    out = await sdk.chat.completions.create(
        model=MODEL,
        messages=HI,
        max_tokens=2,
        n=2,
        seed=7,
    )
    assert [c.index for c in out.choices] == [0, 1]
    assert all(c.message.content == "one two " for c in out.choices)
    assert out.usage is not None and out.usage.completion_tokens == 4
    assert [r.sampling.seed for r in engine.requests[-2:]] == [7, 8]
    assert len({r.request_id for r in engine.requests[-2:]}) == 2

    stream = await sdk.chat.completions.create(
        model=MODEL,
        messages=HI,
        max_tokens=2,
        n=2,
        stream=True,
    )
    texts = ["", ""]
    roles = [0, 0]
    async for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            roles[choice.index] += choice.delta.role == "assistant"
    assert texts == ["one two ", "one two "]
    assert roles == [1, 1]


async def test_stop(sdk: openai.AsyncOpenAI, engine: FakeEngine) -> None:
    out = await sdk.chat.completions.create(
        model=MODEL,
        messages=HI,
        stop="thr",
        max_tokens=6,
    )
    assert out.choices[0].message.content == "one two "
    assert out.choices[0].finish_reason == "stop"
    await sdk.completions.create(model=MODEL, prompt="x", stop=["a", "b"], max_tokens=1)
    assert engine.requests[-1].sampling.stop == ("a", "b")


async def test_json_schema_reaches_engine(sdk: openai.AsyncOpenAI, engine: FakeEngine) -> None:
    schema: dict[str, object] = {"type": "object", "properties": {"answer": {"type": "string"}}}
    out = await sdk.chat.completions.create(
        model=MODEL,
        messages=HI,
        max_tokens=8,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "a", "schema": schema, "strict": True},
        },
    )
    assert engine.requests[-1].sampling.json_schema == schema
    assert json.loads(out.choices[0].message.content or "") == {"answer": "fake"}
    await sdk.chat.completions.create(
        model=MODEL,
        messages=HI,
        max_tokens=8,
        response_format={"type": "json_object"},
    )
    sampling = engine.requests[-1].sampling
    assert sampling.json_object and sampling.json_schema is None
    await sdk.chat.completions.create(
        model=MODEL,
        messages=HI,
        max_tokens=1,
        response_format={"type": "text"},
    )
    sampling = engine.requests[-1].sampling
    assert not sampling.json_object and sampling.json_schema is None


async def test_bad_request_names_param(sdk: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.chat.completions.create(model=MODEL, messages=HI, temperature=3)
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["param"] == "temperature" and body["type"] == "invalid_request_error"


async def test_authentication_errors(app: FastAPI, client: httpx.AsyncClient) -> None:
    bad, http = sdk_with_key(app, "wrong")
    async with http:
        with pytest.raises(openai.AuthenticationError):
            await bad.models.list()
        with pytest.raises(openai.AuthenticationError) as caught:
            await bad.chat.completions.create(model=MODEL, messages=HI)
        assert caught.value.code == "invalid_api_key"
    # No key at all is a 401 too on the OpenAI routes (a 400/9106 on Workers AI's).
    r = await client.post(CHAT, json={"model": MODEL, "messages": HI})
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "invalid_request_error"


async def test_unknown_model(sdk: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await sdk.chat.completions.create(model="@cf/meta/nope", messages=HI)
    assert caught.value.code == "model_not_found"
    body = caught.value.body
    assert isinstance(body, dict) and body["param"] == "model"


async def test_rate_limited_when_full(app: FastAPI, engine: FakeEngine) -> None:
    engine.delay_s = 0.05
    client, http = sdk_with_key(app, TOKEN)
    async with http:
        slow = [
            asyncio.create_task(
                client.chat.completions.create(model=MODEL, messages=HI, max_tokens=8)
            )
            for _ in range(4)
        ]
        await until_running(engine, 4)
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model=MODEL, messages=HI, max_tokens=1)
        assert caught.value.response.headers["retry-after"] == "1"
        assert caught.value.code == "rate_limit_exceeded"
        await asyncio.gather(*slow)
        assert engine.running == set()


async def test_n_over_capacity_refused(app: FastAPI, engine: FakeEngine) -> None:
    """n choices take n slots: with 3 of 4 busy, n=2 does not fit."""
    engine.delay_s = 0.05
    client, http = sdk_with_key(app, TOKEN)
    async with http:
        busy = [
            asyncio.create_task(
                client.chat.completions.create(model=MODEL, messages=HI, max_tokens=8)
            )
            for _ in range(3)
        ]
        await until_running(engine, 3)
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model=MODEL, messages=HI, n=2, max_tokens=1)
        await asyncio.gather(*busy)


async def test_context_window(settings: Settings) -> None:
    app = build_gateway(settings, FakeEngine(reply="w " * 20, context_window=100))
    client, http = sdk_with_key(app, TOKEN)
    async with http:
        # "<user>" + "x"*50 + "<assistant>" is 67 prompt tokens.
        messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "x" * 50}]
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=33,
            stream=True,
        )
        assert [c async for c in stream]
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(
                model=MODEL,
                messages=messages,
                max_tokens=34,
                stream=True,
            )
        assert caught.value.code == "context_length_exceeded"
        assert "is 100 tokens" in caught.value.message and "101 tokens" in caught.value.message
        # Non-streaming: the cap (8) applies first, so a huge max_tokens still fits.
        out = await client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=10_000,
        )
        assert out.choices[0].finish_reason == "length"


async def test_context_window_message_is_openais(settings: Settings) -> None:
    """LiteLLM (its `openai/` and `cloudflare/` providers) raises ContextWindowExceededError,
    which its context-window fallbacks and the apps that trim history catch, only when the
    error's text reads like OpenAI's or vLLM's ("This model's maximum context length is N
    tokens"): the code alone is not looked at. The Workers AI route keeps Cloudflare's 5021
    text. The request is the one LiteLLM sends."""
    app = build_gateway(settings, FakeEngine(context_window=100))
    transport = httpx.ASGITransport(app=app)
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "word " * 30}],
        "max_tokens": 100,
    }
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        for prefix in PREFIXES:
            for stream in (False, True):
                r = await http.post(
                    f"{prefix}/chat/completions", json={**body, "stream": stream}, headers=AUTH
                )
                assert r.status_code == 400, r.text
                error = r.json()["error"]
                assert error["code"] == "context_length_exceeded"
                # "<user>" + 150 characters + "<assistant>" = 167 prompt tokens, + 100
                # (+ 8, the non-streaming cap of these settings).
                assert "this model's maximum context length is 100 tokens" in (
                    error["message"].lower()
                ), error
                requested = 267 if stream else 175
                assert f"you requested {requested} tokens" in error["message"], error
        r = await http.post(
            f"/client/v4/accounts/{ACCOUNT}/ai/run/{MODEL}",
            json={"prompt": "word " * 30, "max_tokens": 100},
            headers=AUTH,
        )
        assert r.status_code == 413
        assert r.json()["errors"][0] == {
            "code": 5021,
            "message": "AiError: The estimated number of input and maximum output tokens "
            "(175) exceeded this model context window limit (100).",
        }


async def test_non_stream_cap(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    for prefix in PREFIXES:
        r = await client.post(
            f"{prefix}/chat/completions",
            headers=AUTH,
            json={"model": MODEL, "messages": HI, "max_completion_tokens": 100},
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 8
        assert r.headers["x-batchserve-max-tokens-cap"] == "8"
    # Streams are not capped.
    r = await client.post(
        CHAT, headers=AUTH, json={"model": MODEL, "messages": HI, "max_tokens": 100, "stream": True}
    )
    assert engine.requests[-1].sampling.max_tokens == 100
    assert "x-batchserve-max-tokens-cap" not in r.headers


# -- raw HTTP -----------------------------------------------------------------------------


async def test_raw_stream_frames(client: httpx.AsyncClient) -> None:
    r = await client.post(
        CHAT,
        headers=AUTH,
        json={
            "model": MODEL,
            "messages": HI,
            "max_tokens": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cf-ai-req-id"]
    events = sse_payloads(r.text)
    first = events[0]["choices"][0]  # type: ignore[index]
    assert first["delta"] == {"role": "assistant", "content": ""}
    assert len({e["id"] for e in events}) == 1
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 2  # type: ignore[index]


async def test_engine_failure_mid_stream(
    sdk: openai.AsyncOpenAI, client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    engine.fail_after = 2
    r = await client.post(CHAT, headers=AUTH, json={"model": MODEL, "messages": HI, "stream": True})
    events = sse_payloads(r.text)
    assert events[-1]["error"]["type"] == "server_error"  # type: ignore[index]
    stream = await sdk.chat.completions.create(
        model=MODEL,
        messages=HI,
        stream=True,
    )
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass


async def test_engine_failure_with_n(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.fail_after = 1
    r = await client.post(CHAT, headers=AUTH, json={"model": MODEL, "messages": HI, "n": 2})
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "server_error"
    assert engine.running == set()


async def test_foreign_account_forbidden(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/client/v4/accounts/other/ai/v1/chat/completions",
        headers=AUTH,
        json={"model": MODEL, "messages": HI},
    )
    assert r.status_code == 403
    assert r.json()["error"]["type"] == "permission_error"


async def test_content_parts_and_developer_role(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    messages = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]
    r = await client.post(
        CHAT, headers=AUTH, json={"model": MODEL, "messages": messages, "max_tokens": 1}
    )
    assert r.status_code == 200, r.text
    expected = "<system>be brief<user>a\nb<assistant>"  # joined as vLLM joins them
    assert list(engine.requests[-1].prompt_token_ids) == [ord(c) for c in expected]


@pytest.mark.parametrize("path", [CHAT, "/v1/completions"])
async def test_vllm_sampling_extensions_reach_the_engine(
    client: httpx.AsyncClient, engine: FakeEngine, path: str
) -> None:
    """`top_k` and `repetition_penalty`, as vLLM's OpenAI server takes them (not ignored)."""
    base: dict[str, object] = {"model": MODEL, "max_tokens": 1}
    base["messages" if path == CHAT else "prompt"] = HI if path == CHAT else "a"
    extra = {"top_k": 5, "repetition_penalty": 1.3}
    r = await client.post(path, headers=AUTH, json={**base, **extra})
    assert r.status_code == 200, r.text
    sampling = engine.requests[-1].sampling
    assert (sampling.top_k, sampling.repetition_penalty) == (5, 1.3)
    r = await client.post(path, headers=AUTH, json={**base, "top_k": -1})
    assert r.status_code == 200, r.text
    assert engine.requests[-1].sampling.top_k is None  # -1: no top-k, as in vLLM


async def test_unknown_keys_ignored(client: httpx.AsyncClient) -> None:
    body = {"model": MODEL, "messages": HI, "max_tokens": 1, "tools": None, "whatever": {"x": 1}}
    body |= {"logit_bias": {}}  # an empty bias asks for nothing
    assert (await client.post(CHAT, headers=AUTH, json=body)).status_code == 200


@pytest.mark.parametrize(
    ("path", "extra", "param"),
    [
        (CHAT, {"temperature": 2.5}, "temperature"),
        (CHAT, {"temperature": "0.5"}, "temperature"),
        (CHAT, {"max_tokens": True}, "max_tokens"),
        (CHAT, {"max_tokens": 0}, "max_tokens"),
        (CHAT, {"top_p": 1.5}, "top_p"),
        (CHAT, {"frequency_penalty": -3}, "frequency_penalty"),
        (CHAT, {"presence_penalty": 2.5}, "presence_penalty"),
        (CHAT, {"n": 0}, "n"),
        (CHAT, {"n": 9}, "n"),
        (CHAT, {"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        (CHAT, {"stop": ""}, "stop"),
        (CHAT, {"logprobs": True}, "logprobs"),
        (CHAT, {"top_logprobs": 2}, "top_logprobs"),
        # Not wired through the engine: a ban must not be silently ignored.
        (CHAT, {"logit_bias": {"7042": -100}}, "logit_bias"),
        ("/v1/completions", {"prompt": "a", "logit_bias": {"1": 5}}, "logit_bias"),
        (CHAT, {"top_k": -2}, "top_k"),
        (CHAT, {"top_k": 2**64}, "top_k"),  # past what the engine's wire carries
        (CHAT, {"repetition_penalty": 0}, "repetition_penalty"),
        (CHAT, {"messages": []}, "messages"),
        # Tool calls are not supported: forcing one must not quietly answer in plain text.
        (CHAT, {"tools": [TOOL], "tool_choice": "required"}, "tool_choice"),
        (
            CHAT,
            {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "f"}}},
            "tool_choice",
        ),
        (CHAT, {"tool_choice": "sometimes"}, "tool_choice"),
        (CHAT, {"functions": [TOOL["function"]], "function_call": {"name": "f"}}, "function_call"),
        # Only an assistant message may have null (or no) content.
        (CHAT, {"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
        (CHAT, {"messages": [{"role": "system", "content": None}, *HI]}, "messages[0].content"),
        (CHAT, {"messages": [*HI, {"role": "tool"}]}, "messages[1].content"),
        (CHAT, {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        (CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        (
            CHAT,
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content[0]",
        ),
        (CHAT, {"response_format": {"type": "xml"}}, "response_format.type"),
        (CHAT, {"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        (CHAT, {"model": 5}, "model"),
        ("/v1/completions", {"prompt": ["a", 1]}, "prompt"),
        ("/v1/completions", {"prompt": []}, "prompt"),
        ("/v1/completions", {"prompt": ""}, "prompt"),
        ("/v1/completions", {"prompt": "a", "logprobs": 1}, "logprobs"),
        ("/v1/completions", {"prompt": "a", "echo": True}, "echo"),
        ("/v1/completions", {"prompt": "a", "best_of": 2}, "best_of"),
    ],
)
async def test_bad_input(
    client: httpx.AsyncClient, path: str, extra: dict[str, object], param: str
) -> None:
    base: dict[str, object] = {"model": MODEL}
    base["messages" if path == CHAT else "prompt"] = HI if path == CHAT else "a"
    r = await client.post(path, headers=AUTH, json={**base, **extra})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    assert error["message"]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop: at most 4 entries, got 5"),
        ({"messages": []}, "messages: at least 1 entry, got 0"),
    ],
)
async def test_union_errors_name_the_real_fault(
    client: httpx.AsyncClient, extra: dict[str, object], message: str
) -> None:
    r = await client.post(CHAT, headers=AUTH, json={"model": MODEL, "messages": HI, **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"] == f"Bad input: {message}"  # no "AiError: " here


async def test_tools_without_a_forced_call_are_plain_text(client: httpx.AsyncClient) -> None:
    messages = [*HI, {"role": "assistant", "content": None}, {"role": "user", "content": "and?"}]
    for choice in (None, "auto", "none"):
        body = {"model": MODEL, "messages": messages, "tools": [TOOL], "tool_choice": choice}
        r = await client.post(CHAT, headers=AUTH, json={**body, "max_tokens": 1})
        assert r.status_code == 200, r.text


async def test_invalid_json(client: httpx.AsyncClient) -> None:
    r = await client.post(CHAT, headers=AUTH, content=b"{nope")
    assert r.status_code == 400
    assert "Invalid JSON" in r.json()["error"]["message"]


async def test_workers_ai_response_format_extension(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    run = f"/client/v4/accounts/{ACCOUNT}/ai/run/{MODEL}"
    schema = {"type": "object"}
    body = {"prompt": "hi", "response_format": {"type": "json_schema", "json_schema": schema}}
    r = await client.post(run, headers=AUTH, json=body)
    assert r.status_code == 200, r.text
    assert engine.requests[-1].sampling.json_schema == schema
    assert json.loads(r.json()["result"]["response"]) == {"answer": "fake"}
    body = {"prompt": "hi", "response_format": {"type": "json_object"}}
    assert (await client.post(run, headers=AUTH, json=body)).status_code == 200
    assert engine.requests[-1].sampling.json_object


@pytest.mark.parametrize("path", [CHAT, "/v1/completions"])
async def test_null_n_and_stream_mean_their_defaults(
    client: httpx.AsyncClient, engine: FakeEngine, path: str
) -> None:
    """OpenAI documents `n` and `stream` as "or null"; clients that serialise every unset
    field send null for them."""
    prompt: dict[str, object] = (
        {"messages": [{"role": "user", "content": "hi"}]} if path == CHAT else {"prompt": "hi"}
    )
    body = {"model": MODEL, **prompt, "n": None, "stream": None, "max_tokens": 3}
    r = await client.post(path, headers=AUTH, json=body)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    assert len(r.json()["choices"]) == 1 and len(engine.requests) == 1


async def test_stream_options_without_stream_is_refused(client: httpx.AsyncClient) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "stream_options": {"include_usage": True},
    }
    r = await client.post(CHAT, headers=AUTH, json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "stream_options" and "only allowed when 'stream'" in error["message"]
    body["stream_options"] = None  # null is no option at all
    assert (await client.post(CHAT, headers=AUTH, json=body)).status_code == 200


@pytest.mark.parametrize("stream", [False, True])
async def test_n_beyond_the_replicas_slots_is_a_400_not_a_429(
    client: httpx.AsyncClient, engine: FakeEngine, stream: bool
) -> None:
    """All n choices must hold an engine slot at once: an n above the replica's slots (4
    here) could never be admitted, so a 429 would have its client retry for ever."""
    body = {"model": MODEL, "messages": HI, "n": 5, "stream": stream}
    r = await client.post(CHAT, headers=AUTH, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "n"
    assert "n must be <= 4" in r.json()["error"]["message"]
    assert engine.requests == []
    body["n"] = 4
    assert (await client.post(CHAT, headers=AUTH, json=body)).status_code == 200
