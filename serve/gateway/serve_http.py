"""Ray Serve's HTTP callback: middlewares on the HTTP servers Serve runs itself.

Serve calls `serve_http_middlewares` (named by `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`,
which `batchserve up`, the images and the chart set) in every process that runs one of
its HTTP servers: each direct-ingress replica and the proxy. The middlewares wrap
Serve's own request handling, outside its `RequestIdMiddleware`, on the server's real
`receive` and `send`:

- `ServeRequestIdGuard` sanitises a client's `x-request-id` before Serve reads it;
- `StalledClientGuard` ends a request whose client stopped reading (see
  `serve.gateway.stream_guard`), which the app cannot see behind Serve's queue.

A callback takes no arguments, so its one setting, `stream_stall_s`, is read from this
process's environment (`BATCHSERVE_STREAM_STALL_S`; the chart sets it from its values).
"""

from __future__ import annotations

from starlette.middleware import Middleware

from serve.gateway.request_id import ServeRequestIdGuard
from serve.gateway.stream_guard import StalledClientGuard
from serve.settings import Settings

SERVE_CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
SERVE_CALLBACK = "serve.gateway.serve_http:serve_http_middlewares"


def serve_http_middlewares() -> list[Middleware]:
    """Innermost first, as Serve applies them."""
    return [
        Middleware(ServeRequestIdGuard),
        Middleware(StalledClientGuard, stall_s=Settings().stream_stall_s),
    ]
