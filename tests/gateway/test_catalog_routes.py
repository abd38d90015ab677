"""The Workers AI catalog routes: model search (filters, pages, plans, errors), task and
author search, and the official `cloudflare` SDK's listing calls against them."""

from __future__ import annotations

from collections.abc import AsyncIterable
from pathlib import Path
from typing import Any

import cloudflare
import httpx
import pytest
from cloudflare import AsyncCloudflare

from serve.cluster import build_gateway
from serve.gateway.catalog_routes import ModelFilter, author_of, model_entry
from serve.settings import Settings
from tests.fakes import FakeEngine
from tests.gateway.conftest import ACCOUNT, AUTH, MODEL, TOKEN
from tests.gateway.test_tenancy import bearer, narrow_plan_gateway

AI = f"/client/v4/accounts/{ACCOUNT}/ai"
SEARCH = f"{AI}/models/search"


async def search(client: httpx.AsyncClient, **params: Any) -> dict[str, Any]:
    r = await client.get(SEARCH, params=params, headers=AUTH)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    assert body["success"] is True and body["errors"] == []
    return body


def names(body: dict[str, Any]) -> list[str]:
    return [m["name"] for m in body["result"]]


async def test_lists_the_served_model_with_its_real_engine(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    body = await search(client)
    assert body["result_info"] == {"page": 1, "per_page": 20, "count": 1, "total_count": 1}
    (model,) = body["result"]
    assert model["id"] == "3222ddb3-e211-4fd9-9a6d-79a80e47b3a6"
    assert (model["name"], model["source"], model["tags"]) == (MODEL, 1, [])
    assert model["description"].startswith("Qwen1.5 is the improved version of Qwen")
    assert model["task"]["name"] == "Text Generation"
    properties = {p["property_id"]: p["value"] for p in model["properties"]}
    assert properties["beta"] == "true"
    assert properties["info"] == "https://huggingface.co/qwen/qwen1.5-1.8b-chat"
    # What really serves the name, from the engine (the fake one here).
    assert properties["context_window"] == str(engine.info.context_window)
    assert properties["weights"] == engine.info.weights == "fake"


@pytest.mark.parametrize(
    ("params", "listed"),
    [
        ({"search": "alibaba cloud"}, True),  # the description, any case
        ({"search": "qwen1.5-1.8b"}, True),  # the name
        ({"search": "llama"}, False),
        ({"task": "Text Generation"}, True),
        ({"task": "text generation"}, True),
        ({"task": "c329a1f9-323d-4e91-b2aa-582dd4188d34"}, True),
        ({"task": "Text Embeddings"}, False),
        ({"author": "qwen"}, True),
        ({"author": "meta"}, False),
        ({"source": "1"}, True),
        ({"source": "1.0"}, True),
        ({"source": "2"}, False),
        ({"hide_experimental": "false"}, True),
        ({"hide_experimental": "true"}, True),  # beta, not experimental
        ({"include_deprecated": "true"}, True),
        ({"search": "qwen", "task": "Text Generation", "author": "qwen", "source": "1"}, True),
        ({"search": "qwen", "author": "meta"}, False),
        ({"search": "", "task": ""}, True),  # empty: no filter
    ],
)
async def test_filters(client: httpx.AsyncClient, params: dict[str, str], listed: bool) -> None:
    body = await search(client, **params)
    assert names(body) == ([MODEL] if listed else [])
    assert body["result_info"]["total_count"] == (1 if listed else 0)


async def test_pages(client: httpx.AsyncClient) -> None:
    first = await search(client, page=1, per_page=1)
    assert names(first) == [MODEL]
    assert first["result_info"] == {"page": 1, "per_page": 1, "count": 1, "total_count": 1}
    # The SDK asks for the next page until one is empty: page 2 must be.
    second = await search(client, page=2, per_page=1)
    assert second["result"] == []
    assert second["result_info"] == {"page": 2, "per_page": 1, "count": 0, "total_count": 1}
    assert (await search(client, page=2))["result"] == []
    assert names(await search(client, per_page=100)) == [MODEL]


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"page": "0"}, "page"),
        ({"page": "-1"}, "page"),
        ({"page": "abc"}, "page"),
        ({"page": "1.5"}, "page"),
        ({"per_page": "0"}, "per_page"),
        ({"per_page": "101"}, "per_page"),
        ({"per_page": "ten"}, "per_page"),
        ({"source": "one"}, "source"),
        ({"source": "nan"}, "source"),
        ({"hide_experimental": "maybe"}, "hide_experimental"),
        ({"format": "openrouter"}, "format"),
    ],
)
async def test_bad_query_is_a_400_envelope(
    client: httpx.AsyncClient, params: dict[str, str], param: str
) -> None:
    r = await client.get(SEARCH, params=params, headers=AUTH)
    assert r.status_code == 400, r.text
    body = r.json()
    assert set(body) == {"result", "success", "errors", "messages"}  # never FastAPI's 422
    assert body["success"] is False and body["errors"][0]["code"] == 5006
    assert body["errors"][0]["message"].startswith(f"AiError: Bad input: {param} ")


