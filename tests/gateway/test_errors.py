from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from serve.cluster import build_gateway
from serve.settings import Settings
from tests.fakes import FakeEngine
from tests.gateway.conftest import ACCOUNT, AUTH, MODEL, RUN_URL
from tests.unit.test_workers_ai_schema import RANGES


def assert_envelope(r: httpx.Response, status: int, code: int) -> dict[str, object]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["success"] is False
    assert body["messages"] == []
    assert body["errors"][0]["code"] == code
    assert r.headers["x-request-id"] and r.headers["cf-ray"] == r.headers["x-request-id"]
    return body


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b'{"prompt": "hi", "top_k": 51}', "'/top_k' must be <= 50"),
        (b"{}", "required properties at '/' are 'prompt' or 'messages'"),
        (b"not json", "Invalid JSON"),
        (b'{"prompt": "a", "messages": [{"role": "user", "content": "b"}]}', "mutually exclusive"),
        # The chat template would raise deep in the replica (a 500/3008) on no messages.
        (b'{"messages": [], "max_tokens": 2}', "'/messages' must NOT have fewer than 1 items"),
    ],
)
async def test_bad_input(client: httpx.AsyncClient, body: bytes, needle: str) -> None:
    r = await client.post(RUN_URL, headers=AUTH, content=body)
    err = assert_envelope(r, 400, 5006)["errors"]
    message = err[0]["message"]  # type: ignore[index]
    assert message.startswith("AiError: Bad input: ")
    assert needle in message


async def test_unknown_model(client: httpx.AsyncClient) -> None:
    r = await client.post(
        f"/client/v4/accounts/{ACCOUNT}/ai/run/@cf/meta/nope", headers=AUTH, json={"prompt": "x"}
    )
    body = assert_envelope(r, 400, 5007)
    assert "@cf/meta/nope" in body["errors"][0]["message"]  # type: ignore[index]


async def test_empty_model_name(client: httpx.AsyncClient) -> None:
    r = await client.post(
        f"/client/v4/accounts/{ACCOUNT}/ai/run/", headers=AUTH, json={"prompt": "x"}
    )
    body = assert_envelope(r, 400, 5007)
    assert body["errors"][0]["message"] == "No such model or task: the model name is empty"  # type: ignore[index]


async def test_lora(client: httpx.AsyncClient) -> None:
    r = await client.post(RUN_URL, headers=AUTH, json={"prompt": "x", "lora": "my-adapter"})
    assert_envelope(r, 405, 5005)
    assert r.headers["allow"] == "POST"  # every 405 carries Allow (RFC 9110)


async def test_body_too_large(client: httpx.AsyncClient) -> None:
    big = b'{"prompt": "' + b"x" * (5 * 1024 * 1024) + b'"}'
    r = await client.post(RUN_URL, headers=AUTH, content=big)
    body = assert_envelope(r, 413, 3006)
    assert body["result"] is None


async def test_missing_credentials(client: httpx.AsyncClient) -> None:
    r = await client.post(RUN_URL, json={"prompt": "x"})
    body = assert_envelope(r, 400, 9106)
    assert body["result"] is None
    assert "cf-ai-req-id" not in r.headers


async def test_a_global_api_key_is_told_only_tokens_work(client: httpx.AsyncClient) -> None:
    """`Cloudflare(api_key=..., api_email=...)` sends X-Auth-Key and X-Auth-Email: the
    error names what is accepted instead of calling both headers missing."""
    headers = {"X-Auth-Key": "0123456789abcdef", "X-Auth-Email": "a@example.com"}
    r = await client.post(RUN_URL, headers=headers, json={"prompt": "x"})
    message = assert_envelope(r, 400, 9106)["errors"][0]["message"]
    assert "Authorization: Bearer" in message and "not X-Auth-Key" in message
    assert "0123456789abcdef" not in r.text


async def test_bad_token(client: httpx.AsyncClient) -> None:
    r = await client.post(RUN_URL, headers={"Authorization": "Bearer nope"}, json={"prompt": "x"})
    assert_envelope(r, 401, 10000)


@pytest.mark.parametrize("header", ["Token abc", "Basic dXNlcjpwYXNz", "Bearer", "Bearer  "])
async def test_malformed_authorization_header(client: httpx.AsyncClient, header: str) -> None:
    """Cloudflare's v4 API: 400/6003 with 6111 in `error_chain`, not a bad token's 401."""
    r = await client.post(RUN_URL, headers={"Authorization": header}, json={"prompt": "x"})
    body = assert_envelope(r, 400, 6003)
    assert body["result"] is None
    assert body["errors"] == [
        {
            "code": 6003,
            "message": "Invalid request headers",
            "error_chain": [{"code": 6111, "message": "Invalid format for Authorization header"}],
        }
    ]


async def test_foreign_account(client: httpx.AsyncClient) -> None:
    r = await client.post(
        f"/client/v4/accounts/other/ai/run/{MODEL}", headers=AUTH, json={"prompt": "x"}
    )
    assert_envelope(r, 403, 10000)


