"""Request ids: `x-request-id` (also `cf-ray`) on every response.

A client's `x-request-id` is kept only when it is 1-128 characters of `[A-Za-z0-9._:-]`;
anything else is replaced by a fresh id before it is echoed or logged. Pure ASGI
middlewares (no BaseHTTPMiddleware: it would buffer streams).

Behind Ray Serve, Serve's own `RequestIdMiddleware` (on the proxy's and every direct-ingress
replica's HTTP server) reads the client's `x-request-id` before our app runs and echoes it
in the response as is. `ServeRequestIdGuard`, installed outside it through Serve's HTTP
callback (`serve.gateway.serve_http`), applies the same rule first, so the id Serve
echoes, logs and hands to the replica is already the sanitised one.
"""

from __future__ import annotations

import re
import uuid
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from starlette.middleware import Middleware

_SANE_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_HEADER = b"x-request-id"
INFERENCE_ID_KEY = "batchserve_inference_id"


def is_sane(request_id: str) -> bool:
    return _SANE_ID.fullmatch(request_id) is not None


def request_id_of(scope: Scope) -> str:
    return str(scope.get("state", {}).get("request_id", ""))


def mark_reached_inference(scope: Scope) -> str:
    """Give the request its `cf-ai-req-id` (sent once it reached inference)."""
    inference_id = str(uuid.uuid4())
    scope.setdefault("state", {})[INFERENCE_ID_KEY] = inference_id
    return inference_id


class RequestIdMiddleware:
    """Assigns the request id and adds the id headers to the response.

    Behind Ray Serve, Serve's own middleware already picked the id (the client's
    `x-request-id` after `ServeRequestIdGuard`, or a new one) and echoes it as
    `x-request-id`; then we reuse that id and only add `cf-ray` and `cf-ai-req-id`.
    Without the guard, an id that is not sane is still replaced for `cf-ray` and our
    logs (Serve then echoes the client's raw value in `x-request-id`).
    """

    def __init__(self, app: ASGIApp, *, behind_serve: bool = False) -> None:
        self.app = app
        self.behind_serve = behind_serve

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = ""
        for name, value in scope["headers"]:
            if name == _HEADER:
                given = value.decode("latin-1")
                break
        request_id = given if is_sane(given) else uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                rid = request_id.encode()
                if not self.behind_serve:
                    headers.append((b"x-request-id", rid))
                headers.append((b"cf-ray", rid))
                inference_id = state.get(INFERENCE_ID_KEY)
                if inference_id:
                    headers.append((b"cf-ai-req-id", inference_id.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)


class ServeRequestIdGuard:
    """Outside Ray Serve's `RequestIdMiddleware`: leaves a sane client `x-request-id`
    alone and replaces anything else (too long, odd characters, repeated) with one fresh
    id, before Serve reads it. No header: Serve makes its own id (a UUID)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            headers = scope["headers"]
            given = [value for name, value in headers if name == _HEADER]
            if given and (len(given) > 1 or not is_sane(given[0].decode("latin-1"))):
                first = given[0].decode("latin-1")
                request_id = first if is_sane(first) else uuid.uuid4().hex
                others = [(name, value) for name, value in headers if name != _HEADER]
                scope = {**scope, "headers": [*others, (_HEADER, request_id.encode())]}
        await self.app(scope, receive, send)


def serve_http_middlewares() -> list[Middleware]:
    """The callback's former import path (`serve.gateway.request_id:serve_http_middlewares`),
    kept for deployments that still name it: `serve.gateway.serve_http`'s middlewares."""
    from serve.gateway.serve_http import serve_http_middlewares as current

    return list(current())
