"""Headers added to every response in one pass: the standard security headers and
the `X-RateLimit-*` headers (pure ASGI, streams untouched).

The rate headers are the ones admission computed (for a refusal of the tenant's
limiter, the counters it refused on); a response of an authenticated caller that never
reached admission (a 400, the model listing, the schema route) gets the tenant's current
counters from a read-only `RateLimiter.peek`. A 429 never reads them: in a flood the
refusals are what multiplies, and one that decided on no counters (the fair queue's, before
the body is read) has none to report; its answer is Retry-After.

One middleware rather than one per header family: its `send` wrapper runs for every
body chunk, i.e. per streamed token."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve.errors import OutOfCapacity
from serve.gateway.admission import RATE_HEADERS_KEY
from serve.gateway.ratelimit import RateLimiter
from serve.gateway.request_record import RECORD_KEY, RequestRecord

log = logging.getLogger(__name__)

SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
)


class ResponseHeadersMiddleware:
    def __init__(self, app: ASGIApp, *, limiter: RateLimiter | None = None) -> None:
        self.app = app
        self.limiter = limiter

    async def current_rate_headers(self, state: Mapping[str, Any]) -> Mapping[str, str] | None:
        """The tenant's counters when admission reported none (never counts anything)."""
        record = state.get(RECORD_KEY)
        if self.limiter is None or not isinstance(record, RequestRecord) or not record.tenant:
            return None
        try:
            current = await self.limiter.peek(record.tenant)
        except Exception:
            log.exception("reading the rate limit counters failed")
            return None
        return None if current is None else current.headers()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name for name, _ in headers}
                headers += [h for h in SECURITY_HEADERS if h[0] not in present]
                state = scope.get("state", {})
                rate = state.get(RATE_HEADERS_KEY)
                if not rate and message["status"] != OutOfCapacity.status:
                    rate = await self.current_rate_headers(state)
                if rate:
                    headers += [(k.lower().encode(), v.encode()) for k, v in rate.items()]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
