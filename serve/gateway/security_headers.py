"""Headers added to every response in one pass: the standard security headers and
the `X-RateLimit-*` headers admission computed (pure ASGI, streams untouched).

One middleware rather than one per header family: its `send` wrapper runs for every
body chunk, i.e. per streamed token."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.gateway.admission import RATE_HEADERS_KEY

SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
)


class ResponseHeadersMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name for name, _ in headers}
                headers += [h for h in SECURITY_HEADERS if h[0] not in present]
                rate = scope.get("state", {}).get(RATE_HEADERS_KEY)
                if rate:
                    headers += [(k.lower().encode(), v.encode()) for k, v in rate.items()]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
