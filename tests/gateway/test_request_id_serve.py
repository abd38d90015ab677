"""X-Request-Id behind Ray Serve: the gateway (behind_serve=True) inside Serve's own HTTP
middleware stack, composed exactly as Serve composes it for the proxy and for every
direct-ingress replica (`_apply_middlewares`: Serve's RequestIdMiddleware, then the
middlewares of RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH outside it)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from ray.serve._private.http_util import _apply_middlewares
from starlette.types import ASGIApp

from serve.cluster import build_gateway
from serve.gateway.request_id import is_sane
from serve.gateway.serve_http import serve_http_middlewares
from tests.fakes import FakeEngine
from tests.gateway.conftest import AUTH, RUN_URL, gateway_settings

ODD = [
    ("x" * 300, "over-long"),
    ("bad id <script>", "spaces-and-markup"),
    ("", "empty"),
    ("ünïcode", "latin-1"),
]


def serve_stack(tmp_path: Path, *, guard: bool) -> ASGIApp:
    gateway = build_gateway(
        gateway_settings(cache_dir=str(tmp_path / "cache")), FakeEngine(), behind_serve=True
    )
    outside: list[Any] = list(serve_http_middlewares()) if guard else []
    stacked: ASGIApp = _apply_middlewares(gateway, outside)
    return stacked


async def post(app: ASGIApp, request_ids: list[str]) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://serve") as client:
        headers = [(k.encode(), v.encode()) for k, v in AUTH.items()]
        headers += [(b"X-Request-Id", rid.encode("latin-1")) for rid in request_ids]
        return await client.post(RUN_URL, headers=headers, json={"prompt": "hi"})


def echoed(r: httpx.Response) -> list[str]:
    return [v.decode("latin-1") for k, v in r.headers.raw if k.lower() == b"x-request-id"]


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[ASGIApp]:
    yield serve_stack(tmp_path, guard=True)


@pytest.mark.parametrize("given", [g for g, _ in ODD], ids=[i for _, i in ODD])
async def test_serve_echoes_our_sanitised_id(guarded: ASGIApp, given: str) -> None:
    r = await post(guarded, [given])
    assert r.status_code == 200
    (rid,) = echoed(r)  # one x-request-id: Serve's, carrying our id
    assert rid != given and is_sane(rid) and len(rid) <= 128
    assert r.headers["cf-ray"] == rid


async def test_a_sane_client_id_is_kept_end_to_end(guarded: ASGIApp) -> None:
    r = await post(guarded, ["client-id_42:retry.1"])
    assert echoed(r) == ["client-id_42:retry.1"] and r.headers["cf-ray"] == "client-id_42:retry.1"


async def test_repeated_ids_become_one(guarded: ASGIApp) -> None:
    r = await post(guarded, ["first-id", "second-id"])
    assert echoed(r) == ["first-id"] and r.headers["cf-ray"] == "first-id"


async def test_no_client_id_serve_makes_one(guarded: ASGIApp) -> None:
    r = await post(guarded, [])
    (rid,) = echoed(r)
    assert is_sane(rid) and r.headers["cf-ray"] == rid


async def test_without_the_guard_serve_echoes_the_raw_value(tmp_path: Path) -> None:
    """Why the guard exists (and what happens where it is not installed): Serve echoes the
    client's value as is; our own id (cf-ray, logs) is still the sanitised one."""
    raw = "x" * 300
    r = await post(serve_stack(tmp_path, guard=False), [raw])
    assert echoed(r) == [raw]
    assert r.headers["cf-ray"] != raw and is_sane(r.headers["cf-ray"])