async def test_wrong_method(client: httpx.AsyncClient) -> None:
    r = await client.get(RUN_URL, headers=AUTH)
    assert_envelope(r, 405, 7001)
    assert r.headers["allow"] == "POST"


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("PUT", RUN_URL, "POST"),
        ("DELETE", "/v1/chat/completions", "POST"),
        ("POST", "/v1/models", "GET"),
    ],
)
async def test_405_says_what_is_allowed(
    client: httpx.AsyncClient, method: str, path: str, allow: str
) -> None:
    r = await client.request(method, path, headers=AUTH, json={"prompt": "x"})
    assert r.status_code == 405, r.text
    assert r.headers["allow"] == allow


async def test_unknown_route(client: httpx.AsyncClient) -> None:
    r = await client.get("/client/v4/nothing/here", headers=AUTH)
    assert_envelope(r, 404, 7003)


async def test_capacity_429(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.delay_s = 0.05
    body = {"prompt": "x", "max_tokens": 12}
    results = await asyncio.gather(
        *[client.post(RUN_URL, headers=AUTH, json=body) for _ in range(8)]
    )
    statuses = sorted(r.status_code for r in results)
    assert statuses.count(200) >= 4
    refused = [r for r in results if r.status_code == 429]
    assert refused, statuses
    assert_envelope(refused[0], 429, 3040)
    assert int(refused[0].headers["Retry-After"]) >= 1


@pytest.mark.parametrize("value", [0, -5])
async def test_max_tokens_below_one_is_bad_input(
    client: httpx.AsyncClient, engine: FakeEngine, value: int
) -> None:
    r = await client.post(RUN_URL, headers=AUTH, json={"prompt": "hi", "max_tokens": value})
    message = assert_envelope(r, 400, 5006)["errors"][0]["message"]  # type: ignore[index]
    assert message == "AiError: Bad input: '/max_tokens' must be >= 1"
    assert not engine.requests


@pytest.mark.parametrize("branch", ["prompt", "messages"])
@pytest.mark.parametrize(("field", "value", "ok"), RANGES)
async def test_range_boundaries_over_http(
    client: httpx.AsyncClient, branch: str, field: str, value: float, ok: bool
) -> None:
    """Every range of the schema: the boundary is served, one past it is 400/5006."""
    base = (
        {"prompt": "hi"}
        if branch == "prompt"
        else {"messages": [{"role": "user", "content": "hi"}]}
    )
    r = await client.post(RUN_URL, headers=AUTH, json={**base, field: value, "max_tokens": 1})
    if ok:
        assert r.status_code == 200, r.text
    else:
        message = assert_envelope(r, 400, 5006)["errors"][0]["message"]  # type: ignore[index]
        assert message.startswith(f"AiError: Bad input: '/{field}' must be ")


async def test_context_window_exceeded(settings: Settings) -> None:
    app = build_gateway(settings, FakeEngine(context_window=100))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        body = {"prompt": "x" * 50, "max_tokens": 34, "stream": True}  # 67 prompt tokens
        r = await c.post(RUN_URL, headers=AUTH, json=body)
    err = assert_envelope(r, 413, 5021)
    assert err["result"] == {}
    assert err["errors"][0]["message"] == (  # type: ignore[index]
        "AiError: The estimated number of input and maximum output tokens (101) "
        "exceeded this model context window limit (100)."
    )


async def test_body_too_large_is_not_parsed(client: httpx.AsyncClient) -> None:
    """Over the limit is 413/3006 even when the body is not JSON, declared length or not."""
    limit = 4 * 1024 * 1024

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted while read
        for _ in range(5):
            yield b"x" * (limit // 4)

    r = await client.post(RUN_URL, headers=AUTH, content=chunked())
    assert "content-length" not in r.request.headers
    assert_envelope(r, 413, 3006)
    r = await client.post(RUN_URL, headers=AUTH, content=b"not json" * (limit // 8 + 1))
    assert_envelope(r, 413, 3006)


async def test_engine_failure(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    engine.fail_after = 0
    r = await client.post(RUN_URL, headers=AUTH, json={"prompt": "x"})
    body = assert_envelope(r, 500, 3008)
    assert body["result"] == {}
    assert r.headers["cf-ai-req-id"]


# The 408 timeout row of the error table belongs to the request-timeout work (issue 9).


@pytest.mark.parametrize(
    "model",
    [
        "@cf/../../etc/passwd",
        "..%2F..%2Fetc%2Fpasswd",
        "%40cf%2Fmeta%2F..%2F..%2Fqwen",
        "@cf/qwen/" + "x" * 5000,
        "/tmp/model",
    ],
)
async def test_hostile_model_names_are_unknown(client: httpx.AsyncClient, model: str) -> None:
    r = await client.post(
        f"/client/v4/accounts/{ACCOUNT}/ai/run/{model}", headers=AUTH, json={"prompt": "x"}
    )
    assert r.status_code in (400, 404), r.text
    assert r.json()["errors"][0]["code"] in (5007, 7003)


async def test_url_encoded_model_name_is_the_model(client: httpx.AsyncClient) -> None:
    """Clients that percent-encode the name (encodeURIComponent) reach the same model."""
    r = await client.post(
        f"/client/v4/accounts/{ACCOUNT}/ai/run/%40cf%2Fqwen%2Fqwen1.5-1.8b-chat",
        headers=AUTH,
        json={"prompt": "x", "max_tokens": 1},
    )
    assert r.status_code == 200, r.text


async def test_security_headers_everywhere(client: httpx.AsyncClient) -> None:
    for r in (
        await client.post(RUN_URL, headers=AUTH, json={"prompt": "x", "max_tokens": 1}),
        await client.post(RUN_URL, json={"prompt": "x"}),
        await client.get("/nowhere"),
    ):
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["cache-control"] == "no-store"


@pytest.mark.parametrize("path", [RUN_URL, "/v1/chat/completions"])
async def test_a_compressed_body_is_a_415_that_says_so(
    client: httpx.AsyncClient, engine: FakeEngine, path: str
) -> None:
    """Decoding is not offered (a zip bomb would need its own limits): the client is told
    to send the body uncompressed, instead of reading about bytes that are not UTF-8."""
    import gzip
    import json

    body: dict[str, object] = (
        {"prompt": "x"}
        if path == RUN_URL
        else {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
    )
    headers = {**AUTH, "Content-Encoding": "gzip", "Content-Type": "application/json"}
    r = await client.post(path, headers=headers, content=gzip.compress(json.dumps(body).encode()))
    assert r.status_code == 415, r.text
    if path == RUN_URL:
        message = assert_envelope(r, 415, 5006)["errors"][0]["message"]  # type: ignore[index]
    else:
        message = r.json()["error"]["message"]
        assert r.json()["error"]["type"] == "invalid_request_error"
    assert "'gzip' is not supported: send the body uncompressed" in message
    assert not engine.requests
    headers["Content-Encoding"] = "identity"
    r = await client.post(path, headers=headers, content=json.dumps(body).encode())
    assert r.status_code == 200, r.text


async def test_openai_messages_have_no_workers_ai_prefix(settings: Settings) -> None:
    """Both dialects share the messages of serve.errors, worded as hosted Workers AI's
    ("AiError: ..."). OpenAI's clients show `error.message` to their users: the OpenAI
    envelope and its stream error events drop the prefix, the Workers AI ones keep it, and
    the context-window text LiteLLM matches is OpenAI's exactly."""
    engine = FakeEngine(context_window=100)
    app = build_gateway(settings, engine)
    transport = httpx.ASGITransport(app=app)
    chat = "/v1/chat/completions"
    hi = [{"role": "user", "content": "hi"}]
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:

        async def both(run: dict[str, object], openai: dict[str, object]) -> tuple[str, str]:
            wai = (await http.post(RUN_URL, headers=AUTH, json=run)).json()
            oai = (await http.post(chat, headers=AUTH, json={"model": MODEL, **openai})).json()
            return wai["errors"][0]["message"], oai["error"]["message"]

        # Bad input, a reason of its own in each dialect.
        wai, oai = await both({"prompt": "hi", "top_k": 51}, {"messages": hi, "n": 0})
        assert wai.startswith("AiError: Bad input: ")
        assert oai.startswith("Bad input: ")
        # Over the context window: Cloudflare's 5021 text, and OpenAI's/vLLM's as it is.
        wai, oai = await both(
            {"prompt": "word " * 30, "max_tokens": 100},
            {"messages": [{"role": "user", "content": "word " * 30}], "max_tokens": 100},
        )
        assert wai.startswith("AiError: The estimated number of input and maximum output")
        assert oai == (
            "This model's maximum context length is 100 tokens. However, you requested 175 "
            "tokens (input and maximum output together). Please reduce the length of the "
            "messages or max_tokens."
        )
        # The engine fails: before the first byte, and after it (an error event in the stream).
        engine.fail_after = 0
        wai, oai = await both({"prompt": "hi"}, {"messages": hi})
        assert wai == "AiError: Inference failed, please retry"
        assert oai == "Inference failed, please retry"
        engine.fail_after = 1
        short = {"max_tokens": 5}  # within the window of 100
        streamed = await http.post(
            chat, headers=AUTH, json={"model": MODEL, "messages": hi, "stream": True, **short}
        )
        assert '"message":"Inference failed, please retry"' in streamed.text
        assert "AiError" not in streamed.text
        streamed = await http.post(
            RUN_URL, headers=AUTH, json={"prompt": "hi", "stream": True, **short}
        )
        assert '"message":"AiError: Inference failed, please retry"' in streamed.text


def test_haproxy_pages_keep_the_prefix_in_both_dialects() -> None:
    """HAProxy's pages are one static body for both dialects (the dialect is not known
    where HAProxy answers): its OpenAI `error.message` is the Workers AI message as is."""
    from serve.errors import EngineFailure
    from serve.gateway.error_wire import both_dialects_body

    body = both_dialects_body(EngineFailure())
    message = "AiError: Inference failed, please retry"
    assert body["errors"][0]["message"] == body["error"]["message"] == message
