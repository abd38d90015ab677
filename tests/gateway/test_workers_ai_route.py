from __future__ import annotations

import json

import httpx

from serve.cluster import build_gateway
from serve.settings import Settings
from tests.fakes import FakeEngine
from tests.gateway.conftest import ACCOUNT, AUTH, MODEL, RUN_URL


def sse_events(body: str) -> list[str]:
    assert body.endswith("\n\n")
    frames = body.split("\n\n")[:-1]
    assert all(f.startswith("data: ") for f in frames), frames
    return [f[len("data: ") :] for f in frames]


async def test_non_streaming_envelope(client: httpx.AsyncClient) -> None:
    r = await client.post(RUN_URL, headers=AUTH, content=b'{"prompt": "hi", "max_tokens": 3}')
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert list(body) == ["result", "success", "errors", "messages"]
    assert body["success"] is True and body["errors"] == [] and body["messages"] == []
    assert body["result"]["response"] == "one two three "
    assert body["result"]["usage"]["completion_tokens"] == 3
    usage = body["result"]["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + 3
    assert body["result"]["finish_reason"] == "length"
    assert r.headers["x-request-id"] == r.headers["cf-ray"]
    assert r.headers["cf-ai-req-id"]


async def test_streaming_frames(client: httpx.AsyncClient) -> None:
    r = await client.post(
        RUN_URL,
        headers=AUTH,
        json={"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 4},
    )
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/event-stream"
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    payloads = [json.loads(e) for e in events[:-1]]
    assert all(isinstance(p["response"], str) for p in payloads)
    assert "".join(p["response"] for p in payloads) == "one two three four "
    assert payloads[-1]["response"] == ""
    assert payloads[-1]["usage"]["completion_tokens"] == 4


async def test_stream_equals_non_stream(client: httpx.AsyncClient) -> None:
    body = {"prompt": "hi", "max_tokens": 5, "temperature": 0}
    plain = (await client.post(RUN_URL, headers=AUTH, json=body)).json()["result"]["response"]
    streamed = await client.post(RUN_URL, headers=AUTH, json={**body, "stream": True})
    text = "".join(json.loads(e)["response"] for e in sse_events(streamed.text)[:-1])
    assert text == plain


async def test_body_without_content_type_is_json(client: httpx.AsyncClient) -> None:
    r = await client.post(
        RUN_URL,
        headers={**AUTH, "Content-Type": "application/x-www-form-urlencoded"},
        content=b'{"prompt": "hi", "stop": null, "tools": null}',
    )
    assert r.status_code == 200, r.text


async def test_no_content_type_and_unknown_query_parameters(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    r = await client.post(
        RUN_URL,
        params={"stream": "true", "max_tokens": "1", "utm": "x"},
        headers=AUTH,
        content=b'{"prompt": "hi", "max_tokens": 2}',
    )
    assert "content-type" not in r.request.headers
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"  # the query's stream is ignored
    assert engine.requests[-1].sampling.max_tokens == 2


async def test_defaults_applied(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    await client.post(RUN_URL, headers=AUTH, json={"prompt": "hi", "stream": True})
    sampling = engine.requests[-1].sampling
    assert sampling.max_tokens == 256
    assert sampling.temperature == 0.6


async def test_vllm_illegal_values_mapped(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    body = {"prompt": "hi", "top_p": 0, "repetition_penalty": 0, "max_tokens": 1}
    assert (await client.post(RUN_URL, headers=AUTH, json=body)).status_code == 200
    sampling = engine.requests[-1].sampling
    assert 0 < sampling.top_p <= 1 and sampling.repetition_penalty > 0
    body = {"prompt": "hi", "top_p": 2, "max_tokens": 1}
    assert (await client.post(RUN_URL, headers=AUTH, json=body)).status_code == 200
    assert engine.requests[-1].sampling.top_p == 1.0
    body = {"prompt": "hi", "temperature": 5, "max_tokens": 1}
    assert (await client.post(RUN_URL, headers=AUTH, json=body)).status_code == 200
    assert engine.requests[-1].sampling.temperature == 2.0


async def test_non_stream_cap_clamps_and_says_so(client: httpx.AsyncClient) -> None:
    r = await client.post(RUN_URL, headers=AUTH, json={"prompt": "hi", "max_tokens": 100})
    body = r.json()
    assert r.status_code == 200
    assert body["result"]["usage"]["completion_tokens"] == 8
    assert body["result"]["finish_reason"] == "length"
    assert "stream" in body["messages"][0]["message"]


async def test_stream_not_clamped(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    r = await client.post(
        RUN_URL, headers=AUTH, json={"prompt": "hi", "max_tokens": 100, "stream": True}
    )
    assert r.status_code == 200
    assert engine.requests[-1].sampling.max_tokens == 100


async def test_context_window(settings: Settings) -> None:
    app = build_gateway(settings, FakeEngine(context_window=100))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        # "x"*50 with the fake template is 67 prompt tokens.
        body = {"prompt": "x" * 50, "max_tokens": 33, "stream": True}
        assert (await c.post(RUN_URL, headers=AUTH, json=body)).status_code == 200
        r = await c.post(RUN_URL, headers=AUTH, json={**body, "max_tokens": 34})
        assert r.status_code == 413
        err = r.json()["errors"][0]
        assert err["code"] == 5021
        assert "(101)" in err["message"] and "(100)" in err["message"]
        # Non-streaming: the cap (8) applies first, so a huge max_tokens still fits.
        r = await c.post(RUN_URL, headers=AUTH, json={"prompt": "x" * 50, "max_tokens": 10_000})
        assert r.status_code == 200


async def test_raw_prompt_verbatim(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    await client.post(RUN_URL, headers=AUTH, json={"prompt": "abc", "raw": True, "max_tokens": 1})
    assert list(engine.requests[-1].prompt_token_ids) == [ord(c) for c in "abc"]
    await client.post(RUN_URL, headers=AUTH, json={"prompt": "abc", "max_tokens": 1})
    assert list(engine.requests[-1].prompt_token_ids) == [ord(c) for c in "<user>abc<assistant>"]


async def test_cache_salt_per_tenant(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    await client.post(RUN_URL, headers=AUTH, json={"prompt": "abc", "max_tokens": 1})
    assert engine.requests[-1].cache_salt == "tenant:t1"


async def test_engine_failure_mid_stream(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.fail_after = 2
    r = await client.post(RUN_URL, headers=AUTH, json={"prompt": "hi", "stream": True})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["response"] == "" and last["errors"][0]["code"] == 3008


async def test_engine_failure_before_first_byte_is_envelope(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    engine.fail_after = 0
    r = await client.post(RUN_URL, headers=AUTH, json={"prompt": "hi"})
    assert r.status_code == 500
    assert r.json()["errors"][0]["code"] == 3008
    assert r.json()["result"] == {}


async def test_client_request_id_echoed(client: httpx.AsyncClient) -> None:
    r = await client.post(
        RUN_URL, headers={**AUTH, "X-Request-Id": "abc-123"}, json={"prompt": "hi"}
    )
    assert r.headers["x-request-id"] == "abc-123"
    r = await client.post(
        RUN_URL, headers={**AUTH, "X-Request-Id": "bad id <script>"}, json={"prompt": "hi"}
    )
    assert r.headers["x-request-id"] != "bad id"


async def test_model_listing_names_weights(client: httpx.AsyncClient) -> None:
    r = await client.get("/v1/models", headers=AUTH)
    assert r.status_code == 200
    assert r.json()["data"][0]["id"] == MODEL
    assert r.json()["data"][0]["weights"] == "fake"


async def test_schema_published(client: httpx.AsyncClient) -> None:
    r = await client.get(
        f"/client/v4/accounts/{ACCOUNT}/ai/models/schema", params={"model": MODEL}, headers=AUTH
    )
    assert r.status_code == 200
    result = r.json()["result"]
    assert "oneOf" in result["input"]
    assert "response" in result["output"]["properties"]
