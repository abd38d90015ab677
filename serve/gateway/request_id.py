"""Request ids: `x-request-id` (also `cf-ray`) on every response.

A pure ASGI middleware (no BaseHTTPMiddleware: it would buffer streams).
"""

from __future__ import annotations

import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

_SANE_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
INFERENCE_ID_KEY = "batchserve_inference_id"


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
    `x-request-id`, or a new one) and echoes it as `x-request-id`; then we reuse
    that id and only add `cf-ray` and `cf-ai-req-id`.
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
            if name == b"x-request-id":
                given = value.decode("latin-1")
                break
        if self.behind_serve and given:
            request_id = given
        else:
            request_id = given if _SANE_ID.match(given) else uuid.uuid4().hex
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
