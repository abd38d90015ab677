from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.fakes import FakeEngine
from tests.gateway.conftest import ACCOUNT, AUTH, MODEL, RUN_URL


def assert_envelope(r: httpx.Response, status: int, code: int) -> dict[str, object]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert body["success"] is False
    assert body["messages"] == []
    assert body["errors"][0]["code"] == code
    assert "x-request-id" in r.headers
    return body


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b'{"prompt": "hi", "top_k": 51}', "'/top_k' must be <= 50"),
        (b"{}", "required properties at '/' are 'prompt' or 'messages'"),
        (b"not json", "Invalid JSON"),
        (b'{"prompt": "a", "messages": [{"role": "user", "content": "b"}]}', "mutually exclusive"),
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


async def test_lora(client: httpx.AsyncClient) -> None:
    r = await client.post(RUN_URL, headers=AUTH, json={"prompt": "x", "lora": "my-adapter"})
    assert_envelope(r, 405, 5005)


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


async def test_bad_token(client: httpx.AsyncClient) -> None:
    r = await client.post(RUN_URL, headers={"Authorization": "Bearer nope"}, json={"prompt": "x"})
    assert_envelope(r, 401, 10000)


async def test_foreign_account(client: httpx.AsyncClient) -> None:
    r = await client.post(
        f"/client/v4/accounts/other/ai/run/{MODEL}", headers=AUTH, json={"prompt": "x"}
    )
    assert_envelope(r, 403, 10000)


async def test_wrong_method(client: httpx.AsyncClient) -> None:
    r = await client.get(RUN_URL, headers=AUTH)
    assert_envelope(r, 405, 7001)


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
