"""Ray Serve's HTTP callback: middlewares on the HTTP servers Serve runs itself.

Serve calls `serve_http_middlewares` (named by `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`,
which `batchserve up`, the images and the chart set) in every process that runs one of
its HTTP servers: each direct-ingress replica and the proxy actor. The middlewares wrap
Serve's own request handling, outside its `RequestIdMiddleware`, on the server's real
`receive` and `send`:

- `ServeControlHeaders` drops the request headers with which a client could steer Serve
  itself (`x-request-disconnect-disabled: ?1` turns off Serve's watch for a client that
  left, and with it `StalledClientGuard`; `x-request-timeout-seconds` sets or removes
  Serve's own timeout);
- `ServeRequestIdGuard` sanitises a client's `x-request-id` before Serve reads it;
- `StalledClientGuard` ends a request whose client stopped reading (see
  `serve.gateway.stream_guard`), which the app cannot see behind Serve's queue. On a
  replica Serve reads `receive` for the whole request, so the guard works there; the
  proxy actor (HAProxy's backup while no replica is up) does not act on it while its own
  write is blocked, so there only HAProxy's `timeout client` ends such a client;
- `LastWordsMarks` tells a replica's keeper where each connection's answer stands, so that
  the keeper can end it properly should the replica's process die
  (`serve.gateway.last_words`; a no-op where no keeper runs, as in the proxy actor).

A callback takes no arguments: its one setting, `stream_stall_s`, comes from the
process's environment (`ServeHttpSettings`), and an unusable value falls back to the
default with a warning rather than keep Serve from starting its servers.
"""

from __future__ import annotations

import logging
from typing import Final

from pydantic import ValidationError
from starlette.middleware import Middleware
from starlette.types import ASGIApp, Receive, Scope, Send

from serve.gateway.last_words import LastWordsMarks
from serve.gateway.request_id import ServeRequestIdGuard
from serve.gateway.stream_guard import StalledClientGuard
from serve.settings import STREAM_STALL_S, ServeHttpSettings

log = logging.getLogger(__name__)

SERVE_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
SERVE_CALLBACK = "serve.gateway.serve_http:serve_http_middlewares"
STREAM_STALL_ENV = "BATCHSERVE_STREAM_STALL_S"
# Ray's `SERVE_HTTP_REQUEST_DISCONNECT_DISABLED_HEADER` and `..._TIMEOUT_S_HEADER`.
SERVE_CONTROL_HEADERS: Final = frozenset(
    {b"x-request-disconnect-disabled", b"x-request-timeout-seconds"}
)


class ServeControlHeaders:
    """Drops the client's Serve control headers (SERVE_CONTROL_HEADERS)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            headers = scope["headers"]
            kept = [(name, value) for name, value in headers if name not in SERVE_CONTROL_HEADERS]
            if len(kept) != len(headers):
                scope = {**scope, "headers": kept}
        await self.app(scope, receive, send)


def stall_limit_s() -> float:
    try:
        return ServeHttpSettings().stream_stall_s
    except ValidationError:
        log.warning("%s is not a positive number; using %.0f s", STREAM_STALL_ENV, STREAM_STALL_S)
        return STREAM_STALL_S


def serve_http_middlewares() -> list[Middleware]:
    """Innermost first, as Serve applies them."""
    return [
        Middleware(ServeControlHeaders),
        Middleware(ServeRequestIdGuard),
        Middleware(StalledClientGuard, stall_s=stall_limit_s()),
        Middleware(LastWordsMarks),  # outermost: it must see the server's own writes
    ]
