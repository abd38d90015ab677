"""The clients Workers AI users already run, unchanged but for the base URL, against the
real cluster: the official `cloudflare` SDK, LangChain's CloudflareWorkersAI, plain curl.
Also the non-streaming cap (the fixture sets BATCHSERVE_NON_STREAM_MAX_TOKENS=64)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import cloudflare
import httpx
import pytest
from langchain_community.llms.cloudflare_workersai import CloudflareWorkersAI
from langchain_core.callbacks import BaseCallbackHandler

from tests.cluster.conftest import ACCOUNT, MODEL, TOKEN, Cluster

pytestmark = pytest.mark.cluster

CAP = 64
PROMPTS = ["Tell me about the sea.", "What is a fox?", "Count to ten.", "hello world"]


@pytest.fixture
def sdk(cluster: Cluster) -> Iterator[cloudflare.Cloudflare]:
    with cloudflare.Cloudflare(
        api_token=TOKEN, base_url=f"{cluster.url}/client/v4", max_retries=0, timeout=120
    ) as client:
        yield client


def sse_payloads(lines: list[str]) -> list[dict[str, Any]]:
    """The JSON events of a Workers AI stream; it must end with `data: [DONE]`."""
    data = [line.removeprefix("data: ") for line in lines if line]
    assert all(line.startswith("data: ") for line in lines if line), lines
    assert data[-1] == "[DONE]", data[-3:]
    return [json.loads(d) for d in data[:-1]]


# -- the official cloudflare SDK -----------------------------------------------------------


def test_sdk_run_returns_response_and_usage(sdk: cloudflare.Cloudflare) -> None:
    out = sdk.ai.run(MODEL, account_id=ACCOUNT, prompt="Tell me a story.", max_tokens=12)
    assert isinstance(out, dict)
    assert isinstance(out["response"], str) and out["response"]
    usage = out["usage"]
    assert 0 < usage["completion_tokens"] <= 12
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_sdk_messages_and_seed(sdk: cloudflare.Cloudflare) -> None:
    """`seed` makes sampling reproducible at a temperature well above 0."""
    messages: Any = [{"role": "user", "content": "Name a colour."}]
    runs = [
        sdk.ai.run(
            MODEL, account_id=ACCOUNT, messages=messages, max_tokens=16, temperature=1.5, seed=7
        )
        for _ in range(2)
    ]
    assert isinstance(runs[0], dict) and isinstance(runs[1], dict)
    assert runs[0]["response"] == runs[1]["response"]


def test_sdk_typed_errors(sdk: cloudflare.Cloudflare, cluster: Cluster) -> None:
    with pytest.raises(cloudflare.BadRequestError) as caught:
        sdk.ai.run(MODEL, account_id=ACCOUNT, prompt="hi", top_k=51)
    assert caught.value.status_code == 400
    assert caught.value.errors[0].code == 5006
    assert caught.value.errors[0].message == "AiError: Bad input: '/top_k' must be <= 50"
    with (
        cloudflare.Cloudflare(
            api_token="wrong", base_url=f"{cluster.url}/client/v4", max_retries=0
        ) as bad,
        pytest.raises(cloudflare.AuthenticationError),
    ):
        bad.ai.run(MODEL, account_id=ACCOUNT, prompt="hi")


def test_sdk_streaming_response_is_our_sse(sdk: cloudflare.Cloudflare) -> None:
    body: dict[str, Any] = {"prompt": "Tell me about the fox.", "max_tokens": 16, "temperature": 0}
    plain = sdk.ai.run(MODEL, account_id=ACCOUNT, **body)
    with sdk.ai.with_streaming_response.run(
        MODEL, account_id=ACCOUNT, stream=True, **body
    ) as response:
        assert response.http_response.headers["content-type"] == "text/event-stream"
        events = sse_payloads(list(response.iter_lines()))
    assert all(isinstance(e["response"], str) for e in events)
    assert isinstance(plain, dict)
    assert "".join(e["response"] for e in events) == plain["response"]
    assert events[-1]["usage"] == plain["usage"]


# -- LangChain -------------------------------------------------------------------------------


class TokenCollector(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)


def langchain_llm(cluster: Cluster, *, streaming: bool) -> CloudflareWorkersAI:
    # The class appends /{account_id}/ai/run/{model} to base_url.
    return CloudflareWorkersAI(
        account_id=ACCOUNT,
        api_token=TOKEN,
        model=MODEL,
        base_url=f"{cluster.url}/client/v4/accounts",
        streaming=streaming,
    )


def test_langchain_streaming_and_not_agree(cluster: Cluster) -> None:
    # The class has no sampling fields: call kwargs go into the request body as they are.
    params = {"temperature": 0, "max_tokens": 16}
    plain = langchain_llm(cluster, streaming=False).invoke("What is a fox?", **params)
    assert plain
    collector = TokenCollector()
    streamed = langchain_llm(cluster, streaming=True).invoke(
        "What is a fox?", config={"callbacks": [collector]}, **params
    )
    assert streamed == plain
    assert len(collector.tokens) > 1
    assert "".join(collector.tokens) == plain
    chunks = list(langchain_llm(cluster, streaming=False).stream("What is a fox?", **params))
    assert "".join(chunks) == plain


# -- curl, no Content-Type ------------------------------------------------------------------


def test_curl_style_requests(cluster: Cluster) -> None:
    """The hosted API's curl examples: `-d` with no Content-Type of their own (curl then
    sends a form type); and a client sending no Content-Type header at all."""
    body = '{"prompt": "hello world", "max_tokens": 4, "stop": null, "tools": null}'
    auth = f"Authorization: Bearer {TOKEN}"
    command = ["curl", "-sS", "-i", "-H", auth, "-d", body, cluster.run_url]
    out = subprocess.run(command, capture_output=True, timeout=120, check=True).stdout.decode()
    head, _, payload = out.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200"), out
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in head.splitlines())}
    assert headers["content-type"] == "application/json"
    assert headers["cf-ai-req-id"] and headers["x-request-id"] == headers["cf-ray"]
    reply = json.loads(payload)
    assert reply["success"] is True and 0 < reply["result"]["usage"]["completion_tokens"] <= 4

    r = httpx.post(
        cluster.run_url,
        headers=cluster.auth,
        content=b'{"prompt": "hi", "max_tokens": 2, "stream": true}',
        timeout=120,
    )
    assert "content-type" not in r.request.headers
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")


# -- the non-streaming cap ------------------------------------------------------------------


def test_non_streaming_is_capped_streaming_is_not(cluster: Cluster) -> None:
    capped: dict[str, Any] | None = None
    body: dict[str, Any] = {}
    for prompt in PROMPTS:
        body = {"prompt": prompt, "max_tokens": 3 * CAP, "temperature": 0}
        r = httpx.post(cluster.run_url, headers=cluster.auth, json=body, timeout=120)
        assert r.status_code == 200, r.text
        capped = r.json()
        assert capped is not None
        assert capped["result"]["usage"]["completion_tokens"] <= CAP
        [note] = capped["messages"]
        assert f"capped at {CAP}" in note["message"] and "stream: true" in note["message"]
        if capped["result"]["finish_reason"] == "length":
            break
    assert capped is not None and capped["result"]["finish_reason"] == "length", (
        "every probe prompt stopped before the cap; pick longer ones"
    )
    assert capped["result"]["usage"]["completion_tokens"] == CAP

    with httpx.stream(
        "POST", cluster.run_url, headers=cluster.auth, json={**body, "stream": True}, timeout=120
    ) as r:
        assert r.status_code == 200
        events = sse_payloads(list(r.iter_lines()))
    streamed = "".join(e["response"] for e in events)
    assert events[-1]["usage"]["completion_tokens"] > CAP
    assert streamed.startswith(capped["result"]["response"])
