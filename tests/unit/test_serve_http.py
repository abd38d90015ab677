"""Serve's HTTP callback (`serve.gateway.serve_http`), composed as Serve composes it for
its own HTTP servers (`_apply_middlewares`: Serve's `RequestIdMiddleware` innermost, our
middlewares outside it): what Serve's request handling sees of a client's request."""

from __future__ import annotations

import logging

import httpx
import pytest
from ray.serve._private.http_util import (
    _apply_middlewares,
    parse_disconnect_disabled_header,
    parse_request_timeout_header,
)
from starlette.types import Receive, Scope, Send

from serve.gateway.last_words import LastWordsMarks
from serve.gateway.request_id import ServeRequestIdGuard
from serve.gateway.serve_http import (
    STREAM_STALL_ENV,
    ServeControlHeaders,
    serve_http_middlewares,
)
from serve.gateway.stream_guard import StalledClientGuard
from serve.settings import STREAM_STALL_S


async def test_serve_does_not_see_the_clients_control_headers() -> None:
    seen: list[dict[bytes, bytes]] = []

    async def serve_handler(scope: Scope, receive: Receive, send: Send) -> None:
        """Reads the headers as Serve's direct ingress does, then answers."""
        seen.append(dict(scope["headers"]))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    app = _apply_middlewares(serve_handler, list(serve_http_middlewares()))
    headers = {
        "x-request-disconnect-disabled": "?1",
        "X-Request-Timeout-Seconds": "-1",
        "x-custom": "kept",
    }
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://serve") as client:
        r = await client.post("/", headers=headers, content=b"{}")
    assert r.status_code == 200
    (got,) = seen
    assert not parse_disconnect_disabled_header(got)  # Serve keeps watching the client
    assert parse_request_timeout_header(got, 7.0) == 7.0  # and keeps its own timeout
    assert got[b"x-custom"] == b"kept"


def test_the_middlewares_in_serves_order() -> None:
    from serve.gateway import request_id

    middlewares = serve_http_middlewares()
    # The former import path (deployments may still name it) gives the same list.
    assert [m.cls for m in request_id.serve_http_middlewares()] == [m.cls for m in middlewares]
    assert [m.cls for m in middlewares] == [
        ServeControlHeaders,
        ServeRequestIdGuard,
        StalledClientGuard,  # its send blocks as the server's does
        LastWordsMarks,  # outermost: on the server's own send
    ]


def stall_kwargs() -> dict[str, object]:
    (guard,) = [m for m in serve_http_middlewares() if m.cls is StalledClientGuard]
    return dict(guard.kwargs)


def test_the_stall_limit_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(STREAM_STALL_ENV, raising=False)
    assert stall_kwargs() == {"stall_s": STREAM_STALL_S}
    monkeypatch.setenv(STREAM_STALL_ENV, "2.5")
    assert stall_kwargs() == {"stall_s": 2.5}


@pytest.mark.parametrize("value", ["0", "-3", "soon"])
def test_a_bad_stall_limit_never_stops_serves_servers(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, value: str
) -> None:
    monkeypatch.setenv(STREAM_STALL_ENV, value)
    # Other settings the application validates are not read here at all.
    monkeypatch.setenv("BATCHSERVE_MODELS", "not json")
    monkeypatch.setenv("BATCHSERVE_REQUEST_TIMEOUT_S", "1")
    with caplog.at_level(logging.WARNING):
        assert stall_kwargs() == {"stall_s": STREAM_STALL_S}
    assert STREAM_STALL_ENV in caplog.text