@pytest.mark.parametrize("kind", ["models", "tasks", "authors"])
async def test_authentication_and_account(client: httpx.AsyncClient, kind: str) -> None:
    url = f"{AI}/{kind}/search"
    r = await client.get(url, headers={"Authorization": "Bearer wrong-token"})
    assert r.status_code == 401
    assert r.json() == {
        "result": None,
        "success": False,
        "errors": [{"code": 10000, "message": "Authentication error"}],
        "messages": [],
    }
    r = await client.get(url)
    assert (r.status_code, r.json()["errors"][0]["code"]) == (400, 9106)
    r = await client.get(f"/client/v4/accounts/someone-else/ai/{kind}/search", headers=AUTH)
    assert (r.status_code, r.json()["errors"][0]["code"]) == (403, 10000)


async def test_bad_query_is_answered_after_authentication(client: httpx.AsyncClient) -> None:
    r = await client.get(SEARCH, params={"page": "0"})
    assert (r.status_code, r.json()["errors"][0]["code"]) == (400, 9106)


async def test_tasks_and_authors(client: httpx.AsyncClient) -> None:
    r = await client.get(f"{AI}/tasks/search", headers=AUTH)
    assert r.status_code == 200
    assert r.json()["result"] == [
        {
            "id": "c329a1f9-323d-4e91-b2aa-582dd4188d34",
            "name": "Text Generation",
            "description": "Family of generative text models, such as large language models "
            "(LLM), that can be adapted for a variety of natural language tasks.",
        }
    ]
    r = await client.get(f"{AI}/authors/search", headers=AUTH)
    assert r.status_code == 200 and r.json()["result"] == [{"name": "qwen"}]


async def test_plan_without_the_model_lists_nothing(tmp_path: Path, engine: FakeEngine) -> None:
    app, token = narrow_plan_gateway(tmp_path, engine)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        base = "/client/v4/accounts/acct-c/ai"
        r = await c.get(f"{base}/models/search", headers=bearer(token))
        assert r.status_code == 200
        assert r.json()["result"] == []
        assert r.json()["result_info"]["total_count"] == 0
        for kind in ("tasks", "authors"):
            r = await c.get(f"{base}/{kind}/search", headers=bearer(token))
            assert r.status_code == 200 and r.json()["result"] == [], r.text


async def test_cloudflare_sdk_lists_the_model(settings: Settings, engine: FakeEngine) -> None:
    """The official SDK's calls: `models.list` pages until the empty second page;
    a bad token is its AuthenticationError."""
    transport = httpx.ASGITransport(app=build_gateway(settings, engine))
    asked: list[str | None] = []

    async def note_page(request: httpx.Request) -> None:
        if request.url.path.endswith("/models/search"):
            asked.append(request.url.params.get("page"))

    def sdk(token: str) -> AsyncCloudflare:
        client = httpx.AsyncClient(transport=transport, event_hooks={"request": [note_page]})
        return AsyncCloudflare(
            api_token=token, base_url="http://test/client/v4", http_client=client, max_retries=0
        )

    async with sdk(TOKEN) as cf:
        models = await at_most(5, cf.ai.models.list(account_id=ACCOUNT))
        assert [m["name"] for m in models] == [MODEL]
        assert asked == [None, "2"]  # the first page, then the empty second one
        found = cf.ai.models.list(account_id=ACCOUNT, search="qwen", task="Text Generation")
        assert len(await at_most(5, found)) == 1
        gone = cf.ai.models.list(account_id=ACCOUNT, author="meta")
        assert [m async for m in gone] == []
        tasks: list[Any] = [t async for t in cf.ai.tasks.list(account_id=ACCOUNT)]
        assert [t["name"] for t in tasks] == ["Text Generation"]
        authors: list[Any] = [a async for a in cf.ai.authors.list(account_id=ACCOUNT)]
        assert authors == [{"name": "qwen"}]
        with pytest.raises(cloudflare.BadRequestError) as bad:
            await cf.ai.models.list(account_id=ACCOUNT, per_page=1000)
        assert bad.value.errors[0].code == 5006
    async with sdk("wrong-token") as cf:
        with pytest.raises(cloudflare.AuthenticationError) as caught:
            await cf.ai.models.list(account_id=ACCOUNT)
        assert caught.value.status_code == 401


async def at_most(limit: int, items: AsyncIterable[Any]) -> list[Any]:
    """The items of a listing, but no more than `limit` (a page that never comes back
    empty would make the SDK's auto-pagination endless)."""
    out: list[Any] = []
    async for item in items:
        out.append(item)
        if len(out) >= limit:
            break
    return out


def test_a_name_without_a_hosted_entry() -> None:
    """Another served name (a catalog override) is listed without the hosted facts."""
    entry = model_entry("@cf/acme/tiny-chat", "/models/tiny", 4096)
    assert entry["id"] == model_entry("@cf/acme/tiny-chat", "other", 1)["id"]  # stable
    assert entry["description"] == "" and entry["task"]["name"] == "Text Generation"
    assert entry["properties"] == [
        {"property_id": "context_window", "value": "4096"},
        {"property_id": "weights", "value": "/models/tiny"},
    ]
    assert author_of(entry["name"]) == "acme"


def test_hide_experimental_hides_only_models_marked_experimental() -> None:
    entry = model_entry("@cf/acme/lab-model", "acme/lab", 4096)
    marked = {**entry, "properties": [{"property_id": "experimental", "value": "true"}]}
    hiding = ModelFilter(hide_experimental=True)
    assert hiding.admits(entry) and not hiding.admits(marked)
    assert ModelFilter().admits(marked)
